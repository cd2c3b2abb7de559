"""The captured program's graph in a compact form the PyTorch runtime loads in milliseconds, safely.

torch.export's own deserializer takes 1.5 s to read resnet50's program back (rebuilding every
dataclass of its schema through ``typing.get_type_hints`` and every symbolic size through sympy),
most of a warm cache hit. The PyTorch runtime needs none of that: it runs the graph's nodes with
the weights passed in as arguments. So :func:`dump_graph` stores, beside torch.export's JSON, just
the nodes (name, op, target, arguments) and which placeholders are weights and which outputs are
the user's; :func:`load_graph` builds a ``torch.fx.GraphModule`` from them.

Nothing read here is evaluated: the JSON is parsed by ``json``; an operator is found only as
``torch.ops.<namespace>.<name>.<overload>`` with each part a plain identifier and the namespace
in :data:`NAMESPACES`; a Python function only in a fixed table (``operator.getitem``,
``torch.sym_int``, ...); dtypes, devices, layouts and memory formats only in tables of torch's
own values. Names become Python code when FX generates the module's ``forward``, so they must be
plain identifiers. Anything else raises :class:`~torch_trt_module.EngineLoadError` naming the node
and what it holds. A program this format cannot express (a higher-order operator's nested graph,
an attribute, another namespace) gets no compact graph: :func:`dump_graph` returns None and the
runtime reads torch.export's JSON as before.
"""

from __future__ import annotations

import json
import keyword
import logging
import math
import operator
import re
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .._errors import EngineLoadError

__all__ = ["NAMESPACES", "LoadedGraph", "check_graph", "dump_graph", "load_graph"]

log = logging.getLogger(__name__)

FORMAT = 1
#: Operator namespaces a stored graph may call: ATen's and prims' operators, torchvision's (nms, roi_align).
NAMESPACES = frozenset({"aten", "prims", "torchvision"})
WEIGHT_KINDS = ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")
_OPS = ("placeholder", "call_function", "output")

# Python functions torch.export writes for arithmetic on symbolic sizes (and _lower_rounding writes).
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "mod", "truediv", "pow", "neg", "pos", "eq", "ne", "lt", "le",
        "gt", "ge", "and_", "or_", "not_", "lshift", "rshift", "abs")},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")},
    **{f"torch.{n}": getattr(torch, n) for n in ("sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt",
                                                 "sym_not", "sym_sum") if hasattr(torch, n)},
}
_FUNCTION_NAMES = {fn: name for name, fn in _FUNCTIONS.items()}
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "channels_last_3d",
                                                  "preserve_format")}
_DEVICE_TYPES = frozenset({"cpu", "cuda", "meta", "xpu", "mps"})
# ATen's operators named after Python's (aten::__and__.Tensor); no other dunder is looked up.
_DUNDER_OPS = frozenset(f"__{op}__" for base in ("and", "or", "xor", "lshift", "rshift") for op in (base, f"i{base}"))
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_MAX_DEPTH = 32


class LoadedGraph(NamedTuple):
    """What the PyTorch runtime runs: the graph module (weights first, then the user's inputs), each
    weight placeholder's ``(kind, name)`` in order, how many user inputs follow, which of the outputs
    are the user's, and how many outputs there are in all."""

    module: torch.fx.GraphModule
    weights: tuple[tuple[str, str], ...]
    n_user_inputs: int
    user_outputs: tuple[int, ...]
    n_outputs: int


def _plain(name: Any, *, op: bool = False) -> bool:
    """A Python identifier that is no keyword and no ``__dunder__`` (but ``op``: ATen's ``__and__``)."""
    return (isinstance(name, str) and _IDENT_RE.fullmatch(name) is not None and not keyword.iskeyword(name)
            and (not (name.startswith("__") and name.endswith("__")) or (op and name in _DUNDER_OPS)))


# --------------------------------------------------------------------------- dump

