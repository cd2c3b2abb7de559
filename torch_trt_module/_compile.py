"""compile(): settings -> cache lookup -> export -> build -> store -> TRTModule."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable

import torch

from ._build import Engine, build_with_choice
from ._errors import CacheError, EngineLoadError, InputError, TorchTRTError
from ._export import ExportedModel, check_tolerance, export_with_settings
from ._fingerprint import module_fingerprint
from ._module import TRTModule, _can_run
from ._settings import Settings, freeze_dynamic
from ._signature import bind_call, params_of, split_inputs
from ._spec import flatten
from .backends import BackendChoice, backend_version, gpu_identity, rtx_runs_on, select_backend
from .backends._onnxruntime import optimized_graph_name

__all__ = ["STATS", "compile", "content_key"]

log = logging.getLogger(__name__)

#: Counters of the expensive steps in this process (tests assert a warm compile does none).
STATS = {"exports": 0, "builds": 0, "cache_hits": 0}


def compile(model: torch.nn.Module, example_inputs: Any = None, *, dynamic: Any = "batch",
            precision: str = "fp32", backend: str = "auto", cache_dir: Any = None, verify: bool = True,
            **options: Any) -> TRTModule:
    """Compile ``model`` into a :class:`TRTModule` that runs on the best backend here.

    Args:
        model: an ``nn.Module`` in eval mode.
        example_inputs: a tensor, a tuple of positional arguments, or ``(args, kwargs)``.
            ``None`` returns a lazy module that builds at its first call.
        dynamic: ``None`` (static shapes), ``"batch"`` (dim 0 of every input dynamic,
            1..max(32, example)), or ``{input_name: {dim: (min, opt, max)}}``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the graph itself is exported in it).
        backend: ``"auto"``, ``"tensorrt"``, ``"tensorrt_rtx"`` or ``"onnxruntime"``.
        cache_dir: engine cache directory (default: ``$TORCH_TRT_MODULE_CACHE``, then
            ``$XDG_CACHE_HOME/torch_trt_module``, then ``~/.cache/torch_trt_module``).
        verify: check ONNX Runtime against eager on the example inputs after a build.
        **options: any other :class:`Settings` field (``max_batch``, ``targets``, ``workspace``,
            ``optimization_level``, ``tf32``, ``cache``, ``cache_max_size``, ``max_rebuilds``,
            ``cast_inputs``, ``device``, ``rtol``, ``atol``, ``exporter``, ``opset``, ...).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> trt_model = compile(model, torch.randn(4, 3, 224, 224))   # doctest: +SKIP
        >>> trt_model(torch.randn(8, 3, 224, 224)).shape               # doctest: +SKIP
        torch.Size([8, 1000])
    """
    settings = Settings.from_options(dynamic=dynamic, precision=precision, backend=backend,
                                     cache_dir=cache_dir, verify=verify, **options)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile() takes an nn.Module; got {type(model).__name__}")
    if model.training:
        raise InputError("the model is in training mode; compile() builds inference engines: call model.eval() "
                         "first (dropout and batch-norm statistics differ between the modes)")
    device = _device_for(model, settings)
    choice = select_backend(settings.backend, device)
    module = TRTModule(cast_inputs=settings.cast_inputs, allow_host_code=settings.allow_host_code,
                       cuda_graphs=settings.cuda_graphs)
    module._lazy_device = device
    module._max_rebuilds = settings.max_rebuilds
    state = {"settings": settings}

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], mod: TRTModule) -> Engine:
        if mod.engine is not None:  # a rebuild: widen the profile to cover the old one and this call
            state["settings"] = state["settings"].replace(dynamic=freeze_dynamic(_widened(mod, args, kwargs)))
        return compile_engine(model, args, kwargs, state["settings"], choice, device)

    if example_inputs is None:
        module._lazy = build
        return module
    args, kwargs = split_inputs(example_inputs)
    engine = compile_engine(model, args, kwargs, settings, choice, device)
    module._load(engine, device)
    return module


def _device_for(model: torch.nn.Module, settings: Settings) -> torch.device:
    if settings.device is not None:
        return torch.device(settings.device)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def compile_engine(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                   choice: BackendChoice, device: torch.device) -> Engine:
    """Find the engine in the cache, or export, build and store it."""
    if not settings.cache:
        return _export_and_build(model, args, kwargs, settings, choice, device)[0]
    from ._cache import EngineCache

    cache = EngineCache(settings.cache_dir, max_size=settings.cache_max_size)
    fp = fingerprint(model, args, kwargs, settings, choice, device)
    with cache.lock(fp):
        key = cache.lookup(fp)
        engine = _cached(cache, key, device, settings, choice) if key else None
        if engine is not None:
            STATS["cache_hits"] += 1
            log.info("engine cache hit %s (no export, no build)", key[:16] if key else "")
            return engine
        log.info("engine cache miss for fingerprint %s: exporting and building", fp[:16])
        exported = _export(model, args, kwargs, settings)
        key = content_key(exported.onnx, exported.to_meta(), settings, choice, device)
        with cache.lock(key):
            engine = _cached(cache, key, device, settings, choice)
            if engine is None:
                aux_name = _timing_cache_name(choice, device)
                timing = cache.read_aux(aux_name) if aux_name else None
                engine = _build(exported, settings, choice, device, timing)
                _check_compiled(engine, model, args, kwargs, settings, device)
                blobs = {"onnx": engine.onnx}
                if engine.plan is not None:
                    blobs["engine"] = engine.plan
                if choice.run == "onnxruntime":
                    blobs.update(_session_keeping_optimized(engine, device))
                cache.put(key, blobs, {"engine_meta": engine.meta, "backend": engine.backend})
                new_timing = getattr(engine, "_timing_cache", None)
                if aux_name and new_timing:
                    cache.write_aux(aux_name, new_timing)
        cache.record(fp, key)
        return engine


def _cached(cache: Any, key: str | None, device: torch.device, settings: Settings,
            choice: BackendChoice) -> Engine | None:
    if key is None:
        return None
    # An engine that will not run here (an RTX plan on a machine without a supported GPU) is
    # only needed for state_dict()/save(): read and checksum it then, not on every warm start.
    defer = () if choice.run == choice.build else ("engine",)
    only = {"onnx", "engine"}
    if choice.run == "onnxruntime":
        # Read here, and checked while ONNX Runtime loads them (_onnx_and_session); ORT's
        # optimized copies made by other ORT versions or on other CPUs are left alone.
        mine = {n for n in (optimized_graph_name(half=False), optimized_graph_name(half=True)) if n}
        defer += ("onnx", *mine)
        only |= mine
    entry = cache.get(key, defer=defer, only=only)
    if entry is None:
        return None
    try:
        meta = entry.meta["engine_meta"]
        onnx, runner = entry.blobs.get("onnx"), None
        if "onnx" in entry.deferred:
            onnx, runner = _onnx_and_session(entry.deferred, meta, device)
        if "engine" in entry.deferred:
            blob = entry.deferred["engine"]
            engine = Engine(entry.meta["backend"], None, onnx, meta, plan_size=blob.size,
                            plan_loader=_plan_loader(blob, cache, key, onnx, meta, settings, choice, device))
        else:
            engine = Engine(entry.meta["backend"], entry.blobs.get("engine"), onnx, meta)
        if runner is not None:
            engine._offer_runner(runner)
        engine.exported  # parses the metadata: a malformed entry fails here, not in forward
        if engine.backend == "tensorrt_rtx" and rtx_runs_on(device) and engine.plan is not None:
            from .backends._trt_loader import engine_validity

            why = engine_validity(engine.plan, backend="tensorrt_rtx")
            if why is not None:
                raise EngineLoadError(f"TensorRT-RTX says the engine cannot load on this GPU: {why}")
        if _can_run(engine, device):
            TRTModule(engine, device=device)  # deserializes: an engine that cannot load fails here
    except CacheError as e:  # a deferred blob failed its checksum; it evicted the entry
        log.warning("%s; rebuilding", e)
        return None
    except (KeyError, TypeError, ValueError, EngineLoadError) as e:
        log.warning("cache entry %s cannot be used (%s); evicting and rebuilding", key[:16], e)
        cache.evict(key)
        return None
    return engine


def _onnx_and_session(deferred: dict[str, Any], meta: dict[str, Any], device: torch.device) -> tuple[bytes, Any]:
    """Read the ONNX blob (and ONNX Runtime's optimized copy of it, if this machine has one),
    then make the session from those bytes while their sha256 is computed (both release the
    GIL). Only checked bytes are used: a mismatch raises CacheError and the session is dropped.
    The session is the bulk of a warm compile()."""
    from concurrent.futures import ThreadPoolExecutor

    from .backends import normalize_device
    from .backends._onnxruntime import OnnxRuntimeRunner

    ex = ExportedModel.from_meta(b"", meta["model"])
    half = ex.precision != "fp32"
    blob, opt_blob = deferred["onnx"], deferred.get(optimized_graph_name(half=half) or "")
    data = blob.read()
    opt = opt_blob.read() if opt_blob is not None else None
    with ThreadPoolExecutor(1, thread_name_prefix="torch_trt_module-ort") as pool:
        made = pool.submit(OnnxRuntimeRunner, data, ex.inputs, ex.outputs, normalize_device(device), half=half,
                           optimized=opt)
        try:
            blob.check(data)
            if opt_blob is not None:
                opt_blob.check(opt)
        finally:
            if not made.done():
                made.add_done_callback(lambda f: f.exception())  # a dropped session's error is not news
        try:
            runner = made.result()
        except Exception:  # noqa: BLE001 - TRTModule makes it again and reports the error there
            runner = None
    return data, runner


def _session_keeping_optimized(engine: Engine, device: torch.device) -> dict[str, bytes]:
    """Make the module's ONNX Runtime session, keeping ORT's optimized copy of the graph for
    the cache entry (warm hits then load that copy, about twice as fast). The session is offered
    to the TRTModule that compile() makes next. Empty where no copy can be made."""
    from .backends import normalize_device
    from .backends._onnxruntime import OnnxRuntimeRunner

    ex = engine.exported
    half = ex.precision != "fp32"
    name = optimized_graph_name(half=half)
    if name is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="torch_trt_module-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        try:
            runner = OnnxRuntimeRunner(engine.onnx, ex.inputs, ex.outputs, normalize_device(device), half=half,
                                       save_optimized=path)
            with open(path, "rb") as f:
                graph = f.read()
        except Exception as e:  # noqa: BLE001 - TRTModule makes the session again and reports any error
            log.debug("no optimized ONNX Runtime graph for the cache: %s", e)
            return {}
    engine._offer_runner(runner)
    return {name: graph}


def _plan_loader(blob: Any, cache: Any, key: str, onnx: bytes, meta: dict[str, Any], settings: Settings,
                 choice: BackendChoice, device: torch.device) -> Callable[[], bytes | None]:
    """Read the deferred plan. If it fails its checksum then, build it again rather than fail
    the caller's save() or state_dict(): the entry was evicted, and the rebuild is stored anew."""

    def load() -> bytes | None:
        try:
            return blob()  # type: ignore[no-any-return]
        except TorchTRTError as e:
            log.warning("%s; building the engine again", e)  # the one WARNING for this fault
        engine = _build(ExportedModel.from_meta(onnx, meta["model"]), settings, choice, device)
        with contextlib.suppress(TorchTRTError, OSError), cache.lock(key):
            cache.put(key, {"onnx": engine.onnx, "engine": engine.plan},
                      {"engine_meta": engine.meta, "backend": engine.backend})
        return engine.plan

    return load


def _export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings) -> Any:
    STATS["exports"] += 1
    return export_with_settings(model, args, kwargs, settings)


