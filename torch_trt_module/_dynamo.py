"""The ``torch.compile`` backend: each graph dynamo captures goes through :func:`torch_trt_module.compile`.

``torch.compile(model, backend="torch_trt_module", options={...})`` finds :func:`backend` through the
``torch_dynamo_backends`` entry point (setup.py), with no ``import torch_trt_module``. Per graph:

- dynamo passes the model's parameters and buffers as graph inputs; they become the weights of a
  :class:`GraphCall` (the same tensor objects, under the model's names), so the engine holds them
  as weights and ``weights="follow"`` refits it when they change;
- the other tensors are the engine's inputs. A dim dynamo made symbolic (``dynamic=True``,
  ``mark_dynamic``) becomes a profile dim; SymInt inputs are read from those tensors' shapes;
- a graph that cannot run on an engine (a :class:`TorchTRTError`, gradients needed, training mode,
  an input written in place) runs in PyTorch, with one WARNING naming the reason.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
from typing import Any, Callable, Sequence

import torch

from ._errors import ExportError, TorchTRTError
from ._settings import Settings

__all__ = ["STATS", "GraphCall", "backend", "describe"]

log = logging.getLogger(__name__)

#: This process's graphs: received, run on an engine, run in PyTorch, and profile rebuilds.
STATS = {"graphs": 0, "engines": 0, "fallbacks": 0, "rebuilds": 0}

_WEIGHT_PATH = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")  # L['self']._modules['fc']...
_VIEWS = {"view", "view_as", "reshape", "transpose", "permute", "squeeze", "unsqueeze", "flatten", "expand",
          "narrow", "select", "t", "getitem", "__getitem__", "chunk", "split", "unbind", "detach", "unflatten"}
_INPLACE = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor"}


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None,
            mode: str | None = None) -> Callable[..., Any]:
    """Compile one dynamo graph, or run it in PyTorch where it cannot be compiled (one WARNING says why).

    ``options`` are :func:`torch_trt_module.compile`'s (``precision``, ``cache_dir``, ``verify``,
    ``runtime``, ``weights``, ``dynamic``, ``max_batch``, ...); an unknown one raises
    :class:`SettingsError`. ``dynamic`` defaults to the dims dynamo made symbolic.

    Example:
        >>> fast = torch.compile(model, backend="torch_trt_module", options={"precision": "fp16"})  # doctest: +SKIP
        >>> with torch.no_grad():                    # engines are inference-only  # doctest: +SKIP
        ...     out = fast(torch.randn(8, 3, 224, 224))
    """
    options = dict(options or {})
    settings = Settings.from_options(**options)  # a wrong option is the user's error: it raises
    if settings.partition == "auto":  # dynamo made the graph breaks already: split inside a graph only
        options["partition"] = "split"
    STATS["graphs"] += 1
    cid = gm.meta.get("dynamo_compile_id")
    label = f"graph {cid}" if cid is not None else f"graph #{STATS['graphs']}"
    if mode not in (None, "default"):
        log.info("torch.compile mode=%r is ignored by torch_trt_module; pass options= instead", mode)
    if getattr(cid, "frame_compile_id", 0):
        log.info("torch.compile recompiled a frame (%s: new shapes, or another guard failed)", label)
    try:  # from here on nothing breaks the user's run: a failure runs the graph in PyTorch
        reason = _refusal(gm, example_inputs)
        if reason:
            return _fallback(gm, label, reason)
        call = GraphCall.of(gm, example_inputs)
        inputs = [v for (kind, _), v in zip(call._slots, example_inputs) if kind == "input"]
        derived = "dynamic" not in options
        if derived:
            options["dynamic"] = _profiles(call, inputs, settings.max_batch)
        if settings.device is None and inputs:
            options["device"] = str(inputs[0].device)
    except Exception as e:  # noqa: BLE001 - an ExportError, or a bug of ours: never the user's problem
        log.debug("%s: not compiled", label, exc_info=True)
        return _fallback(gm, label, f"{type(e).__name__}: {e}")
    return _Engine(gm, call, options, label, derived)


def _fallback(gm: torch.fx.GraphModule, label: str, reason: str) -> Callable[..., Any]:
    STATS["fallbacks"] += 1
    log.warning("torch_trt_module: %s runs in PyTorch, not on an engine: %s", label, reason.splitlines()[0][:500])
    return _InPyTorch(gm, label, reason)


class _InPyTorch:
    """A graph :func:`backend` left to PyTorch, and why."""

    def __init__(self, gm: torch.fx.GraphModule, label: str, reason: str) -> None:
        self.forward, self.label, self.reason = gm.forward, label, reason

    def __call__(self, *args: Any) -> Any:
        return self.forward(*args)


def describe(fn: Any) -> dict[str, Any]:
    """What :func:`backend` made of one graph: ``{"graph", "runs", "module", "why"}``."""
    if isinstance(fn, _InPyTorch):
        return {"graph": fn.label, "runs": "pytorch", "module": None, "why": fn.reason}
    if isinstance(fn, _Engine):
        if fn.failed:
            return {"graph": fn.label, "runs": "pytorch", "module": None, "why": "its engine build failed"}
        return {"graph": fn.label, "runs": "engine" if fn.module is not None else "pending", "module": fn.module,
                "why": ""}
    return {"graph": "?", "runs": "pytorch", "module": None, "why": f"unknown ({type(fn).__name__})"}


class GraphCall(torch.nn.Module):
    """One dynamo graph as a module: its tensor inputs in, the graph's outputs out.

    The weights dynamo passes as graph inputs are registered here (the same objects, under the
    model's names, such as ``conv.weight``) so the export keeps them as weights. ``forward``'s
    signature names the inputs as dynamo's sources do (usually the model's argument names):
    ``options={"dynamic": {...}}`` is keyed by them, and the INFO log shows them.

    Example:
        >>> call = GraphCall.of(gm, example_inputs)      # doctest: +SKIP
        >>> ttm.compile(call, (x,), dynamic=None)        # doctest: +SKIP
    """

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> "GraphCall":
        """The module for dynamo's graph ``gm`` and the values dynamo passed (ExportError for a graph
        input an engine cannot take)."""
        slots, names = _classify(gm, example_inputs)

        def forward(self: GraphCall, *inputs: torch.Tensor) -> Any:
            return self._run(inputs)

        # Positional-only, so compile() names the engine's inputs by them and passes them by position;
        # a class per graph, so the signature survives the deepcopy precision="fp16" makes.
        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in ["self", *names]])
        call = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})()
        call._graph_module = gm
        call._slots = [(kind, where) for kind, where, _ in slots]
        call._input_names = names
        # The cache fingerprint hashes public str attributes, not a GraphModule's code (kept in
        # ``_code``) nor what is baked in here: without this, graphs with equal weights and input
        # shapes (or BatchNorms of another eps) would share an entry.
        call.graph_code = _graph_text(gm) + f"\n# baked in: {[where for kind, where, _ in slots if kind == 'const']}"
        for kind, path, value in slots:
            if kind == "weight":
                owner, _, leaf = path.rpartition(".")
                module: torch.nn.Module = call
                for part in owner.split(".") if owner else ():
                    if part not in module._modules:
                        module.add_module(part, torch.nn.Module())
                    module = module._modules[part]  # type: ignore[assignment]
                if isinstance(value, torch.nn.Parameter):
                    module.register_parameter(leaf, value)
                else:
                    module.register_buffer(leaf, value)
        return call.eval()

    def _run(self, inputs: Sequence[torch.Tensor]) -> Any:
        args: list[Any] = []
        for kind, where in self._slots:
            if kind == "input":
                args.append(inputs[where])
            elif kind == "weight":
                args.append(self._weight(where))
            elif kind == "const":
                args.append(where[0] if where[1] is None else torch.tensor(where[0], dtype=where[1]))
            elif kind == "unused":
                args.append(None)
            else:  # "size": a SymInt, the size of an input's dim
                args.append(inputs[where[0]].shape[where[1]])
        return self._graph_module(*args)

    def _weight(self, path: str) -> torch.Tensor:
        owner, _, leaf = path.rpartition(".")
        module = self.get_submodule(owner)
        return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]

    def rebind(self, path: str, value: torch.Tensor) -> None:
        """Point weight ``path`` at ``value`` (the model reassigned it); the engine's weight watch sees it."""
        owner, _, leaf = path.rpartition(".")
        setattr(self.get_submodule(owner), leaf, value)