def dump_graph(program: Any) -> bytes | None:
    """The compact graph of an ExportedProgram, or None where it has something this format does not
    express (its PyTorch runtime then loads torch.export's JSON)."""
    try:
        data = json.dumps(_dump(program), separators=(",", ":"), allow_nan=False).encode()
        check_graph(data)  # what load_graph would refuse (a device type, a nesting depth) is not stored
    except Exception as e:  # noqa: BLE001 - ValueError: what _dump cannot express; anything else: the JSON path stays
        log.debug("no compact graph for the PyTorch runtime (%s: %s); it will load through torch.export",
                  type(e).__name__, e)
        return None
    return data


def _dump(program: Any) -> dict[str, Any]:
    gm = program.graph_module
    if next(gm.children(), None) is not None:
        raise ValueError("the graph holds submodules (a higher-order operator's graphs)")
    sig = program.graph_signature
    index: dict[torch.fx.Node, int] = {}
    nodes, placeholders = [], []
    for node in gm.graph.nodes:
        if node.op not in _OPS:
            raise ValueError(f"a {node.op} node ({node.target})")
        if not _plain(node.name):
            raise ValueError(f"the node name {node.name!r}")
        if node.op == "placeholder":
            if node.args or node.kwargs or not _plain(node.target) or len(placeholders) != len(nodes):
                raise ValueError(f"the placeholder {node.name!r}")
            placeholders.append(node)
            target = node.target
        elif node.op == "output":
            target = "output"
        else:
            target = _target_name(node.target)
        if not all(_plain(k) for k in node.kwargs):
            raise ValueError(f"a keyword argument of {node.name!r}")
        index[node] = len(nodes)
        nodes.append([node.name, node.op, target, [_encode(a, index) for a in node.args],
                      {k: _encode(v, index) for k, v in node.kwargs.items()}])
    if not nodes or nodes[-1][1] != "output" or sum(n[1] == "output" for n in nodes) != 1:
        raise ValueError("the graph does not end in its one output")
    kinds = [spec.kind.name for spec in sig.input_specs]
    if len(kinds) != len(placeholders) or any(getattr(s.arg, "name", None) != p.name
                                              for s, p in zip(sig.input_specs, placeholders)):
        raise ValueError("the signature's inputs are not the graph's placeholders")
    inputs = []
    for spec, kind in zip(sig.input_specs, kinds):
        if kind == "USER_INPUT":
            inputs.append([kind, None])
        elif kind in WEIGHT_KINDS and isinstance(spec.target, str):
            inputs.append([kind, spec.target])
        else:
            raise ValueError(f"a {kind} input")
    if "USER_INPUT" in kinds and any(k != "USER_INPUT" for k in kinds[kinds.index("USER_INPUT"):]):
        raise ValueError("a weight placeholder after a user input")
    outs = list(gm.graph.nodes)[-1].args
    if len(outs) != 1 or not isinstance(outs[0], (tuple, list)) or len(outs[0]) != len(sig.output_specs):
        raise ValueError("the output node does not return one value per output of the signature")
    user = [i for i, spec in enumerate(sig.output_specs) if spec.kind.name == "USER_OUTPUT"]
    return {"format": FORMAT, "nodes": nodes, "inputs": inputs, "user_outputs": user,
            "n_outputs": len(sig.output_specs)}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name, overload = target.namespace, target._opname, target._overloadname
        if ns in NAMESPACES and _plain(name, op=True) and _plain(overload):
            return f"{ns}::{name}.{overload}"
        raise ValueError(f"the operator {ns}::{name}.{overload}")
    try:
        return _FUNCTION_NAMES[target]
    except (KeyError, TypeError):  # TypeError: an unhashable target
        raise ValueError(f"the call target {target!r}") from None


