"""A graph split into engines and PyTorch (:class:`SegmentedModule`): how it is made, run and saved.

:mod:`._segments` decides the split; this module compiles each engine part through :func:`compile`
and runs the graph: PyTorch ATen ops between the engines, in one ``torch.fx`` graph. A
SegmentedModule saves without pickle: the decomposed program (:mod:`._program`), the split (node
names per engine, JSON) and each engine's saved state; :func:`torch_trt_module.load` rebuilds it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ._errors import EngineLoadError, TorchTRTError, UsageError
from ._segments import Segment, SplitPlan, fuse, plan_split, segment_profile
from ._settings import Settings
from ._signature import Param, bind_call
from ._spec import TensorSpec, dtype_name
from ._tree import TreeSpec, flatten, unflatten

__all__ = ["SAVED_FORMAT", "SegmentedModule", "compile_split", "split_plan"]

log = logging.getLogger(__name__)

SAVED_FORMAT = "torch_trt_module.segmented/1"


class SegmentedModule(torch.nn.Module):
    """A model compiled in parts: engines for what the builder takes, PyTorch ATen ops for the rest,
    in one graph (see :mod:`torch_trt_module._segments`). The same call and outputs as the model.
    Inference only. ``segments`` lists every part and why the PyTorch ones stayed in PyTorch.

    Example:
        >>> fast = torch_trt_module.compile(model_with_nonzero, x)   # doctest: +SKIP
        >>> fast                                                      # doctest: +SKIP
        SegmentedModule(engines=2, PyTorch=1: aten.nonzero.default (tensorrt_rtx's parser refuses ONNX NonZero ...))
        >>> torch_trt_module.save(fast, "m.pt"); torch_trt_module.load("m.pt")  # doctest: +SKIP
    """

    def __init__(self, graph: torch.fx.GraphModule, segments: list[Segment], params: tuple[Param, ...],
                 call_tree: TreeSpec, output_tree: TreeSpec, program: Any, inputs: tuple[TensorSpec, ...]) -> None:
        super().__init__()
        self.graph = graph
        self.segments = segments
        self.input_specs = inputs  # the flat inputs' names, dtypes and profiles, as TRTModule.input_specs
        self._params, self._call_tree, self._output_tree = params, call_tree, output_tree
        self.__dict__["_program"] = program  # the decomposed program, for save(); not a child module
        self.training = False  # the graph (an exported program's module) refuses .eval(); fuse() set it

    def train(self, mode: bool = True) -> "SegmentedModule":
        if mode:
            raise UsageError("a SegmentedModule is inference-only; train the model itself and compile it again")
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from ._inputs import match_inputs

        if self.training:
            raise UsageError("the module is in training mode; a compiled module is inference-only: call .eval()")
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

    # ------------------------------------------------------------------ saving

    def saved_state(self) -> dict[str, Any]:
        """What :func:`torch_trt_module.save` writes: tensors, strings and dicts only."""
        from ._module import TRTModule
        from ._saved import to_u8
        from ._program import save_program

        engines = {}
        for seg in self.engines:
            module = getattr(self.graph, seg.name)
            assert isinstance(module, TRTModule)
            engines[seg.name] = module.state_dict()
        meta = {"segments": [s.to_json() for s in self.segments], "params": [p.to_json() for p in self._params],
                "inputs": [s.to_json() for s in self.input_specs],
                "call_tree": self._call_tree.to_json(), "output_tree": self._output_tree.to_json()}
        return {"format": SAVED_FORMAT, "program": to_u8(save_program(self._program)), "meta": json.dumps(meta),
                "engines": engines}

    @classmethod
    def from_saved(cls, state: dict[str, Any], *, source: str) -> "SegmentedModule":
        from ._module import TRTModule
        from ._saved import from_u8
        from ._program import load_program
        from ._segments import _copy_size_queries

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
    from ._export import Flat, flat_inputs, make_profiles, widen_example
    from ._exporters import capture

    params, call_tree, names, leaves = flat_inputs(model, args, kwargs)
    with torch.no_grad():
        out_leaves, output_tree = flatten(model(*args, **kwargs), what="output", allow_const=False)
    profiles = make_profiles(names, [tuple(t.shape) for t in leaves], settings)
    wrapper = Flat(model, params, call_tree).eval()
    example = widen_example(names, leaves, profiles)
    program = capture(wrapper, names, example, profiles)
    plan = plan_split(program, list(leaves), names, profiles, settings, builder)
    plan.inputs = tuple(TensorSpec(n, dtype_name(t.dtype), tuple(t.shape), *profiles[n]) for n, t in zip(names, leaves))
    return plan, params, call_tree, output_tree


def compile_split(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                  builder: str, options: dict[str, Any]) -> SegmentedModule:
    """Split the model's graph and compile each engine part (``options``: compile()'s, for each part)."""
    from ._compile import compile as compile_module

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
            module = compile_module(sub, tuple(seen[seg.name]), dynamic=dynamic, partition="never", **part_options)
        except TorchTRTError as e:
            # The builder's own words are often on the lines after the first (TensorRT's log): keep them.
            said = " ".join(str(e).split())
            seg.kind, seg.why = "pytorch", f"its build failed: {said if len(said) <= 1000 else said[:999] + '…'}"
            log.warning("part %s of %s runs in PyTorch: %s", seg.name, type(model).__name__, seg.why)
            continue
        setattr(graph, seg.name, module)
    result = SegmentedModule(graph, plan.segments, params, call_tree, output_tree, plan.program, plan.inputs)
    log.info("%s is split: %s", type(model).__name__, result.extra_repr())
    return result


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