class _Engine:
    """What dynamo calls for a graph: picks the engine's inputs out of the graph's, and runs the engine.

    The engine is compiled at the first call, not in :func:`backend`: dynamo is still building the
    frame's guards there, and an export (which traces symbolic shapes of its own) would add to them.
    """

    def __init__(self, gm: torch.fx.GraphModule, call: GraphCall, options: dict[str, Any], label: str,
                 derived: bool) -> None:
        self.gm, self.call, self.options, self.label, self.derived = gm, call, options, label, derived
        self.user = [i for i, (kind, _) in enumerate(call._slots) if kind == "input"]
        self.weights = [(i, where) for i, (kind, where) in enumerate(call._slots) if kind == "weight"]
        self.current = {where: call._weight(where) for _, where in self.weights}
        self.consts = [(i, where[0]) for i, (kind, where) in enumerate(call._slots) if kind == "const"]
        self.max_rebuilds = Settings.from_options(**options).max_rebuilds
        self.rebuilds, self.failed, self.warned = 0, False, False
        self.module: Any = None
        self.ranges: list[tuple[int, int, int, int]] = []  # (input, dim, min, max), every dim of every input
        self.lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        for i, where in self.weights:
            if args[i] is not self.current[where]:  # the model reassigned this weight: follow it
                self.call.rebind(where, args[i])
                self.current[where] = args[i]
        if self.failed:
            return self.gm.forward(*args)
        for i, value in self.consts:  # dynamo does not guard every Python scalar it passes as a tensor
            if (args[i].item() if isinstance(args[i], torch.Tensor) else args[i]) != value:
                return self._eager(args, f"graph input {i} is {args[i]}; the engine has {value} baked in")
        inputs = [args[i] for i in self.user]
        if self.module is None or any(not lo <= inputs[k].shape[d] <= hi for k, d, lo, hi in self.ranges):
            with self.lock:
                if self.failed:  # another thread's first call failed meanwhile
                    return self.gm.forward(*args)
                try:
                    self._compile(inputs)
                except Exception as e:  # noqa: BLE001 - a TorchTRTError, or a bug: the graph runs in PyTorch
                    log.debug("%s: compile failed", self.label, exc_info=True)
                    if self.module is None:
                        self.failed = True
                        _fallback(self.gm, self.label, f"{type(e).__name__}: {e}")
                        return self.gm.forward(*args)
                    self.rebuilds = self.max_rebuilds  # no more rebuilds are tried
                    return self._eager(args, f"rebuilding for new shapes failed: {type(e).__name__}: {e}")
                if any(not lo <= inputs[k].shape[d] <= hi for k, d, lo, hi in self.ranges):
                    return self._eager(args, f"input shapes {[tuple(t.shape) for t in inputs]} are outside the "
                                       f"profile, after max_rebuilds={self.max_rebuilds} rebuilds")
        try:
            return self.module(*inputs)
        except TorchTRTError as e:
            return self._eager(args, f"{type(e).__name__}: {e}")

    def _compile(self, inputs: list[torch.Tensor]) -> None:
        """Build the engine (first call), or rebuild it with a profile widened to ``inputs``' shapes."""
        from ._compile import compile as compile_module

        if self.module is not None:
            if self.rebuilds >= self.max_rebuilds or all(lo <= inputs[k].shape[d] <= hi
                                                         for k, d, lo, hi in self.ranges):
                return  # out of rebuilds, or another thread widened the profile already
            specs, dynamic = self.module.input_specs, {}
            for k, d, lo, hi in self.ranges:
                s = inputs[k].shape[d]
                if not lo == hi == s:
                    dynamic.setdefault(self.call._input_names[k], {})[d] = (min(lo, s), specs[k].opt[d],
                                                                            max(hi, _pow2(s)))
            self.rebuilds += 1
            STATS["rebuilds"] += 1
            log.info("%s: input shapes %s are outside the engine's profile; rebuilding with dynamic=%s (%d/%d)",
                     self.label, [tuple(t.shape) for t in inputs], dynamic, self.rebuilds, self.max_rebuilds)
            self.options = {**self.options, "dynamic": dynamic}
        else:
            log.info("%s: compiling %d input(s) %s with dynamic=%s", self.label, len(inputs),
                     [tuple(t.shape) for t in inputs], self.options["dynamic"])
        try:
            module = compile_module(self.call, tuple(inputs), **self.options)
        except ExportError as e:
            if not self.derived or self.options["dynamic"] is None or self.module is not None:
                raise
            # The profile from dynamo's symbols did not export (a guard the range analysis missed):
            # build for these shapes, and widen when others come.
            log.info("%s: the profile did not export (%s); compiling for these shapes", self.label,
                     str(e).splitlines()[0][:300])
            self.options = {**self.options, "dynamic": None}
            module = compile_module(self.call, tuple(inputs), **self.options)
        if self.module is None:
            STATS["engines"] += 1
        self.module = module
        self.ranges = [(k, d, lo, hi) for k, s in enumerate(module.input_specs) if s.min and s.max
                       for d, (lo, hi) in enumerate(zip(s.min, s.max))]

    def _eager(self, args: tuple[Any, ...], reason: str) -> Any:
        if not self.warned:
            self.warned = True
            log.warning("torch_trt_module: %s runs in PyTorch for this call and any like it: %s", self.label,
                        reason.splitlines()[0][:500])
        return self.gm.forward(*args)


