"""Compile anything eager runs (``partition="auto"``, the default), and say what ran where.

- **A graph the builder cannot take whole** (an op its ONNX parser lacks, such as NonZero on
  TensorRT-RTX), or ops the user keeps in PyTorch (``torch_executed_ops=``): the graph is split,
  engines for the parts the parser takes and PyTorch ATen ops for the rest (:mod:`torch_trt_module._partition.segments`,
  :class:`~torch_trt_module._partition.split.SegmentedModule`; it saves and loads). If the split itself
  fails, the whole graph runs without an engine on the next runtime of the chain.
- **A model that cannot be exported whole** (data-dependent control flow, ``.item()``, Python
  torch.export refuses, a dim the export specialised): the model runs through ``torch.compile``
  with this package's backend (:mod:`torch_trt_module._dynamo`). TorchDynamo splits it at the
  graph breaks, every graph between them goes through :func:`compile` and its cache (split again
  where the builder refuses ops: ``partition="split"``), and a graph that still cannot become an
  engine runs in PyTorch. The result is a :class:`PartitionedModule`: the same call and outputs as
  the model; it runs the model's own Python between the graphs, so it cannot be saved (save the
  model and compile it again: the cache makes that fast).
- ``partition="split"`` splits a graph but never captures with graph breaks; ``"never"`` raises.

This package only partitions: the compile function each graph goes through is passed in by the
orchestrator (:mod:`torch_trt_module._pipeline.compile`). ``explain`` is in
:mod:`torch_trt_module._tools.explain`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch

from .._core.modes import eval_semantics, say_inference_only
from .._core.signature import params_of
from .._errors import UsageError
from .._runtime.composite import backend_of, check_weights, named_tensors, unsaved_buffers
from .._runtime.weights import weights_hash
from . import dynamo as _dynamo

SAVE_REFUSAL = ("a partitioned module runs the model's own Python between its graphs, so it cannot be saved as "
                "an engine. Fix: save the model (its state_dict) and compile it again after loading; the engine "
                "cache makes that a cache hit per graph")

__all__ = ["SAVE_REFUSAL", "PartitionedModule"]

log = logging.getLogger(__name__)


class PartitionedModule(torch.nn.Module):
    """A model that could not be exported whole, run through ``torch.compile`` with this package's
    backend: engines for the graphs between graph breaks, PyTorch for the rest (see the module
    docstring). Inference only: calls run under ``torch.no_grad()``.

    It has no weights of its own: the model's Python and the graphs that run in PyTorch read the
    model's tensors, and each engine follows them (``weights="follow"``, the default; with
    ``weights="exact"`` each engine is compiled with it, and compares their bytes at every call). So
    ``weight_names`` and ``weights_hash()`` are the model's, and ``refit(weights)`` loads the weights
    into the model itself, in place (where a TRTModule's refit leaves its model alone), after checking
    every name, shape and dtype; every engine follows at its next call.

    Example:
        >>> fast = torch_trt_module.compile(model_with_item_branch, x)   # doctest: +SKIP
        >>> fast                                                          # doctest: +SKIP
        PartitionedModule(graphs=2, on engines=2, in PyTorch=0, why='data-dependent control flow ...')
    """

    def __init__(self, model: torch.nn.Module, options: dict[str, Any], reason: str, *,
                 compile_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.reason = reason
        self.training = False  # its own flag, as a TRTModule starts in eval mode; the model's is left alone
        options = dict(options)
        self.__dict__["_options"] = options  # for a copy: it compiles its own model
        self.__dict__["_compile_fn"] = compile_fn  # compile(), passed in by the orchestrator

        self.__dict__["_made"] = []  # what the backend returned per graph (see parts())

        def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            fn = _dynamo.backend(gm, example_inputs, options=options, compile_fn=compile_fn)
            self._made.append(fn)
            return fn

        # dynamic=False: a new shape recompiles (logged by the backend); dynamo then makes the dims
        # that changed symbolic, and the backend turns them into profiles. Kept out of the module's
        # children: it wraps the same model, whose weights the state_dict already holds once.
        self.__dict__["_compiled"] = torch.compile(model, backend=backend, dynamic=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or self.model.training:
            say_inference_only(self)
        # The Python between the graphs is the model's own: it computes inference semantics (dropout
        # off, BatchNorm running statistics) as the engines do, whatever mode the model is in; every
        # submodule's mode is restored after the call.
        with torch.no_grad(), eval_semantics(self.model):  # engines return no gradients
            return self._compiled(*args, **kwargs)

    def parts(self) -> list[dict[str, Any]]:
        """Each graph dynamo captured so far: its label, ``runs`` ("engine": a TRTModule or
        SegmentedModule built at its first call, in ``module``; "pending": not called yet;
        "pytorch") and, for PyTorch, why. Engines are built at a graph's first call.

        Example:
            >>> [p["runs"] for p in fast.parts()]   # doctest: +SKIP
            ['engine', 'engine']
        """
        return [_dynamo.describe(fn) for fn in self._made]

    @property
    def graphs(self) -> int:
        """How many graphs dynamo captured so far."""
        return len(self._made)

    @property
    def fallbacks(self) -> int:
        """How many of them run in PyTorch, counted from :meth:`parts`: a graph whose engine build
        failed at its first call counts here too."""
        return sum(p["runs"] == "pytorch" for p in self.parts())

    # ------------------------------------------------------------------ the TRTModule API

    @property
    def input_names(self) -> list[str]:
        """The parameters of the model's ``forward``."""
        return [p.name for p in params_of(self.model.forward)]

    @property
    def backend(self) -> str:
        """What runs the engines built so far (as :attr:`TRTModule.backend`; several joined by '+'),
        ``pytorch`` where every graph runs in PyTorch, ``unbuilt`` before the first call."""
        if not self._made:
            return "unbuilt"
        return backend_of([p["module"] for p in self.parts() if p["module"] is not None], none="pytorch")

    @property
    def weight_names(self) -> list[str]:
        """The model's parameters and buffers (the weights every graph computes with), by their names."""
        return sorted(self._tensors())

    def weights_hash(self) -> str:
        """sha256 of the model's weights over :attr:`weight_names` (what every graph computes with; an
        engine follows them at its next call), as :meth:`TRTModule.weights_hash`."""
        return weights_hash(self._tensors())

    def refit(self, weights: Any) -> None:
        """Load ``weights`` (a ``state_dict``, or a module of the same architecture) into the model this
        module runs, in place: every name, shape and dtype is checked first (InputError naming the
        tensor; nothing is half-applied), and every engine follows at its next call. Unlike
        :meth:`TRTModule.refit`, this changes the model: it is what the graphs in PyTorch compute with.

        Example:
            >>> fast.refit(torch.load("checkpoint.pt", weights_only=True))   # doctest: +SKIP
        """
        if self._options.get("weights") == "snapshot":
            raise UsageError("refit() on a PartitionedModule loads the weights into its model, and its engines, "
                             "compiled with weights='snapshot', would not follow them. Fix: compile with "
                             "weights='follow' (the default), or load the weights into the model and compile again")
        ours = self._tensors()
        values = check_weights(ours, weights, optional=unsaved_buffers(self.model))
        with torch.no_grad():
            for name, value in values.items():
                ours[name].copy_(value)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return named_tensors(self.model)

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo: dict[int, Any]) -> "PartitionedModule":
        # torch.compile's state is not copied: the copy compiles its own copy of the model (each graph a
        # cache hit), so its graphs follow the copy.
        new = type(self)(copy.deepcopy(self.model, memo), self._options, self.reason,
                         compile_fn=self._compile_fn)
        memo[id(self)] = new
        new.training = self.training
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise UsageError("a PartitionedModule cannot be pickled (torch.save(module), pickle.dumps), nor saved with "
                         f"ttm.save: it {SAVE_REFUSAL.removeprefix('a partitioned module ')}")

    def extra_repr(self) -> str:
        return (f"graphs={self.graphs}, on engines={self.graphs - self.fallbacks}, in PyTorch={self.fallbacks}, "
                f"why={self.reason.splitlines()[0][:120]!r}")
