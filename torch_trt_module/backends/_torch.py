"""The PyTorch runtime: the program torch.export captured at compile time, run on the module's device.

This is the graph that was exported (and checked against eager), stored with the engine, never
a reference to the user's live module that could change under it. It runs as the lifted
graph module: the weights are passed in as arguments, which skips the unlifted module's
per-call input checks (about 0.5 ms a call on resnet18). Where no TensorRT runtime and no
ONNX Runtime CUDA provider can run on a GPU, this keeps a compiled module as fast as eager
(and faster with ``cuda_graphs=True``, which wraps this runner like any other).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from .._core.spec import TensorSpec
from .._errors import EngineLoadError, RuntimeFailure
from .._formats.program import load_program, load_runtime_graph
from ._torch_opt import Optimized

__all__ = ["TorchRunner"]

log = logging.getLogger(__name__)


class TorchRunner:
    """Runs an engine's captured PyTorch program on ``device``.

    Example:
        >>> runner = TorchRunner(engine, "cuda:0")      # doctest: +SKIP
        >>> (logits,) = runner.run([x])                # doctest: +SKIP
    """

    backend = "torch"

    def __init__(self, engine: Any, device: torch.device | str, *, optimize: str | None = None) -> None:
        data = engine.program
        if data is None:
            raise EngineLoadError("the engine has no PyTorch program to run")
        self.device = torch.device(device)
        ex = engine.exported
        self.inputs: list[TensorSpec] = list(ex.inputs)
        self.outputs: list[TensorSpec] = list(ex.outputs)
        # The compact graph where the program has one (milliseconds), else torch.export's program.
        compact = _load_compact(data, self.device)
        #: Which stored form was loaded: "compact graph" or "torch.export" (an entry of an older release).
        self.program_format = "compact graph" if compact is not None else "torch.export"
        loaded = compact or _load_export(data, self.device)
        graph, weights, n_user, self._user_out, n_out = loaded
        self._weights: list[torch.Tensor] = []
        self.weight_names: list[str] = []
        for name, value in weights:
            self._weights.append(value.detach().to(self.device))
            self.weight_names.append(name)
        if n_user != len(self.inputs):
            raise EngineLoadError(f"the PyTorch program takes {n_user} inputs; the engine's metadata has "
                                  f"{len(self.inputs)}")
        if len(self._user_out) != len(self.outputs):
            raise EngineLoadError(f"the PyTorch program returns {len(self._user_out)} outputs; the engine's metadata "
                                  f"has {len(self.outputs)}")
        self._graph = graph
        self._call = self._graph.forward  # no nn.Module dispatch: the graph has no hooks of its own
        self._all_out = len(self._user_out) == n_out
        mode = optimize or str((engine.meta.get("settings") or {}).get("optimize", "auto")).split("@")[0]
        self._opt = Optimized.make(self._graph, self.weight_names, self._weights, mode, self.device) \
            if mode != "none" else None
        if self._opt is not None:
            self._weights = self._opt.weights
            self._call = self._opt.call
        self._weight_ids = frozenset(id(_root(w)) for w in self._weights)

    @property
    def optimized(self) -> str:
        """What the optimizing runtime does with the program here ("none": it runs as captured)."""
        return self._opt.describe() if self._opt is not None else "none"

    @property
    def input_memory_formats(self) -> list[torch.memory_format]:
        """The layout each input is best given in: channels_last for a 4-d input that only the
        optimized program's channels_last convolutions read, else contiguous (what a CUDA graph
        runner may allocate its static inputs in, ``_cudagraphs.STATIC_INPUT_LAYOUT``)."""
        conv = set(self._opt.conv_inputs) if self._opt is not None and self._opt.inductor else set()
        return [torch.channels_last if i in conv and s.rank == 4 else torch.contiguous_format
                for i, s in enumerate(self.inputs)]

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on validated, contiguous inputs on ``self.device``; returns new output tensors."""
        try:
            outs = self._call(*self._weights, *inputs)
        except Exception as e:  # noqa: BLE001 - a kernel's own error, with the shapes that caused it
            shapes = ", ".join(f"{s.name}={tuple(t.shape)}" for s, t in zip(self.inputs, inputs))
            raise RuntimeFailure(f"the PyTorch program failed for input shapes {shapes}: {e}") from e
        outs = list(outs) if self._all_out else [outs[i] for i in self._user_out]
        return _unaliased(outs, inputs, self._weight_ids)

    def raw(self, inputs: Sequence[torch.Tensor]) -> Any:
        """The program's graph module called with the weights and ``inputs``, and nothing else: the
        runtime's own call, which ``benchmarks/bench_overhead.py`` measures this runner against."""
        return self._call(*self._weights, *inputs)

    def refit(self, values: Mapping[str, torch.Tensor]) -> "TorchRunner":
        """Use these values for the program's weights (by name, as :attr:`weight_names`). The list is
        swapped whole, so a call in another thread sees the old weights or the new ones, never a mix."""
        if self._opt is not None:  # derived weights (folded BatchNorms) are derived again
            weights = self._opt.refit(values)
        else:
            weights = [values[n].to(self.device, w.dtype).contiguous() if n in values else w
                       for n, w in zip(self.weight_names, self._weights)]
        self._weight_ids = frozenset(id(_root(w)) for w in weights)
        self._weights = weights
        return self


