"""A graph split into engines and PyTorch (:class:`SegmentedModule`): how it is made, run and saved.

:mod:`torch_trt_module._partition.segments` decides the split; this module compiles each engine part through :func:`compile`
and runs the graph: PyTorch ATen ops between the engines, in one ``torch.fx`` graph. A
SegmentedModule saves without pickle: the decomposed program (:mod:`torch_trt_module._formats.program`), the split (node
names per engine, JSON) and each engine's saved state; :func:`torch_trt_module.load` rebuilds it.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from typing import Any, Callable

import torch

from .._core.inputs import match_inputs
from .._core.io import from_u8, to_u8
from .._core.modes import say_inference_only
from .._core.settings import Settings
from .._core.signature import Param, bind_call
from .._core.spec import TensorSpec, dtype_name
from .._core.tree import TreeSpec, flatten, unflatten
from .._errors import EngineLoadError, TorchTRTError
from .._export.export import Flat, eager_on_copies, flat_inputs, make_profiles, widen_example
from .._export.exporters import capture
from .._formats.program import load_program, replace_weights, save_program
from .._runtime.composite import backend_of, check_weights, named_tensors, unsaved_buffers
from .._runtime.copying import copy_module, pickle_refusal
from .._runtime.module import TRTModule
from .._runtime.weights import WeightWatch, weights_hash
from .segments import Segment, SplitPlan, _copy_size_queries, fuse, plan_split, segment_profile

__all__ = ["SAVED_FORMAT", "SegmentedModule", "compile_split", "split_plan"]

log = logging.getLogger(__name__)

SAVED_FORMAT = "torch_trt_module.segmented/1"
#: The graph holds the model's parameters and buffers under this prefix (``_export.Flat`` wraps the
#: model as ``self.model``); the model's own names follow it.
_PREFIX = "model."


class SegmentedModule(torch.nn.Module):
    """A model compiled in parts: engines for what the builder takes, PyTorch ATen ops for the rest,
    in one graph (see :mod:`torch_trt_module._partition.segments`). The same call and outputs as the model.
    Inference only. ``segments`` lists every part and why the PyTorch ones stayed in PyTorch.

    Weights: the same API as :class:`~torch_trt_module.TRTModule` (``refit``, ``weights_hash``,
    ``weight_names``), by the model's ``state_dict`` names. A compiled one follows its model: its
    PyTorch parts compute with the model's own tensors, and its engine parts refit to them.
    ``refit(weights)`` makes every part compute with ``weights`` without touching the model (the
    PyTorch parts get copies); the next change of the model's weights makes every part follow the
    model again, as a TRTModule does. A loaded one has no model, and keeps what it is refit to.
    With ``weights="exact"`` every engine part is compiled with it (each compares its weights' bytes
    at every call), and so is the watch that notices the model's next change after a refit.

    Example:
        >>> fast = torch_trt_module.compile(model_with_nonzero, x)   # doctest: +SKIP
        >>> fast                                                      # doctest: +SKIP
        SegmentedModule(engines=2, PyTorch=1: aten.nonzero.default (tensorrt_rtx's parser refuses ONNX NonZero ...))
        >>> torch_trt_module.save(fast, "m.pt"); torch_trt_module.load("m.pt")  # doctest: +SKIP
    """

    def __init__(self, graph: torch.fx.GraphModule, segments: list[Segment], params: tuple[Param, ...],
                 call_tree: TreeSpec, output_tree: TreeSpec, program: Any, inputs: tuple[TensorSpec, ...], *,
                 follows: bool = False, exact: bool = False) -> None:
        super().__init__()
        self._follows = follows  # compiled with weights="follow" or "exact": its tensors are its model's
        self._exact = exact  # "exact": the watch after a refit compares bytes too
        self.__dict__.update(_lock=threading.Lock(), _watch=None, _shared=None)  # see refit()
        self.graph = graph
        self.segments = segments
        self.input_specs = inputs  # the flat inputs' names, dtypes and profiles, as TRTModule.input_specs
        self._params, self._call_tree, self._output_tree = params, call_tree, output_tree
        self.__dict__["_program"] = program  # the decomposed program, for save(); not a child module
        self.training = False  # the graph (an exported program's module) refuses .eval(); fuse() set it

    def train(self, mode: bool = True) -> "SegmentedModule":
        # Its own flag only: the graph (an exported program's module) refuses train(). A parent's
        # train() must not raise; forward computes inference in either mode (one WARNING).
        self.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            say_inference_only(self)
        watch = self._watch  # only after a refit to other weights than the model's
        if watch is not None and watch.changed():
            self._follow_model_again()
        leaves = match_inputs(self._call_tree, bind_call(self._params, args, kwargs), "")
        with torch.no_grad():
            out = self.graph(*leaves)
        return unflatten(self._output_tree, list(out) if isinstance(out, (tuple, list)) else [out])

    @property
    def engines(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "engine"]

    def extra_repr(self) -> str:
        torch_parts = [s for s in self.segments if s.kind == "pytorch"]
        ops = sum(sum(s.ops.values()) for s in self.segments)
        on = sum(sum(s.ops.values()) for s in self.engines)
        why = "; ".join(f"{', '.join(s.ops)} ({s.why[:100]})" for s in torch_parts[:3])
        return f"engines={len(self.engines)}, ops on engines={on}/{ops}, PyTorch={len(torch_parts)}: {why}"

    # ------------------------------------------------------------------ the TRTModule API

    @property
    def input_names(self) -> list[str]:
        """The flat inputs' names, as :attr:`TRTModule.input_names`."""
        return [s.name for s in self.input_specs]

    @property
    def backend(self) -> str:
        """What runs the engine parts here (as :attr:`TRTModule.backend`; several joined by '+'), or
        ``pytorch`` where no part is an engine. The other parts run as PyTorch ATen ops."""

        return backend_of(self._parts(), none="pytorch")

    @property
    def weight_names(self) -> list[str]:
        """The model's parameters and buffers this module computes with, by their ``state_dict`` names."""
        return sorted(self._tensors())

    def weights_hash(self) -> str:
        """sha256 of the weights this module computes with (each engine part's, and the PyTorch parts'),
        as :meth:`TRTModule.weights_hash`: equal to ``weights_hash(model.state_dict())`` over
        :attr:`weight_names` when it is current."""

        values = dict(self._tensors())
        for part in self._parts():
            values.update({_unprefixed(n): v for n, v in part.weight_values().items()})
        return weights_hash(values)

    def refit(self, weights: Any) -> None:
        """Make every part compute with ``weights`` (a ``state_dict`` by the model's names, or a module of
        the same architecture), without exporting or building: each engine part is refit, and the
        PyTorch parts get copies (the model is not changed). Every name, shape and dtype is checked
        first: a mismatch raises InputError naming the tensor, and nothing is half-applied.

        Example:
            >>> fast.refit(torch.load("checkpoint.pt", weights_only=True))   # doctest: +SKIP
        """

        ours = self._tensors()
        values = check_weights(ours, weights, optional=unsaved_buffers(self.graph, _PREFIX))
        with self._lock:
            self._refit_parts({**ours, **values})
            if self._follows and self._shared is None:
                self._shared = dict(ours)  # the model's own tensors, to follow again when they change
                self._watch = _watch_of(self._shared, exact=self._exact)
            self._rebind(values)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return named_tensors(self.graph, _PREFIX)

    def _parts(self) -> list[Any]:
        return [getattr(self.graph, s.name) for s in self.engines]

    def _refit_parts(self, values: dict[str, torch.Tensor]) -> None:
        for part in self._parts():
            names = part.weight_names
            if names:  # a part with no weights has nothing to refit
                part.refit({n: values[_unprefixed(n)] for n in names})

    def _rebind(self, values: dict[str, torch.Tensor]) -> None:
        """The graph's tensors replaced by ``values`` (by the model's names). Straight into the module's
        tables, not setattr: a registration would count as a change of every watched model."""
        for name, value in values.items():
            path, _, leaf = (_PREFIX + name).rpartition(".")
            module = self.graph.get_submodule(path)
            if leaf in module._parameters:
                module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False) \
                    if not isinstance(value, torch.nn.Parameter) else value
            else:
                module._buffers[leaf] = value

    def _follow_model_again(self) -> None:
        """The model's weights changed after a refit to others: every part follows the model again."""
        with self._lock:
            watch, shared = self._watch, self._shared
            if watch is None or shared is None or not watch.changed():
                return
            watch.close()
            self.__dict__.update(_watch=None, _shared=None)
            self._rebind(shared)
            self._refit_parts(shared)

    def _keep_weights(self) -> None:
        """Keep the weights it has now (``weights="snapshot"``): the PyTorch parts get copies of the
        model's tensors, which they otherwise share."""
        self._follows = False
        self._rebind({n: t.detach().clone() for n, t in self._tensors().items()})

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> "SegmentedModule":
        new = copy_module(self, memo, shared=("_lock", "_watch"))
        new.__dict__.update(_lock=threading.Lock(),
                            _watch=None if new._shared is None else _watch_of(new._shared, exact=new._exact))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise pickle_refusal(self)

    # ------------------------------------------------------------------ saving

    def saved_state(self) -> dict[str, Any]:
        """What :func:`torch_trt_module.save` writes: tensors, strings and dicts only."""

        engines = {}
        for seg in self.engines:
            module = getattr(self.graph, seg.name)
            assert isinstance(module, TRTModule)
            engines[seg.name] = module.state_dict()
        meta = {"segments": [s.to_json() for s in self.segments], "params": [p.to_json() for p in self._params],
                "inputs": [s.to_json() for s in self.input_specs],
                "call_tree": self._call_tree.to_json(), "output_tree": self._output_tree.to_json()}
        # The weights the PyTorch parts compute with (after a refit, not the program's own)
        program = replace_weights(save_program(self._program), {_PREFIX + n: t for n, t in self._tensors().items()})
        return {"format": SAVED_FORMAT, "program": to_u8(program), "meta": json.dumps(meta), "engines": engines}

    @classmethod
    def from_saved(cls, state: dict[str, Any], *, source: str) -> "SegmentedModule":
        try:
            meta = json.loads(state["meta"])
            segments = [Segment.from_json(d) for d in meta["segments"]]
            program = load_program(from_u8(state["program"]), source=source)
            params = tuple(Param.from_json(p) for p in meta["params"])
            call_tree, output_tree = TreeSpec.from_json(meta["call_tree"]), TreeSpec.from_json(meta["output_tree"])
            inputs = tuple(TensorSpec.from_json(d) for d in meta["inputs"])
        except EngineLoadError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise EngineLoadError(f"malformed saved SegmentedModule in {source} ({type(e).__name__}: {e})") from e
        gm = program.module()
        _copy_size_queries(gm)
        engines = [s for s in segments if s.kind == "engine"]
        try:
            graph = fuse(gm, [s.nodes for s in engines])
        except TorchTRTError as e:
            raise EngineLoadError(f"{source}: the saved program does not match its split ({e}); was it saved by "
                                  f"another torch version? This is torch {torch.__version__}") from e
        for seg in engines:
            module = TRTModule()
            module.load_state_dict(state["engines"][seg.name])
            setattr(graph, seg.name, module)
        return cls(graph, segments, params, call_tree, output_tree, program, inputs)


# --------------------------------------------------------------------------- making one

def split_plan(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
               builder: str) -> tuple[SplitPlan, tuple[Param, ...], TreeSpec, TreeSpec]:
    """Capture ``model`` with torch.export and split its graph (builds nothing)."""

    params, call_tree, names, leaves = flat_inputs(model, args, kwargs)
    with torch.no_grad():
        out, written = eager_on_copies(model, args, kwargs)  # never writes to the caller's example
        out_leaves, output_tree = flatten(out, what="output", allow_const=False)
    profiles = make_profiles(names, [tuple(t.shape) for t in leaves], settings)
    wrapper = Flat(model, params, call_tree, written).eval()
    example = widen_example(names, leaves, profiles)
    program = capture(wrapper, names, example, profiles)
    plan = plan_split(program, list(leaves), names, profiles, settings, builder)
    plan.inputs = tuple(TensorSpec(n, dtype_name(t.dtype), tuple(t.shape), *profiles[n]) for n, t in zip(names, leaves))
    return plan, params, call_tree, output_tree


def compile_split(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                  builder: str, options: dict[str, Any], *, compile_fn: Callable[..., Any]) -> SegmentedModule:
    """Split the model's graph and compile each engine part with ``compile_fn`` (the orchestrator's
    ``compile``, passed in: this package partitions, it never compiles) and ``options`` (compile()'s)."""

    plan, params, call_tree, output_tree = split_plan(model, args, kwargs, settings, builder)
    graph = plan.graph
    seen = _part_inputs(graph, plan.example)
    calls = {n.target: n for n in graph.graph.nodes if n.op == "call_module"}
    part_options = {k: v for k, v in options.items() if k not in ("dynamic", "partition", "min_block_size",
                                                                  "torch_executed_ops")}
    for seg in plan.engines:
        sub = getattr(graph, seg.name)
        dynamic = segment_profile(calls[seg.name], plan) or None
        try:
            module = compile_fn(sub, tuple(seen[seg.name]), dynamic=dynamic, partition="never", **part_options)
        except TorchTRTError as e:
            # The builder's own words are often on the lines after the first (TensorRT's log): keep them.
            said = " ".join(str(e).split())
            seg.kind, seg.why = "pytorch", f"its build failed: {said if len(said) <= 1000 else said[:999] + '…'}"
            log.warning("part %s of %s runs in PyTorch: %s", seg.name, type(model).__name__, seg.why)
            continue
        setattr(graph, seg.name, module)
    result = SegmentedModule(graph, plan.segments, params, call_tree, output_tree, plan.program, plan.inputs,
                             follows=settings.follows_weights, exact=settings.weights == "exact")
    if settings.weights == "snapshot":
        result._keep_weights()  # as its engine parts do: the weights it was compiled with
    log.info("%s is split: %s", type(model).__name__, result.extra_repr())
    return result


def _unprefixed(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _watch_of(tensors: dict[str, torch.Tensor], *, exact: bool = False) -> Any:
    """A WeightWatch on ``tensors`` (the model's own, which a refit stopped sharing): it notices their next
    change the way every following module does (version counters, the global epoch; ``exact``: and their
    bytes)."""

    holder = torch.nn.Module()  # names without dots: one flat table
    for name, t in tensors.items():
        if isinstance(t, torch.nn.Parameter):
            holder.register_parameter(name.replace(".", "/"), t)
        else:
            holder.register_buffer(name.replace(".", "/"), t)
    watch = WeightWatch(holder, [n.replace(".", "/") for n in tensors], exact=exact)
    watch.read({})
    watch.__dict__["holder"] = holder  # the watch links weakly; the holder lives as long as it
    return watch


def _part_inputs(graph: torch.fx.GraphModule, example: list[torch.Tensor]) -> dict[str, list[Any]]:
    """The values each fused part receives when the graph runs on the example."""
    seen: dict[str, list[Any]] = {}

    class _Grab(torch.fx.Interpreter):
        def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
            if str(target).startswith("fused_"):
                seen[str(target)] = list(args)
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        _Grab(graph).run(*example)
    return seen