def _refusal(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str | None:
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


def _classify(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
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
                path = _identifier(node.name)  # not in the model's module tree: the graph's name
            slots.append(("weight", path, value))
        elif isinstance(value, torch.Tensor) and getattr(arg, "pass_arg_as_tensor", False) and value.dim() == 0:
            slots.append(("const", (value.item(), value.dtype), None))  # a float (dynamic=True: BatchNorm's eps)
        elif isinstance(value, torch.Tensor) and not node.users:
            slots.append(("unused", None, None))  # dynamo passes it; the graph never reads it
        elif isinstance(value, torch.Tensor):
            slots.append(("input", len(names), None))
            names.append(_identifier(re.sub(r"^L\['|'\]$", "", where)))
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


def _profiles(call: GraphCall, inputs: Sequence[torch.Tensor], max_batch: int
              ) -> dict[str, dict[int, tuple[int, int, int]]] | None:
    """compile()'s ``dynamic=`` from the dims dynamo made symbolic: the symbol's range where bounded,
    else 1..max(max_batch, example) as ``dynamic="batch"`` does, narrowed to where dynamo's guards
    hold. None for a static graph."""
    placeholders = [n for n in call._graph_module.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n, (kind, _) in zip(placeholders, call._slots) if kind == "input"]
    dynamic: dict[str, dict[int, tuple[int, int, int]]] = {}
    for name, fake, real in zip(call._input_names, fakes, inputs):
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


def _graph_text(gm: torch.fx.GraphModule) -> str:
    """The code of the graph and of its subgraphs (``torch.cond``'s branches are GraphModules of their
    own), with a hash of every tensor constant they read: what the fingerprint must see of the graph."""
    import hashlib
    import operator

    parts = []
    for name, module in gm.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            parts.append(f"# {name or 'graph'}\n{module.code}")
            for node in module.graph.nodes:
                value = operator.attrgetter(node.target)(module) if node.op == "get_attr" else None
                if isinstance(value, torch.Tensor):
                    data = value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                    parts.append(f"# {node.target}: {value.dtype} {tuple(value.shape)} "
                                 f"{hashlib.sha256(data).hexdigest()}")
    return "\n".join(parts)


def _identifier(name: str) -> str:
    name = re.sub(r"\W+", "_", name).strip("_") or "input"
    return name if name.isidentifier() and not name[0].isdigit() else f"input_{name}"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
