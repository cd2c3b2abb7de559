"""All options of compile() in one frozen dataclass.

Each field is marked ``engine=True`` when it changes the built engine and
``engine=False`` when it only changes how the engine is used. The cache key is
derived from those marks (:meth:`Settings.engine_fields`), so adding a field
cannot silently leave it out of the key: ``tests/core/test_settings.py`` fails for a
field that is not marked one way or the other.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

from .._errors import SettingsError

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_REBUILDS", "DynamicSpec", "Settings", "check_cuda_graphs"]

#: Upper batch bound of the ``dynamic="batch"`` profile when nothing else is said.
DEFAULT_MAX_BATCH = 32
#: How many times a lazy module may widen its profile and rebuild before it raises.
DEFAULT_MAX_REBUILDS = 4

PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = ("auto", "tensorrt", "tensorrt_rtx", "onnxruntime")
RUNTIMES = ("auto", "tensorrt", "tensorrt_rtx", "onnxruntime", "torch")
#: What the PyTorch runtime does with the captured program: "auto" (inference passes, then
#: TorchInductor on a GPU), "inductor", "passes" (the passes only) or "none" (the program as captured).
OPTIMIZE = ("auto", "inductor", "passes", "none")
#: The version of those passes and of how Inductor is called: in the cache key (bump on any change).
OPTIMIZE_VERSION = "bnfold-1+linear-perm-1+linear-merge-1+casts-1+inductor-4+sdpa-2"
EXPORTERS = ("auto", "dynamo", "torchscript")
#: "follow" (refit when the source's weights change, seen by a cheap per-call signature), "exact"
#: (follow, plus a bitwise comparison with a copy at every call: also sees writes through p.data)
#: or "snapshot" (keep the compiled weights). See docs/weights-and-refit.md.
WEIGHT_MODES = ("follow", "exact", "snapshot")

# The user-facing form: None, "batch", or {input: {dim: (min, opt, max)}}.
# Settings keep a hashable, sorted form of the dict so the dataclass can be frozen.
DynamicSpec = Union[None, str, Mapping[str, Mapping[int, tuple[int, int, int]]]]
_FrozenDynamic = Union[None, str, tuple[tuple[str, tuple[tuple[int, tuple[int, int, int]], ...]], ...]]


def _engine(default: Any, *, version: Callable[[], str] | None = None) -> Any:
    # version: a field whose meaning is code (the GPU runtime's passes) keys that code's version too
    return field(default=default, metadata={"engine": True, "version": version})


def _runtime(default: Any) -> Any:
    return field(default=default, metadata={"engine": False})


@dataclass(frozen=True)
class Settings:
    """Every option of :func:`torch_trt_module.compile`, validated and frozen.

    ``None`` always means "the documented default".

    Example:
        >>> s = Settings.from_options(precision="fp16", dynamic={"x": {0: (1, 4, 8)}})
        >>> s.precision, s.engine_fields()["precision"]
        ('fp16', 'fp16')
    """

    # --- fields that change the engine (part of the cache key) ---
    dynamic: _FrozenDynamic = _engine("batch")
    max_batch: int = _engine(DEFAULT_MAX_BATCH)
    precision: str = _engine("fp32")
    exporter: str = _engine("auto")
    opset: int | None = _engine(None)
    targets: tuple[str, ...] | None = _engine(None)
    workspace: int | None = _engine(None)
    optimization_level: int | None = _engine(None)
    # "auto": what cannot become an engine runs elsewhere: graph breaks (_partition), parts of a graph
    # (_segments); "split": parts of a graph only; "never": raise. In the key: under "auto" a graph
    # the builder refuses is stored without a plan.
    partition: str = _engine("auto")
    # Under partition="auto"/"split": the smallest engine part (in ops), and ATen ops kept in PyTorch.
    min_block_size: int = _engine(5)
    torch_executed_ops: tuple[str, ...] | None = _engine(None)
    tf32: bool = _engine(True)
    keep_fp32: bool = _engine(True)  # fp16/bf16: norms, softmax, reductions stay fp32 (autocast style)
    # The PyTorch runtime's optimizations (backends/_torch_passes.py); its version is keyed too.
    optimize: str = _engine("auto", version=lambda: OPTIMIZE_VERSION)

    # --- fields that only change how the engine is used ---
    backend: str = _runtime("auto")  # the resolved backend and its version enter the key instead
    runtime: str = _runtime("auto")  # what runs the engine here (backends.choose_runtime)
    weights: str = _runtime("follow")  # WEIGHT_MODES: follow the source's weights (refit on change) or not
    device: str | None = _runtime(None)  # the GPU identity enters the key, never the index
    verify: bool = _runtime(True)
    rtol: float | None = _runtime(None)
    atol: float | None = _runtime(None)
    # True (the local directory, and $TORCH_TRT_MODULE_REMOTE_CACHE's store if set), False (none), a
    # redis:// URL or a store object (_store.Store): the local directory read through that store.
    cache: Any = _runtime(True)
    cache_dir: str | None = _runtime(None)
    cache_max_size: int | None = _runtime(None)
    max_rebuilds: int = _runtime(DEFAULT_MAX_REBUILDS)
    cast_inputs: bool = _runtime(False)
    # False; True (a graph per input shape); "auto" (a graph where it was measured to be faster:
    # backends/_autographs; on the CPU and on ONNX Runtime it asks for nothing)
    cuda_graphs: bool | str = _runtime("auto")
    allow_host_code: bool = _runtime(False)
    progress: bool | None = _runtime(None)
    # None: the default group when torch.distributed is initialized with several ranks; a
    # ProcessGroup; False: this rank compiles alone (_fleet).
    process_group: Any = _runtime(None)

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("runtime", self.runtime, RUNTIMES)
        _check_choice("weights", self.weights, WEIGHT_MODES)
        _check_choice("partition", self.partition, ("auto", "split", "never"))
        _check_choice("optimize", self.optimize, OPTIMIZE)
        check_cuda_graphs(self.cuda_graphs)
        if not isinstance(self.min_block_size, int) or self.min_block_size < 1:
            raise SettingsError(f"option 'min_block_size' got {self.min_block_size!r}; expected an int >= 1 (the "
                                "fewest ops an engine part may have)")
        _check_choice("exporter", self.exporter, EXPORTERS)
        _check_cache(self.cache)
        _check_process_group(self.process_group)
        if isinstance(self.dynamic, str) and self.dynamic != "batch":
            raise SettingsError(
                f"option 'dynamic' got {self.dynamic!r}; expected None, 'batch', or a dict "
                "like {'x': {0: (1, 8, 32)}} mapping input names to {dim: (min, opt, max)}"
            )
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise SettingsError(f"option 'max_batch' got {self.max_batch!r}; expected a positive int")
        if not isinstance(self.max_rebuilds, int) or self.max_rebuilds < 0:
            raise SettingsError(f"option 'max_rebuilds' got {self.max_rebuilds!r}; expected an int >= 0")
        if self.optimization_level is not None and self.optimization_level not in range(6):
            raise SettingsError(
                f"option 'optimization_level' got {self.optimization_level!r}; expected 0..5 or None"
            )
        if self.workspace is not None and (not isinstance(self.workspace, int) or self.workspace <= 0):
            raise SettingsError(f"option 'workspace' got {self.workspace!r}; expected a size in bytes > 0")

    @classmethod
    def from_options(cls, **options: Any) -> "Settings":
        """Build settings from compile()'s keyword options, rejecting unknown names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SettingsError(
                f"unknown option(s) {unknown}; compile() accepts: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in options.items() if v is not None or k in _NONE_MEANINGFUL}
        if "dynamic" in values:
            values["dynamic"] = freeze_dynamic(values["dynamic"])
        if values.get("torch_executed_ops") is not None:
            values["torch_executed_ops"] = normalize_ops(values["torch_executed_ops"])
        if values.get("targets") is not None:
            values["targets"] = normalize_targets(values["targets"])
        if values.get("cache_dir") is not None:
            values["cache_dir"] = os.fspath(values["cache_dir"])
        if values.get("device") is not None:
            values["device"] = str(values["device"])
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def follows_weights(self) -> bool:
        """Whether compiled modules follow the source's weights ("follow" or "exact"): engines are then
        refittable and cached by structure. "exact" differs only in how a call looks for a change,
        so everything built or cached treats the two alike."""
        return self.weights in ("follow", "exact")

    def engine_fields(self) -> dict[str, Any]:
        """The JSON-able values of every field that changes the engine (for the cache key)."""
        return {
            f.name: _jsonable(getattr(self, f.name)) if f.metadata.get("version") is None
            else f"{getattr(self, f.name)}@{f.metadata['version']()}"
            for f in dataclasses.fields(self)
            if f.metadata["engine"]
        }

    def dynamic_dict(self) -> DynamicSpec:
        """``dynamic`` in the user-facing form."""
        d = self.dynamic
        if d is None or isinstance(d, str):
            return d
        return {name: {dim: rng for dim, rng in dims} for name, dims in d}