def _encode(value: Any, index: dict[torch.fx.Node, int]) -> Any:
    if isinstance(value, torch.fx.Node):
        if value not in index:
            raise ValueError(f"an argument {value.name!r} that is not an earlier node of the graph")
        return {"n": index[value]}
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        return {"f": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, list):  # immutable_list too
        return [_encode(v, index) for v in value]
    if type(value) is tuple:
        return {"t": [_encode(v, index) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": [value.type, value.index]}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"mf": str(value).removeprefix("torch.")}
    if type(value) is slice:
        return {"slice": [_encode(v, index) for v in (value.start, value.stop, value.step)]}
    # Dicts are left out on purpose: FX writes a dict argument with repr(), which is not code for
    # every value it could hold, and no ATen operator takes one.
    raise ValueError(f"an argument of type {type(value).__name__}")


# --------------------------------------------------------------------------- load

def check_graph(data: bytes, *, source: str = "the stored PyTorch graph") -> None:
    """Raise :class:`~torch_trt_module.EngineLoadError` unless ``data`` is a compact graph that
    :func:`load_graph` would build (every name, target and argument checked; nothing built)."""
    _read(data, source, build=False)


def load_graph(data: bytes, *, source: str = "the stored PyTorch graph") -> LoadedGraph:
    """The graph module and signature :func:`dump_graph` stored, every part checked first (see the module)."""
    loaded = _read(data, source, build=True)
    assert loaded is not None
    return loaded


def _read(data: bytes, source: str, *, build: bool) -> LoadedGraph | None:
    def refuse(what: str) -> EngineLoadError:
        return EngineLoadError(f"{source}: refused the stored PyTorch graph: {what}. torch_trt_module never writes "
                               "this; the file is corrupt, or was made or edited by someone else. Compile the model "
                               "again")

    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise refuse(f"it is not JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise refuse(f"its format is {doc.get('format') if isinstance(doc, dict) else doc!r:.40}, expected {FORMAT}")
    nodes, inputs, user, n_out = (doc.get(k) for k in ("nodes", "inputs", "user_outputs", "n_outputs"))
    if not (isinstance(nodes, list) and nodes and isinstance(inputs, list) and isinstance(user, list)
            and type(n_out) is int):
        raise refuse("it lacks its nodes, inputs or outputs")
    graph = torch.fx.Graph() if build else None
    made: list[Any] = []
    names: set[str] = set()
    n_placeholders = 0
    for i, entry in enumerate(nodes):
        if not (isinstance(entry, list) and len(entry) == 5):
            raise refuse(f"node {i} is {str(entry)[:80]!r}, not [name, op, target, args, kwargs]")
        name, op, target, args, kwargs = entry
        if not _plain(name) or name in names:
            raise refuse(f"node {i} is named {str(name)[:80]!r}; expected a new plain identifier")
        names.add(name)
        where = f"node {i} ({name})"
        last = i == len(nodes) - 1
        if op not in _OPS or (op == "output") != last or (op == "placeholder" and n_placeholders != i):
            raise refuse(f"{where} is a {str(op)[:40]!r} node here; expected placeholders, then call_function "
                         "nodes, then one output")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise refuse(f"{where} has arguments {str(args)[:60]!r}, {str(kwargs)[:60]!r}; expected a list and an "
                         "object")
        if op == "placeholder":
            n_placeholders += 1
            if not _plain(target) or args or kwargs:
                raise refuse(f"{where} is a placeholder for {str(target)[:80]!r} with arguments")
        elif op == "output":
            if target != "output" or len(args) != 1 or kwargs:
                raise refuse(f"{where}: the output node returns {str(args)[:80]!r}")
        else:
            target = _resolve(target, where, refuse)
        for key in kwargs:
            if not _plain(key):
                raise refuse(f"{where} has the keyword argument {key[:80]!r}, which is not a plain identifier")
        args = tuple(_decode(a, made, where, refuse, 0) for a in args)
        kwargs = {k: _decode(v, made, where, refuse, 0) for k, v in kwargs.items()}
        made.append(graph.create_node(op, target, args, kwargs, name=name) if graph is not None else None)
    specs = _inputs(inputs, n_placeholders, refuse)
    n_returned = len(args[0]) if isinstance(args[0], (tuple, list)) else -1  # the output node's
    if n_returned != n_out or not all(type(j) is int and 0 <= j < n_out for j in user) or len(set(user)) != len(user):
        raise refuse(f"the outputs {str(user)[:80]!r} of {n_out} do not match the {n_returned} values the graph "
                     "returns")
    if graph is None:
        return None
    weights = tuple((k, t) for k, t in specs if k != "USER_INPUT")
    module = torch.fx.GraphModule(torch.nn.Module(), graph)  # FX writes forward() from the nodes built above
    return LoadedGraph(module, weights, len(specs) - len(weights), tuple(user), n_out)


def _no_constant(name: str) -> Any:
    raise ValueError(f"the constant {name}")  # NaN and Infinity are stored as {"f": "nan"}, never bare


def _inputs(inputs: list[Any], n_placeholders: int, refuse: Callable[[str], EngineLoadError]) -> list[tuple[str, str]]:
    if len(inputs) != n_placeholders:
        raise refuse(f"it describes {len(inputs)} inputs for {n_placeholders} placeholders")
    specs: list[tuple[str, str]] = []
    for i, spec in enumerate(inputs):
        ok = isinstance(spec, list) and len(spec) == 2 and (
            (spec[0] == "USER_INPUT" and spec[1] is None)
            or (spec[0] in WEIGHT_KINDS and isinstance(spec[1], str) and 0 < len(spec[1]) <= 1000))
        if not ok:
            raise refuse(f"input {i} is {str(spec)[:80]!r}; expected a parameter, buffer or constant tensor by name, "
                         "or a user input")
        if specs and specs[-1][0] == "USER_INPUT" and spec[0] != "USER_INPUT":
            raise refuse(f"input {i} is a weight after the user's inputs")
        specs.append((spec[0], spec[1]))
    return specs


def _resolve(target: Any, where: str, refuse: Callable[[str], EngineLoadError]) -> Any:
    if isinstance(target, str):
        if (fn := _FUNCTIONS.get(target)) is not None:
            return fn
        ns, sep, rest = target.partition("::")
        name, dot, overload = rest.partition(".")
        if sep and dot and ns in NAMESPACES and _plain(name, op=True) and _plain(overload):
            op = _operator(ns, name, overload)
            if op is None:
                raise refuse(f"{where} calls {target!r}, which this torch does not register (a newer torch's "
                             "operator, or an extension's that is not imported)")
            return op
    raise refuse(f"{where} calls {str(target)[:120]!r}; expected an operator <namespace>::<name>.<overload> of "
                 f"{', '.join(sorted(NAMESPACES))} or one of the functions {', '.join(sorted(_FUNCTIONS))[:60]}...")


def _operator(ns: str, name: str, overload: str) -> Any:
    """The OpOverload ``torch.ops.<ns>.<name>.<overload>`` (each part checked by the caller), or None."""
    key = (ns, name, overload)
    if (op := _FOUND.get(key)) is None:
        try:
            op = getattr(getattr(getattr(torch.ops, ns), name), overload)
        except (AttributeError, RuntimeError):
            return None  # not remembered: importing an extension (torchvision) registers it later
        if not isinstance(op, torch._ops.OpOverload):
            return None
        _FOUND[key] = op
    return op


_FOUND: dict[tuple[str, str, str], Any] = {}


def _decode(value: Any, made: Sequence[Any], where: str, refuse: Callable[[str], EngineLoadError], depth: int) -> Any:
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if depth < _MAX_DEPTH:
        if kind is list:
            return [_decode(v, made, where, refuse, depth + 1) for v in value]
        if kind is dict and len(value) == 1:
            ((tag, x),) = value.items()
            if tag == "n" and type(x) is int and 0 <= x < len(made):
                return made[x]
            if tag == "t" and type(x) is list:
                return tuple(_decode(v, made, where, refuse, depth + 1) for v in x)
            if tag == "slice" and type(x) is list and len(x) == 3:
                return slice(*(_decode(v, made, where, refuse, depth + 1) for v in x))
            table = {"f": _NON_FINITE, "dtype": _DTYPES, "layout": _LAYOUTS, "mf": _MEMORY_FORMATS}.get(tag)
            if table is not None and isinstance(x, str) and x in table:
                return table[x]
            if tag == "device" and type(x) is list and len(x) == 2 and x[0] in _DEVICE_TYPES and (
                    x[1] is None or (type(x[1]) is int and 0 <= x[1] < 1024)):
                return torch.device(x[0]) if x[1] is None else torch.device(x[0], x[1])
    raise refuse(f"{where} has the argument {str(value)[:80]!r}, which is not a number, string, earlier node, "
                 "dtype, device, layout, memory format, slice, list or tuple")
