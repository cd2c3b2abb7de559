"""What the ``torch.compile`` backend reads from one dynamo graph: whether it must run in PyTorch
(:func:`refusal`), what each of its inputs is (:func:`classify`: a weight, an engine input, a size,
a baked-in scalar, or unused), and the profile its symbolic dims give (:func:`profiles`).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Sequence

import torch

from .._errors import ExportError

__all__ = ["classify", "identifier", "profiles", "refusal"]

_WEIGHT_PATH = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")  # L['self']._modules['fc']...
_VIEWS = {"view", "view_as", "reshape", "transpose", "permute", "squeeze", "unsqueeze", "flatten", "expand",
          "narrow", "select", "t", "getitem", "__getitem__", "chunk", "split", "unbind", "detach", "unflatten"}
_INPLACE = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor"}


def refusal(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
    """Why the graph must run in PyTorch, or None: engines are inference-only and never write to inputs."""
    if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs):
        return ("it needs gradients (grad mode is on and an input or weight requires grad), and engines are "
                "inference-only. Fix: call the compiled model under torch.no_grad() or torch.inference_mode()")
    aliases: set[torch.fx.Node] = set()  # the graph's inputs, and views of them
    for node in gm.graph.nodes:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        first = node.args[0] if node.args else None
        if node.op == "placeholder" or (first in aliases and name in _VIEWS):
            aliases.add(node)
        elif first in aliases and (name.endswith("_") and not name.endswith("__") or name in _INPLACE
                                   or node.kwargs.get("inplace") or "out" in node.kwargs):
            return (f"it writes to an input in place ({name}), which an engine cannot do. Fix: make that op "
                    "out-of-place (x = x + y, not x += y)")
        if node.op == "call_function" and _training(node):
            return f"it runs {name} in training mode, and engines are inference-only. Fix: call model.eval()"
    return None


def _training(node: torch.fx.Node) -> bool:
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a Python signature: torch.dropout, torch.batch_norm
        index = {"dropout": 2, "feature_dropout": 2, "alpha_dropout": 2, "batch_norm": 5}.get(
            getattr(node.target, "__name__", ""))
        return index is not None and len(node.args) > index and node.args[index] is True
    return any(bound.arguments.get(k) is True for k in ("training", "train"))


def classify(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
              ) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """Each graph input's slot, and the engine inputs' names. A slot is ``("weight", "conv.weight",
    tensor)``, ``("input", k, None)`` (the engine's k-th input), ``("size", (k, dim), None)`` (a SymInt:
    input k's size), ``("const", (value, dtype or None), None)`` (a Python scalar: baked in, checked)
    or ``("unused", None, None)`` (a tensor the graph never reads)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ExportError(f"the graph has {len(placeholders)} inputs but dynamo gave {len(example_inputs)} values")
    slots: list[tuple[str, Any, Any]] = []
    names: list[str] = []
    fakes: list[Any] = []
    for node, value in zip(placeholders, example_inputs):
        arg = node.meta.get("grapharg")
        where = getattr(getattr(arg, "source", None), "name", None)
        where = where if isinstance(where, str) else node.name
        if isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter)
                                                or "._parameters[" in where or "._buffers[" in where):
            path = ".".join(_WEIGHT_PATH.findall(where))
            if not path or any(path == w for _, w, _ in slots) or not all(
                    p.isidentifier() or p.isdigit() for p in path.split(".")):
                path = identifier(node.name)  # not in the model's module tree: the graph's name
            slots.append(("weight", path, value))
        elif isinstance(value, torch.Tensor) and getattr(arg, "pass_arg_as_tensor", False) and value.dim() == 0:
            slots.append(("const", (value.item(), value.dtype), None))  # a float (dynamic=True: BatchNorm's eps)
        elif isinstance(value, torch.Tensor) and not node.users:
            slots.append(("unused", None, None))  # dynamo passes it; the graph never reads it
        elif isinstance(value, torch.Tensor):
            slots.append(("input", len(names), None))
            names.append(identifier(re.sub(r"^L\['|'\]$", "", where)))
            fake = node.meta.get("example_value")
            fakes.append(fake if isinstance(fake, torch.Tensor) else value)
        elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            slots.append(("size", node, None))
        else:
            raise ExportError(f"graph input {where} is a {type(value).__name__}; engines take tensors and sizes")
    for i, (kind, node, _) in enumerate(slots):
        if kind == "size":
            sym = getattr(node.meta.get("example_value"), "node", None)
            found = next(((k, d) for k, fake in enumerate(fakes) for d, s in enumerate(fake.shape)
                          if isinstance(s, torch.SymInt) and s.node.expr == getattr(sym, "expr", None)), None)
            if found is None and not isinstance(getattr(sym, "hint", None), int):
                raise ExportError(f"graph input {node.name} is an int that is no tensor input's size; engines take "
                                   "tensors. Fix: pass it as a tensor")
            slots[i] = ("size", found, None) if found else ("const", (sym.hint, None), None)
    out: list[str] = []
    for n in names:  # unique, and never "self" (forward's own first parameter)
        out.append(n if n not in out and n != "self" else f"{n}_{len(out)}")
    return slots, out


