"""What the ``torch.compile`` backend does with each graph dynamo captures: compile it with the
``compile_fn`` it is given (:func:`torch_trt_module.compile`), or leave it to PyTorch.

The registered backend is :func:`torch_trt_module._dynamo.backend` (the ``torch_dynamo_backends``
entry point, setup.py), which passes ``compile`` in; :class:`~.partitioned.PartitionedModule`'s maker
does the same. Per graph:

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
import threading
from typing import Any, Callable, Sequence

import torch

from .._core.settings import Settings
from .._errors import ExportError, TorchTRTError
from .dynamo_graphs import classify, profiles, refusal

__all__ = ["STATS", "GraphCall", "backend", "describe"]

log = logging.getLogger(__name__)

#: This process's graphs: received, run on an engine, run in PyTorch, and profile rebuilds.
STATS = {"graphs": 0, "engines": 0, "fallbacks": 0, "rebuilds": 0}


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, compile_fn: Callable[..., Any],
            options: dict[str, Any] | None = None, mode: str | None = None) -> Callable[..., Any]:
    """Compile one dynamo graph with ``compile_fn`` (the orchestrator's ``compile``, passed in by
    :mod:`torch_trt_module._dynamo`, the registered backend, and by PartitionedModule's maker), or run it
    in PyTorch where it cannot be compiled (one WARNING says why). ``options`` and an example: the
    registered entry point, :func:`torch_trt_module._dynamo.backend`."""
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
        reason = refusal(gm, example_inputs)
        if reason:
            return _fallback(gm, label, reason)
        call = GraphCall.of(gm, example_inputs)
        inputs = [v for (kind, _), v in zip(call._slots, example_inputs) if kind == "input"]
        derived = "dynamic" not in options
        if derived:
            options["dynamic"] = profiles(gm, call._slots, call._input_names, inputs, settings.max_batch)
        if settings.device is None and inputs:
            options["device"] = str(inputs[0].device)
    except Exception as e:  # noqa: BLE001 - an ExportError, or a bug of ours: never the user's problem
        log.debug("%s: not compiled", label, exc_info=True)
        return _fallback(gm, label, f"{type(e).__name__}: {e}")
    return _Engine(gm, call, options, label, derived, compile_fn)


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
            return {"graph": fn.label, "runs": "pytorch", "module": None, "why": fn.why}
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
        slots, names = classify(gm, example_inputs)

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
                call._register(path, value)
        return call.eval()

    def with_weights(self, weights: dict[str, torch.Tensor]) -> "GraphCall":
        """The same graph, with these tensors as its weights (another instance of the model's class).

        Example:
            >>> other = call.with_weights({"fc.weight": b.fc.weight, "fc.bias": b.fc.bias})  # doctest: +SKIP
        """
        call = type(self)()
        call._graph_module = self._graph_module
        call._slots, call._input_names, call.graph_code = self._slots, self._input_names, self.graph_code
        for path, value in weights.items():
            call._register(path, value)
        return call.eval()

    def _register(self, path: str, value: torch.Tensor) -> None:
        owner, _, leaf = path.rpartition(".")
        module: torch.nn.Module = self
        for part in owner.split(".") if owner else ():
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]  # type: ignore[assignment]
        if isinstance(value, torch.nn.Parameter):
            module.register_parameter(leaf, value)
        else:
            module.register_buffer(leaf, value)

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


class _Instance:
    """One source instance's weights (the tensors dynamo passes for them) and the module compiled for them."""

    __slots__ = ("tensors", "call", "module", "ranges")

    def __init__(self, tensors: tuple[torch.Tensor, ...], call: GraphCall) -> None:
        self.tensors = tensors  # held: while the entry lives, no other tensor can take their ids
        self.call = call
        self.module: Any = None
        self.ranges: list[tuple[int, int, int, int]] = []  # (input, dim, min, max), every dim of every input


class _Engine:
    """What dynamo calls for a graph: picks the engine's inputs out of the graph's, and runs the engine.

    The engine is compiled at the first call, not in :func:`backend`: dynamo is still building the
    frame's guards there, and an export (which traces symbolic shapes of its own) would add to them.

    dynamo gives two instances of one class the same graph, each call passing that instance's
    weights. So each set of weights (by the tensors' identities) gets a module of its own, made once
    (through compile(): a cache hit, refit to those weights): calls that alternate between instances
    never refit, and no call ever changes what another thread's call runs with. A weight the model
    reassigned is a new set too (the old one is dropped); in-place writes are followed by the module.
    """

    MAX_INSTANCES = 8  # sets of weights kept; the oldest is dropped past this

    def __init__(self, gm: torch.fx.GraphModule, call: GraphCall, options: dict[str, Any], label: str,
                 derived: bool, compile_fn: Callable[..., Any]) -> None:
        self.gm, self.options, self.label, self.derived = gm, options, label, derived
        self.compile_fn = compile_fn  # compile(), from the orchestrator: this package never imports it
        self.user = [i for i, (kind, _) in enumerate(call._slots) if kind == "input"]
        self.weights = [(i, where) for i, (kind, where) in enumerate(call._slots) if kind == "weight"]
        self.consts = [(i, where[0]) for i, (kind, where) in enumerate(call._slots) if kind == "const"]
        self.max_rebuilds = Settings.from_options(**options).max_rebuilds
        self.rebuilds, self.failed, self.warned = 0, False, False
        self.why = ""  # why the first build failed, for describe()
        first = _Instance(tuple(call._weight(where) for _, where in self.weights), call)
        self.instances: dict[tuple[int, ...], _Instance] = {tuple(map(id, first.tensors)): first}
        self.latest = first
        self.lock = threading.Lock()

    @property
    def call(self) -> GraphCall:
        """The graph as a module, with the weights of the instance called last."""
        return self.latest.call

    @property
    def module(self) -> Any:
        """The compiled module of the instance called last (None before its first call)."""
        return self.latest.module

    def __call__(self, *args: Any) -> Any:
        inst = self.instances.get(tuple([id(args[i]) for i, _ in self.weights]))
        if inst is None:
            inst = self._instance(args)
        self.latest = inst
        if self.failed:
            return self.gm.forward(*args)
        for i, value in self.consts:  # dynamo does not guard every Python scalar it passes as a tensor
            if (args[i].item() if isinstance(args[i], torch.Tensor) else args[i]) != value:
                return self._eager(args, f"graph input {i} is {args[i]}; the engine has {value} baked in")
        inputs = [args[i] for i in self.user]
        if inst.module is None or any(not lo <= inputs[k].shape[d] <= hi for k, d, lo, hi in inst.ranges):
            with self.lock:
                if self.failed:  # another thread's first call failed meanwhile
                    return self.gm.forward(*args)
                try:
                    self._compile(inst, inputs)
                except Exception as e:  # noqa: BLE001 - a TorchTRTError, or a bug: the graph runs in PyTorch
                    log.debug("%s: compile failed", self.label, exc_info=True)
                    if inst.module is None:
                        self.failed, self.why = True, f"its engine build failed: {type(e).__name__}: {e}"
                        _fallback(self.gm, self.label, self.why)
                        return self.gm.forward(*args)
                    self.rebuilds = self.max_rebuilds  # no more rebuilds are tried
                    return self._eager(args, f"rebuilding for new shapes failed: {type(e).__name__}: {e}")
                if any(not lo <= inputs[k].shape[d] <= hi for k, d, lo, hi in inst.ranges):
                    return self._eager(args, f"input shapes {[tuple(t.shape) for t in inputs]} are outside the "
                                       f"profile, after max_rebuilds={self.max_rebuilds} rebuilds")
        try:
            return inst.module(*inputs)
        except TorchTRTError as e:
            return self._eager(args, f"{type(e).__name__}: {e}")

    def _instance(self, args: tuple[Any, ...]) -> _Instance:
        """The entry for the weights of this call: another instance of the model's class, or the same
        model after it reassigned a weight. Its module is compiled at its first call."""
        tensors = tuple(args[i] for i, _ in self.weights)
        key = tuple(map(id, tensors))
        with self.lock:
            inst = self.instances.get(key)
            if inst is not None:
                return inst
            mine = set(key)
            # An entry sharing some of these tensors is this model before it reassigned a weight:
            # dropped, so its old tensors are not kept alive. Then the oldest, past MAX_INSTANCES.
            instances = {k: v for k, v in self.instances.items() if mine.isdisjoint(k)}
            while len(instances) >= self.MAX_INSTANCES:
                del instances[next(iter(instances))]
            call = self.latest.call.with_weights({where: t for (_, where), t in zip(self.weights, tensors)})
            inst = _Instance(tensors, call)
            instances[key] = inst
            self.instances = instances  # replaced whole: a reader without the lock sees one or the other
            log.info("%s: called with another set of weights (another instance of the model's class, or a "
                     "reassigned weight); it gets a module of its own (%d set(s) kept)", self.label, len(instances))
            return inst

    def _compile(self, inst: _Instance, inputs: list[torch.Tensor]) -> None:
        """Build the instance's engine (first call), or rebuild it with a profile widened to ``inputs``' shapes."""
        if inst.module is not None:
            if self.rebuilds >= self.max_rebuilds or all(lo <= inputs[k].shape[d] <= hi
                                                         for k, d, lo, hi in inst.ranges):
                return  # out of rebuilds, or another thread widened the profile already
            specs, dynamic = inst.module.input_specs, {}
            for k, d, lo, hi in inst.ranges:
                s = inputs[k].shape[d]
                if not lo == hi == s:
                    dynamic.setdefault(inst.call._input_names[k], {})[d] = (min(lo, s), specs[k].opt[d],
                                                                            max(hi, _pow2(s)))
            self.rebuilds += 1
            STATS["rebuilds"] += 1
            log.info("%s: input shapes %s are outside the engine's profile; rebuilding with dynamic=%s (%d/%d)",
                     self.label, [tuple(t.shape) for t in inputs], dynamic, self.rebuilds, self.max_rebuilds)
            self.options = {**self.options, "dynamic": dynamic}
        else:
            log.info("%s: compiling %d input(s) %s with dynamic=%s", self.label, len(inputs),
                     [tuple(t.shape) for t in inputs], self.options["dynamic"])
        # A graph compiles at its first call, which ranks need not reach together: no collective
        # unless the user gave a process group (a rank-0-only evaluation must never hang).
        self.options.setdefault("process_group", False)
        try:
            module = self.compile_fn(inst.call, tuple(inputs), **self.options)
        except ExportError as e:
            if not self.derived or self.options["dynamic"] is None or inst.module is not None:
                raise
            # The profile from dynamo's symbols did not export (a guard the range analysis missed):
            # build for these shapes, and widen when others come.
            log.info("%s: the profile did not export (%s); compiling for these shapes", self.label,
                     str(e).splitlines()[0][:300])
            self.options = {**self.options, "dynamic": None}
            module = self.compile_fn(inst.call, tuple(inputs), **self.options)
        if inst.module is None and not any(i.module is not None for i in self.instances.values()):
            STATS["engines"] += 1
        inst.ranges = [(k, d, lo, hi) for k, s in enumerate(module.input_specs) if s.min and s.max
                       for d, (lo, hi) in enumerate(zip(s.min, s.max))]
        inst.module = module

    def _eager(self, args: tuple[Any, ...], reason: str) -> Any:
        if not self.warned:
            self.warned = True
            log.warning("torch_trt_module: %s runs in PyTorch for this call and any like it: %s", self.label,
                        reason.splitlines()[0][:500])
        return self.gm.forward(*args)


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


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
