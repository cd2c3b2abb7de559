"""Stage 4: TRTModule, the nn.Module users call. Input checks, output allocation and
output structure live here, shared by every runtime, so the ONNX Runtime path
exercises for real all the logic the TensorRT path relies on. Which runtime runs the
engine is decided by ``backends.make_runner`` (the runtime chain)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

import torch
from torch.nn.modules import module as _nn_module

from .._build.engine import Engine
from .._core.inputs import match_inputs, safe_cast, widen_hint
from .._core.modes import say_inference_only
from .._core.numerics import eager_uses_tf32
from .._core.settings import check_cuda_graphs
from .._core.signature import bind_call
from .._core.spec import ExportedModel, TensorSpec, dtype_from_name, unflatten
from .._errors import InputError, SettingsError, TorchTRTError
from ..backends import Runner, default_device, make_runner, normalize_device
from ..backends._onnxruntime import OnnxRuntimeRunner
from .copying import Copies
from .following import FollowsWeights
from .weights import WEIGHT_MODES

__all__ = ["LazyBuild", "TRTModule"]

log = logging.getLogger(__name__)
#: Builds (or finds) the engine for a call: (args, kwargs, the module) -> an object with ``engine``,
#: ``prepared`` (a runner made on the way, or None) and ``refit`` (the engine holds other weights).
LazyBuild = Callable[[tuple[Any, ...], dict[str, Any], "TRTModule"], Any]
#: input shapes that passed every check -> the runner's call for them (TRTModule.__call__)
_FastCalls = dict[tuple[torch.Size, ...], Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]]
_Tensor, _grad_enabled = torch.Tensor, torch.is_grad_enabled
# torch's global hook tables, mutated in place and never rebound; module globals read fastest.
_G_FWD_PRE, _G_FWD = _nn_module._global_forward_pre_hooks, _nn_module._global_forward_hooks
_G_BWD_PRE, _G_BWD = _nn_module._global_backward_pre_hooks, _nn_module._global_backward_hooks


class TRTModule(FollowsWeights, Copies, torch.nn.Module):
    """A compiled module: call it like the original (same arguments, same output structure).

    Build one with :func:`torch_trt_module.compile`, or wrap an :class:`Engine`. ``runtime``
    picks what runs it (``"auto"``: the chain in :mod:`torch_trt_module.backends`); ``runner``
    gives one outright (any object with the ``Runner`` surface); ``prepared`` is a runner
    already made for this engine (compile()'s ONNX Runtime session), used where the chain
    picks that runtime on that device.

    ``source`` links the module to the model it was compiled from (weakly). With
    ``weights="follow"`` (the default) a change to the source's parameters or buffers is seen at
    the next call and the engine is refit to them first (:mod:`torch_trt_module._runtime.weights` says
    how); ``weights="exact"`` also compares their bytes at every call (writes through ``p.data``);
    ``weights="snapshot"`` keeps the compiled weights and warns once when the source's change.
    :meth:`refit` takes new weights explicitly.

    Example:
        >>> trt_model = TRTModule(engine)            # doctest: +SKIP
        >>> trt_model(torch.randn(4, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([4, 1000])
    """

    def __init__(self, engine: Engine | None = None, *, device: str | torch.device | None = None,
                 cast_inputs: bool = False, allow_host_code: bool = False, cuda_graphs: bool | str = "auto",
                 runtime: str = "auto", runner: Runner | None = None, prepared: Runner | None = None,
                 source: torch.nn.Module | None = None, weights: str = "follow", refit_now: bool = False,
                 rebuild: Callable[[], Engine] | None = None) -> None:
        super().__init__()
        if weights not in WEIGHT_MODES:
            raise SettingsError(f"option 'weights' got {weights!r}; expected one of {', '.join(map(repr, WEIGHT_MODES))}")
        check_cuda_graphs(cuda_graphs)
        self.weights = weights
        #: How many times the engine's weights were replaced (follow mode, or refit()).
        self.weights_version = 0
        self.__dict__["_source"] = source  # not a submodule: the source's weights are not this module's state
        self._watch = None  # a WeightWatch on the source (_following.FollowsWeights)
        self._current: dict[str, torch.Tensor] | None = None  # weights the runner has, where not the engine's
        self._rebuild = rebuild
        self._warned_weights = False
        self.cast_inputs = cast_inputs
        self.cuda_graphs = cuda_graphs
        self.allow_host_code = allow_host_code
        self.runtime = runtime
        #: Why the runtime that runs this module was chosen (also in repr()).
        self.runtime_reason = ""
        self.engine: Engine | None = None
        self._runner: Any = None
        self._reference: Any = None
        self._lazy: LazyBuild | None = None
        self._rebuilds = 0
        self._max_rebuilds = 0
        self._lazy_device: torch.device | None = None
        self._fast: _FastCalls | None = None
        self._look_late = False
        self._single_out = self._on_cpu = False
        self._lock = threading.Lock()
        self.eval()
        if engine is not None:
            self._load(engine, device, runner=runner, prepared=prepared, refit_now=refit_now)

    @classmethod
    def lazy(cls, build: LazyBuild, *, device: str | torch.device, max_rebuilds: int, cast_inputs: bool = False,
             allow_host_code: bool = False, cuda_graphs: bool | str = "auto", runtime: str = "auto",
             source: torch.nn.Module | None = None, weights: str = "follow") -> "TRTModule":
        """A module that builds its engine at its first call, with ``build(args, kwargs, module)``, and again
        (with the profile widened to the new shape) for a call outside it, up to ``max_rebuilds`` times.

        Example:
            >>> module = TRTModule.lazy(my_build, device="cuda", max_rebuilds=4)   # doctest: +SKIP
        """
        module = cls(cast_inputs=cast_inputs, allow_host_code=allow_host_code, cuda_graphs=cuda_graphs,
                     runtime=runtime, source=source, weights=weights)
        module._lazy, module._lazy_device, module._max_rebuilds = build, torch.device(device), max_rebuilds
        return module

    # ------------------------------------------------------------------ loading

    def _load(self, engine: Engine, device: str | torch.device | None, *, runner: Runner | None = None,
              prepared: Runner | None = None, refit_now: bool = False,
              moving: dict[str, torch.Tensor] | None = None, move: bool = False) -> None:
        # move: the same engine on another device, with the weights `moving` (the watch stays)
        exported = engine.exported
        if not move:
            self._watch_source(exported)
        values = moving
        if refit_now and self._watch is not None and exported.weights:
            # the engine was built for other weights; read now, even mid-step (no call has run yet)
            values = self._watch.read(exported.weights, defer=False)
        if runner is not None:
            reason = "given"
        else:
            dev = normalize_device(device if device is not None else default_device(engine.backend, engine.meta, engine.has_plan))
            runner, reason = make_runner(engine, dev, runtime=self.runtime, cuda_graphs=self.cuda_graphs,
                                         allow_host_code=self.allow_host_code, prepared=prepared, weights=values)
        self._current = values
        self.engine = engine
        self.runtime_reason = reason
        self._exported = exported
        self._runner = runner
        self._reference = None
        self._user_in = [dtype_from_name(d) for d in exported.user_input_dtypes]
        self._user_out = [dtype_from_name(d) for d in exported.user_output_dtypes]
        # A graph runner takes the user dtypes at both ends and casts inside (backends/_cudagraphs.py:
        # the input cast in its copy-in, the output cast in the graph): the module casts nothing then.
        # One made for other output dtypes (by hand, without out_dtypes) gets the module's casts.
        self._runner_casts = bool(getattr(runner, "takes_caller_dtypes", False)) and \
            list(getattr(runner, "out_dtypes", ())) == self._user_out
        self._out_cast = [u != s.torch_dtype and not self._runner_casts for u, s in zip(self._user_out, exported.outputs)]
        self._any_cast = any(self._out_cast)
        self._ok_shapes: dict[str, set[torch.Size]] = {s.name: set() for s in exported.inputs}
        tree, params = exported.call_tree, exported.params
        simple = (tree.kind == "dict" and all(c.kind == "tensor" for c in tree.children)
                  and [p.name for p in params[: len(tree.keys)]] == tree.keys
                  and all(p.kind in ("positional_only", "positional_or_keyword") for p in params[: len(tree.keys)]))
        self._n_positional = len(tree.keys) if simple else -1
        # Keywords the fast call takes (model(**batch), as Hugging Face models are called): the same
        # tensors as positional ones, by the parameters' names. None where one is positional-only.
        self._kw_keys = tuple(tree.keys) if simple and all(
            p.kind == "positional_or_keyword" for p in params[: len(tree.keys)]) else None
        # The fast call (see __call__): plain tensors of the compiled dtypes, at input shapes
        # already checked against the profile; an fp16/bf16 engine's inputs cast at the boundary.
        # None turns it off for this engine.
        self._in_cast = [None if u == s.torch_dtype or self._runner_casts else s.torch_dtype
                         for u, s in zip(self._user_in, exported.inputs)]
        self._any_in_cast = any(c is not None for c in self._in_cast)
        self._fast = None if not simple else {}
        self._look_late = False  # a new runner: the first call looks first
        self._single_out = exported.output_tree.kind == "tensor"
        self._on_cpu = runner.device.type == "cpu"  # t.is_cpu is cheaper than a device comparison

    # ------------------------------------------------------------------ public info

    @property
    def backend(self) -> str:
        """What runs this module here: ``tensorrt``, ``tensorrt_rtx``, ``onnxruntime`` or ``torch``."""
        return self._runner.backend if self._runner is not None else "unbuilt"

    @property
    def numerics(self) -> str:
        """What the module computes in: ``fp16``, ``bf16``, ``tf32`` (fp32 on a TensorRT runtime
        whose engine was built with ``tf32=True``, or on the PyTorch runtime on a GPU where PyTorch's
        flags let cuDNN or cuBLAS use TF32, as they do by default for convolutions) or ``fp32``
        (strict, e.g. ONNX Runtime)."""
        ex = self._require()
        if ex.precision != "fp32":
            return ex.precision
        if self.backend in ("tensorrt", "tensorrt_rtx") and self.engine is not None \
                and self.engine.meta.get("settings", {}).get("tf32", True):
            return "tf32"
        if self.backend == "torch" and eager_uses_tf32(self.device):
            return "tf32"  # the program runs under the caller's flags, as eager does
        return "fp32"

    @property
    def runner(self) -> Runner | None:
        """What runs the engine (the ``backends.Runner`` the runtime chain chose), or None before a lazy build."""
        return self._runner

    @property
    def device(self) -> torch.device | None:
        return self._runner.device if self._runner is not None else None

    @property
    def input_names(self) -> list[str]:
        return self._require().input_names

    @property
    def output_names(self) -> list[str]:
        return self._require().output_names

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The flat inputs' names, dtypes and profiles (min, opt, max)."""
        return self._require().inputs

    def _require(self) -> ExportedModel:
        if self.engine is None:
            raise TorchTRTError("this module has no engine yet (a lazy module builds at its first call)")
        return self._exported

    def extra_repr(self) -> str:
        if self.engine is None:
            return "unbuilt (lazy: builds at the first call)"
        ex = self._exported
        ins = ", ".join(f"{s.name}: {s.dtype} {s.profile_str()}" for s in ex.inputs)
        outs = ", ".join(f"{s.name}: {s.dtype}" for s in ex.outputs)
        built = f"{self.engine.backend} {self.engine.meta.get('backend_version', '')}".strip()
        return (f"backend={self.backend}, engine={built}, precision={ex.precision}, device={self.device},\n"
                f"runtime: {self.runtime_reason or 'given'},\ninputs=[{ins}],\noutputs=[{outs}]")

    # ------------------------------------------------------------------ forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The fast call: with no hook registered (globals included), a call like an earlier successful
        # one (plain positional tensors of the compiled dtypes, contiguous, on this device, no grad,
        # shapes that passed the profile check) goes straight to the runner's call for those shapes,
        # without nn.Module.__call__'s hook walk (~1.3 µs) and forward()'s checks (~3 µs).
        watch = self._watch
        late = watch is not None and self._look_late  # look at the source's weights after the run (following.py)
        if watch is not None and not late:
            self._look_first(watch)
        version = self.weights_version  # before the planned call is taken: a refit since shows (_ran_stale)
        fast = self._fast
        if kwargs and not args and fast is not None and self._kw_keys is not None \
                and len(kwargs) == self._n_positional:
            try:
                args, kwargs = tuple([kwargs[k] for k in self._kw_keys]), {}
            except KeyError:  # another name: the full path says which
                pass
        if (fast is None or kwargs or self.training or len(args) != self._n_positional
                or self._forward_pre_hooks or self._forward_hooks or self._backward_pre_hooks or self._backward_hooks
                or _G_FWD_PRE or _G_FWD or _G_BWD_PRE or _G_BWD or self._compiled_call_impl is not None):
            return super().__call__(*args, **kwargs)  # forward() looks first
        grad, on_cpu = _grad_enabled(), self._on_cpu
        for t, dtype in zip(args, self._user_in):
            if (type(t) is not _Tensor or t.dtype is not dtype or (grad and t.requires_grad)
                    or not t.is_contiguous() or not (t.is_cpu if on_cpu else t.device == self._runner.device)):
                return self.forward(*args) if late else self._forward(args, {})
        call = fast.get((args[0].shape,) if len(args) == 1 else tuple([t.shape for t in args]))
        if call is None:
            return self.forward(*args) if late else self._forward(args, {})
        given = args
        if self._any_in_cast:
            args = tuple([t if c is None else t.to(c) for t, c in zip(args, self._in_cast)])
        try:
            outs = call(args)
        except Exception:
            if not (late and self._ran_stale(watch, version)):
                raise
            return self._forward(given, {})
        if late and self._ran_stale(watch, version):  # refit: run again on the new weights
            return self._forward(given, {})
        if self._any_cast:
            outs = self._cast_outputs(outs)
        return outs[0] if self._single_out else unflatten(self._exported.output_tree, outs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        watch = self._watch
        if watch is not None:
            self._look_first(watch)
        return self._forward(args, kwargs)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.training:  # a parent's train() reached it: inference all the same, said once
            say_inference_only(self)
        if self.engine is None:
            if self._lazy is None:
                raise TorchTRTError("this TRTModule has no engine; load a state_dict or wrap an Engine")
            self._build_lazily(args, kwargs)
        ex = self._exported
        if not kwargs and len(args) == self._n_positional and all(type(a) is torch.Tensor for a in args):
            leaves = list(args)  # the common call: plain positional tensors, nothing to bind
        else:
            leaves = match_inputs(ex.call_tree, bind_call(ex.params, args, kwargs), "")
        try:
            prepared = self._prepare(leaves)
        except _OutOfProfile as e:
            if self._lazy is None or len(e.shape) != e.spec.rank:  # no rebuild changes an input's rank
                raise InputError(str(e)) from None
            self._widen(args, kwargs, e)
            return self._forward(args, kwargs)
        outs = self._runner.run(prepared)
        if self._fast is not None and len(self._fast) < 64 and all(
                a is b or (c is not None and b.dtype == u and b.is_contiguous())
                for a, b, c, u in zip(prepared, leaves, self._in_cast, self._user_in)):
            # Shapes _prepare passed, and inputs it left as they were (or only cast, as the fast
            # call casts them): later calls like this one may skip straight to the runner (to its
            # per-shape plan where it has one).
            key = tuple([t.shape for t in leaves])
            call_for = getattr(self._runner, "call_for", None)
            self._fast[key] = call_for(key) if call_for is not None else self._runner.run
        del prepared  # the work is enqueued (see TensorRTRunner.run); copies may go now
        if self._any_cast:
            outs = self._cast_outputs(outs)
        return unflatten(ex.output_tree, outs)

    def _cast_outputs(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        for i, cast in enumerate(self._out_cast):
            if cast:
                outs[i] = outs[i].to(self._user_out[i])
        return outs

    def _prepare(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        ex = self._exported
        device = self._runner.device
        grad = torch.is_grad_enabled()
        out = []
        for spec, user_dtype, t in zip(ex.inputs, self._user_in, leaves):
            if grad and t.requires_grad:
                raise InputError(
                    f"input {spec.name!r} requires grad, but compiled modules are inference-only and return "
                    "no gradients; pass .detach() or call under torch.inference_mode()")
            if t.dtype != user_dtype:
                if not (self.cast_inputs and safe_cast(t.dtype, user_dtype)):
                    raise InputError(
                        f"input {spec.name!r} has dtype {t.dtype} but the module was compiled for {user_dtype}; "
                        f"pass .to({user_dtype})" + ("" if self.cast_inputs else " or compile with cast_inputs=True"))
                t = t.to(user_dtype)
            if t.device != device and not (device.type == "cuda" and t.device.type == "cuda"
                                           and device.index == t.device.index):
                raise InputError(
                    f"input {spec.name!r} is on {t.device} but this module runs on {device}; move it with "
                    f".to({str(device)!r}) or move the module with .to({str(t.device)!r})")
            why = None if t.shape in self._ok_shapes[spec.name] else spec.check_shape(t.shape)
            if why is None and len(self._ok_shapes[spec.name]) < 64:
                self._ok_shapes[spec.name].add(t.shape)  # a set lookup instead of a per-dim loop
            if why is not None:
                raise _OutOfProfile(spec, tuple(t.shape), f"input {spec.name!r} {why}. "
                                    + widen_hint(spec, t.shape, lazy=self._lazy is not None))
            if spec.torch_dtype != t.dtype and not self._runner_casts:  # fp16/bf16 engines: cast at the boundary
                t = t.to(spec.torch_dtype)
            out.append(t.contiguous())
        return out

    # ------------------------------------------------------------------ lazy mode

    def _build_lazily(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert self._lazy is not None
        with self._lock:
            if self.engine is None:
                got = self._lazy(args, kwargs, self)
                self._load(got.engine, self._lazy_device, prepared=got.prepared, refit_now=got.refit)

    def _widen(self, args: tuple[Any, ...], kwargs: dict[str, Any], err: "_OutOfProfile") -> None:
        with self._lock:
            if self._rebuilds >= self._max_rebuilds:
                raise InputError(f"{err} This lazy module already rebuilt {self._rebuilds} time(s) "
                                 f"(max_rebuilds={self._max_rebuilds}) and rebuilds no more; or compile it with a "
                                 "larger max_rebuilds=.")
            self._rebuilds += 1
            log.info("input %r shape %s is outside the profile %s: rebuilding with a wider profile (%d/%d)",
                     err.spec.name, err.shape, err.spec.profile_str(), self._rebuilds, self._max_rebuilds)
            got = self._lazy(args, kwargs, self)  # type: ignore[misc]
            self._load(got.engine, self._lazy_device, prepared=got.prepared, refit_now=got.refit)

    # ------------------------------------------------------------------ reference and devices

    def run_reference(self, *args: Any, **kwargs: Any) -> Any:
        """Run the exported ONNX graph on ONNX Runtime's CPU provider (the accuracy reference)."""

        ex = self._require()
        if self._reference is None:
            self._reference = OnnxRuntimeRunner(ex.onnx, ex.inputs, ex.outputs, "cpu", half=ex.precision != "fp32")
        leaves = match_inputs(ex.call_tree, bind_call(ex.params, args, kwargs), "")
        inputs = [t.detach().cpu().to(s.torch_dtype).contiguous() for s, t in zip(ex.inputs, leaves)]
        outs = self._reference.run(inputs)
        outs = [o.to(u) for o, u in zip(outs, self._user_out)]
        return unflatten(ex.output_tree, outs)

    def train(self, mode: bool = True) -> "TRTModule":
        # Allowed so a parent's train() works; forward computes inference in either mode (one WARNING).
        return super().train(mode)


class _OutOfProfile(Exception):
    def __init__(self, spec: TensorSpec, shape: tuple[int, ...], message: str) -> None:
        super().__init__(message)
        self.spec, self.shape = spec, shape