def profiles(gm: torch.fx.GraphModule, slots: Sequence[tuple[str, Any]], names: Sequence[str],
             inputs: Sequence[torch.Tensor], max_batch: int) -> dict[str, dict[int, tuple[int, int, int]]] | None:
    """compile()'s ``dynamic=`` from the dims dynamo made symbolic: the symbol's range where bounded,
    else 1..max(max_batch, example) as ``dynamic="batch"`` does, narrowed to where dynamo's guards
    hold. None for a static graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n, (kind, _) in zip(placeholders, slots) if kind == "input"]
    dynamic: dict[str, dict[int, tuple[int, int, int]]] = {}
    for name, fake, real in zip(names, fakes, inputs):
        for d, s in enumerate(getattr(fake, "shape", ())):
            node = getattr(s, "node", None)
            env, expr = getattr(node, "shape_env", None), getattr(node, "expr", None)
            if env is None or getattr(env.simplify(expr), "is_number", False):
                continue  # an int, or a symbol a guard specialised
            rng, hint = env.bound_sympy(expr), int(real.shape[d])
            lower, upper = _bound(rng.lower), _bound(rng.upper)
            # dynamo's own lower bound is 2 (it specialises 0 and 1): only a user's larger one is kept
            lo = min(lower if lower is not None and lower > 2 else 1, hint)
            lo, hi = _within_guards(env, expr, lo, hint, max(upper if upper is not None else max_batch, hint))
            dynamic.setdefault(name, {})[d] = (lo, hint, hi)
    return dynamic or None


def _within_guards(env: Any, sym: Any, lo: int, hint: int, hi: int) -> tuple[int, int]:
    """The widest [min, max] within [lo, hi] around ``hint`` where value-range analysis proves every
    guard dynamo put on ``sym`` (resnet's graph holds for H > 32 only: an export from 1 fails)."""
    from sympy import true
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    guards = [g.expr for g in getattr(env, "guards", ()) if sym in getattr(g.expr, "free_symbols", ())]
    values = getattr(env, "backed_var_to_val", None)  # torch >= 2.10 (var_to_val before, deprecated since)
    others = {s: ValueRanges(v, v) for s, v in (values if values is not None else env.var_to_val).items() if s != sym}

    def holds(a: int, b: int) -> bool:
        try:
            return all(bound_sympy(g, {**others, sym: ValueRanges(a, b)}).lower is true for g in guards)
        except Exception:  # noqa: BLE001 - an expression the analysis cannot bound: not proven
            return False

    if not guards or not holds(hint, hint):
        return (lo, hi) if not guards else (hint, hint)
    low, good = lo, hint  # bisect: holds(a, hint) is monotone in a
    while low < good:
        mid = (low + good) // 2
        low, good = (low, mid) if holds(mid, hint) else (mid + 1, good)
    best, top = hint, hi
    while best < top:
        mid = (best + top + 1) // 2
        best, top = (mid, top) if holds(good, mid) else (best, mid - 1)
    return good, best


def _bound(value: Any) -> int | None:
    """A range bound as an int, None for infinity (torch's ``int_oo`` says ``is_finite``: the type decides)."""
    import sympy

    return int(value) if isinstance(value, (int, sympy.Integer)) else None


def identifier(name: str) -> str:
    name = re.sub(r"\W+", "_", name).strip("_") or "input"
    return name if name.isidentifier() and not name[0].isdigit() else f"input_{name}"