def _build(exported: Any, settings: Settings, choice: BackendChoice, device: torch.device,
           timing: bytes | None = None) -> Engine:
    STATS["builds"] += 1
    return build_with_choice(exported, settings, choice, device, timing)


def _export_and_build(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                      choice: BackendChoice, device: torch.device) -> tuple[Engine, Any]:
    exported = _export(model, args, kwargs, settings)
    engine = _build(exported, settings, choice, device)
    _check_compiled(engine, model, args, kwargs, settings, device)
    return engine, exported


def _check_compiled(engine: Engine, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    settings: Settings, device: torch.device) -> None:
    """verify=True: the compiled module against eager on the example inputs, eager in strict fp32
    (TF32 off for that call) and the tolerance policy of what the module computes in."""
    if not settings.verify:
        return
    from ._compare import compare_outputs, reference_numerics
    from ._numerics import strict_fp32

    module = TRTModule(engine, device=device)
    strict = device.type == "cuda"
    with torch.inference_mode():
        with strict_fp32() if strict else contextlib.nullcontext():
            ref = model(*args, **kwargs)
        got = module(*args, **kwargs)
    numerics, how = reference_numerics(module.numerics, eager_tf32=False, strict=strict)
    tolerance = check_tolerance(settings, numerics)
    report = compare_outputs(got, ref, tolerance=tolerance, what=f"compiled ({module.backend})",
                             reference_name="eager")
    report.numerics = f"{how}; {numerics} tolerance policy"
    if not report.passed:
        from ._errors import VerificationError

        raise VerificationError(f"the compiled module does not match eager on the example inputs:\n{report}\n"
                                "Loosen rtol=/atol=, or pass verify=False to skip this check.", report)
    log.info("%s", str(report).splitlines()[0])