# What a loader gives TorchRunner: the graph module, the weights ((name, tensor), in the order of
# its placeholders), the number of user inputs, the indices of the user outputs, the number of outputs.
_Loaded = tuple[torch.fx.GraphModule, list[tuple[str, torch.Tensor]], int, list[int], int]


def _load_compact(data: bytes, device: torch.device) -> _Loaded | None:
    """The program's compact graph (``_formats.graph``), or None where it was stored without one."""
    loaded = load_runtime_graph(data)
    if loaded is None:
        return None
    graph, state = loaded
    if device.type != "cpu":
        _retarget(graph.module, device)  # device= arguments; the weights are moved by the caller
    return (graph.module, [(name, state[name]) for _, name in graph.weights], graph.n_user_inputs,
            list(graph.user_outputs), graph.n_outputs)


def _load_export(data: bytes, device: torch.device) -> _Loaded:
    """torch.export's program, read by its deserializer (after ``_formats.program_safety``'s check)."""
    from torch.export.graph_signature import InputKind, OutputKind

    program = load_program(data)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)  # device= arguments in the graph too
        _retarget(program.graph_module, device)
    sig = program.graph_signature
    state = {**program.state_dict, **program.constants}
    weights = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise EngineLoadError(f"the PyTorch program takes a {spec.kind.name} input, which the PyTorch runtime "
                                  "cannot supply")
        weights.append((spec.target, state[spec.target]))
    n_user = sum(spec.kind == InputKind.USER_INPUT for spec in sig.input_specs)
    user_out = [i for i, spec in enumerate(sig.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
    return program.graph_module, weights, n_user, user_out, len(sig.output_specs)


def _retarget(graph_module: Any, device: torch.device) -> None:
    """Finish what ``move_to_device_pass`` starts: point every device argument of the graph, and of
    the graphs nested in it, at ``device``, and regenerate their code. The pass rewrites the nodes'
    arguments but not the code the graph module runs (torch 2.11 and 2.14), so a program captured
    on the CPU still ran ``aten.to.device(x, device(type='cpu'))`` on the GPU and failed with
    "Tensor device mismatch" (BERT's mask code, on the lent H200)."""
    from torch.fx.node import map_aggregate

    def move(value: Any) -> Any:
        return device if isinstance(value, torch.device) and value != device else value

    for gm in graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op == "call_function":
                node.args, node.kwargs = map_aggregate(node.args, move), map_aggregate(node.kwargs, move)
        gm.recompile()


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory ``t`` views (``_base`` is always the root: views of views collapse)."""
    base = t._base
    return t if base is None else base


def _unaliased(outs: list[torch.Tensor], inputs: Sequence[torch.Tensor], weights: frozenset[int]) -> list[torch.Tensor]:
    """Outputs that share memory with an input (``return x``, a view of it), a weight, or each other
    are copied: a compiled module returns new tensors, as an engine does. torch.export's programs
    are functional, so an output aliases something only as that tensor or a view of it: comparing
    roots (identity, through ``_base``) finds every case, at a fraction of reading storages."""
    seen = set(weights)
    seen.update(id(_root(t)) for t in inputs)
    result = []
    for o in outs:
        key = id(_root(o))
        if key in seen:
            o = o.clone()
        else:
            seen.add(key)
        result.append(o)
    return result