# "dynamic=None" means static shapes, not "default"; every other None means default.
_NONE_MEANINGFUL = frozenset({"dynamic"})


def check_cuda_graphs(value: object) -> None:
    """Raise SettingsError unless ``value`` is a ``cuda_graphs`` option: False, True or "auto"."""
    if type(value) not in (bool, str) or value not in (False, True, "auto"):
        raise SettingsError(f"option 'cuda_graphs' got {value!r}; expected False, True (a CUDA graph for each "
                            "input shape) or 'auto' (a graph for the shapes where it makes the call faster)")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"option {name!r} got {value!r}; expected one of {', '.join(map(repr, choices))}")


def _check_cache(cache: object) -> None:
    if isinstance(cache, bool):
        return
    if isinstance(cache, str):
        if cache.split("://", 1)[0] in ("redis", "rediss", "unix"):
            return
    elif all(callable(getattr(cache, m, None)) for m in ("get", "put", "lease", "stats")):
        return  # a store (_store.Store); hashed by identity, so Settings stays hashable
    raise SettingsError(f"option 'cache' got {cache!r}; expected True, False, a Redis URL such as "
                        "'redis://host:6379/0', or a store object with get, put, lease and stats methods")


def _check_process_group(group: object) -> None:
    if group is None or group is False:
        return
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise SettingsError(f"option 'process_group' got {group!r}; expected a torch.distributed ProcessGroup "
                            "(every rank of it calls compile() with the same model), None (the default group when "
                            "torch.distributed is initialized) or False (this rank compiles alone)")