def _timing_cache_name(choice: BackendChoice, device: torch.device) -> str | None:
    if choice.build != "tensorrt":
        return None
    from ._cache import stable_hash

    return "timing-" + stable_hash({"gpu": gpu_identity(device), "trt": backend_version("tensorrt")})[:32]


# --------------------------------------------------------------------------- keys

def _target_part(choice: BackendChoice, settings: Settings, device: torch.device) -> dict[str, Any]:
    from ._build import engine_targets
    from .backends._trt_build import builder_flags

    part: dict[str, Any] = {"backend": choice.build, "backend_version": backend_version(choice.build)}
    if choice.build != "onnxruntime":
        part["builder_flags"] = builder_flags(choice.build, cuda_graphs=settings.cuda_graphs)
    if choice.build == "tensorrt":
        part["gpu"] = gpu_identity(device)
    elif choice.build == "tensorrt_rtx":
        targets = engine_targets(choice, settings)
        part["targets"] = list(targets) if targets else "rtx-default"
    return part


def content_key(onnx: bytes, model_meta: dict[str, Any], settings: Settings, choice: BackendChoice,
                device: torch.device) -> str:
    """The cache key: a sha256 over everything that changes the engine and nothing else."""
    from ._cache import CACHE_FORMAT_VERSION, sha256_bytes, stable_hash

    return stable_hash({
        "cache_format": CACHE_FORMAT_VERSION,
        "graph": sha256_bytes(onnx),  # weights are inside the graph
        "inputs": model_meta["inputs"],
        "outputs": model_meta["outputs"],
        "structure": [model_meta["call_tree"], model_meta["output_tree"], model_meta["user_input_dtypes"],
                      model_meta["user_output_dtypes"]],
        "settings": settings.engine_fields(),
        **_target_part(choice, settings, device),
    })