def freeze_dynamic(dynamic: Any) -> _FrozenDynamic:
    """Validate a ``dynamic=`` value and turn a dict into a sorted, hashable tuple."""
    if dynamic is None or dynamic == "batch":
        return dynamic  # type: ignore[no-any-return]
    if isinstance(dynamic, str):
        raise SettingsError(
            f"option 'dynamic' got {dynamic!r}; expected None, 'batch', or {{'x': {{0: (1, 8, 32)}}}}"
        )
    if not isinstance(dynamic, Mapping):
        raise SettingsError(
            f"option 'dynamic' got a {type(dynamic).__name__}; expected None, 'batch', or a dict "
            "{input_name: {dim: (min, opt, max)}}"
        )
    out = []
    for name, dims in dynamic.items():
        if not isinstance(name, str) or not isinstance(dims, Mapping):
            raise SettingsError(
                f"option 'dynamic' entry {name!r}: expected {{dim: (min, opt, max)}} keyed by an input name"
            )
        frozen_dims = []
        for dim, rng in dims.items():
            if not isinstance(dim, int) or isinstance(dim, bool):
                raise SettingsError(f"option 'dynamic' for input {name!r}: dim {dim!r} is not an int")
            try:
                lo, opt, hi = (int(v) for v in rng)
            except (TypeError, ValueError) as e:
                raise SettingsError(
                    f"option 'dynamic' for input {name!r} dim {dim}: got {rng!r}; expected (min, opt, max)"
                ) from e
            if not 0 <= lo <= opt <= hi:
                raise SettingsError(
                    f"option 'dynamic' for input {name!r} dim {dim}: got (min, opt, max) = "
                    f"({lo}, {opt}, {hi}); expected 0 <= min <= opt <= max"
                )
            frozen_dims.append((dim, (lo, opt, hi)))
        out.append((name, tuple(sorted(frozen_dims))))
    return tuple(sorted(out))


def normalize_targets(targets: Any) -> tuple[str, ...]:
    """``["sm86", "8.9", "SM120"]`` -> ``("sm120", "sm86", "sm89")`` (sorted, de-duplicated)."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    out = set()
    for t in targets:
        s = str(t).strip().lower().replace(".", "").replace("_", "")
        if not s.startswith("sm"):
            s = "sm" + s
        if not s[2:].isdigit():
            raise SettingsError(
                f"option 'targets' got {t!r}; expected compute capabilities like 'sm86', 'sm89', 'sm120'"
            )
        out.add(s)
    if not out:
        raise SettingsError("option 'targets' is empty; pass None for the backend's default targets")
    return tuple(sorted(out))


def normalize_ops(ops: Any) -> tuple[str, ...]:
    """``{torch.ops.aten.nonzero, "aten.sub.Tensor"}`` -> ``("aten.nonzero", "aten.sub.Tensor")`` (ATen op
    packets or overloads, sorted); SettingsError for a name that is not an ATen op."""
    import torch

    if isinstance(ops, str) or not hasattr(ops, "__iter__"):
        ops = [ops]
    out = set()
    for op in ops:
        name = str(op.name() if isinstance(op, torch._ops.OpOverload) else getattr(op, "_qualified_op_name", op))
        name = name.removeprefix("torch.ops.").replace("::", ".")
        parts = name.split(".")
        if len(parts) not in (2, 3) or parts[0] != "aten":
            raise SettingsError(f"option 'torch_executed_ops' got {op!r}; expected ATen ops such as "
                                "torch.ops.aten.nonzero, 'aten.nonzero' or 'aten.sub.Tensor'")
        packet = getattr(torch.ops.aten, parts[1], None)
        try:
            known = packet is not None and (len(parts) == 2 or parts[2] in packet.overloads()
                                            or (parts[2] == "default" and "default" in packet.overloads()))
        except RuntimeError:
            known = False
        if not known:
            raise SettingsError(f"option 'torch_executed_ops' got {op!r}: there is no ATen op {name!r}. Fix: name "
                                "an op of torch.ops.aten (the graph's ops are listed by ttm.explain())")
        out.add(name)
    return tuple(sorted(out))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