def fingerprint(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                choice: BackendChoice, device: torch.device) -> str:
    """The warm-path index: module content + call structure + shapes + settings + backend."""
    from ._cache import CACHE_FORMAT_VERSION, stable_hash

    bound = bind_call(params_of(model.forward), args, kwargs)
    leaves, tree = flatten(bound, what="input")
    return stable_hash({
        "cache_format": CACHE_FORMAT_VERSION,
        "kind": "fingerprint",
        "module": module_fingerprint(model),
        "call": tree.to_json(),
        "shapes": [[list(t.shape), str(t.dtype)] for t in leaves],
        "settings": settings.engine_fields(),
        "torch": torch.__version__,
        **_target_part(choice, settings, device),
    })


def _widened(mod: TRTModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, dict[int, tuple[int, int, int]]]:
    """A dynamic= dict covering the module's current profile and this call's shapes."""
    ex = mod._exported
    from ._module import _match

    leaves = _match(ex.call_tree, bind_call(ex.params, args, kwargs), "")
    dynamic: dict[str, dict[int, tuple[int, int, int]]] = {}
    for spec, t in zip(ex.inputs, leaves):
        if spec.min is None or spec.max is None or spec.opt is None or t.dim() != spec.rank:
            raise InputError(f"input {spec.name!r} has rank {t.dim()}; the module was compiled for rank {spec.rank}")
        dims = {}
        for d, s in enumerate(t.shape):
            lo, opt, hi = spec.min[d], spec.opt[d], spec.max[d]
            if lo == hi == s:
                continue
            new_hi = max(hi, _next_pow2(s)) if s > hi else hi
            dims[d] = (min(lo, s), opt, new_hi)
        if dims:
            dynamic[spec.name] = dims
    return dynamic


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


_ = (json, time, TorchTRTError)  # re-exported names kept stable for later stages
