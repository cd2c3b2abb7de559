"""The pipeline, orchestrated: ``compile()`` and ``export_onnx()``.

compile(): settings -> fingerprint lookup in the cache -> (on a miss) export, check, build,
check, store -> a :class:`TRTModule` on the runtime the chain picks. Every stage is its own
module; this one only sequences them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .._build.build import build_with_choice
from .._build.engine import Engine
from .._cache.entries import read_entry, store_entry
from .._cache import fleet as _fleet
from .._cache.keys import content_key, fingerprint, keyed_by_value, timing_cache_name
from .._cache.remote import open_cache
from .._core.inputs import match_inputs
from .._core.modes import eval_semantics, training_modules
from .._core.settings import Settings, freeze_dynamic
from .._core.signature import bind_call, split_inputs
from .._core.spec import ExportedModel
from .._errors import BackendUnavailable, BuildError, ExportError, InputError, TorchTRTError, UnsupportedOutput
from .._export.export import export_with_settings
from .._formats.onnx import initializers_equal
from .._partition.partitioned import PartitionedModule
from .._partition.split import SegmentedModule, compile_split
from .._runtime.module import TRTModule
from .._verify.checks import check_compiled, check_export
from ..backends import BackendChoice, Runner, reusable_runner, select_backend

__all__ = ["STATS", "Compiled", "compile", "compile_engine", "export_onnx"]

log = logging.getLogger(__name__)

#: Counters of the expensive steps in this process (tests assert a warm compile does none).
STATS = {"exports": 0, "builds": 0, "cache_hits": 0}


def compile(model: torch.nn.Module, example_inputs: Any = None, *, dynamic: Any = "batch",
            precision: str = "fp32", backend: str = "auto", cache_dir: Any = None, verify: bool = True,
            **options: Any) -> "TRTModule | SegmentedModule | PartitionedModule":
    """Compile ``model`` into a :class:`TRTModule` that runs on the best runtime here. Under the default
    ``partition="auto"``: a :class:`SegmentedModule` (engines and PyTorch in one graph) where the
    builder refuses some ops or ``torch_executed_ops`` keeps them in PyTorch, and a
    :class:`PartitionedModule` (torch.compile's graphs) for a model that does not export as one graph.

    Args:
        model: an ``nn.Module``. Its inference semantics are compiled (dropout off, BatchNorm running
            statistics), as ``torch.onnx.export`` does; a model in training mode stays in it (one WARNING).
        example_inputs: a tensor, a tuple or list of positional arguments (a list as Torch-TensorRT
            takes them; one list argument is ``([a, b],)``), or ``(args, kwargs)``.
            ``None`` returns a lazy module that builds at its first call.
        dynamic: ``None`` (static shapes), ``"batch"`` (dim 0 of every input dynamic,
            1..max(32, example)), or ``{input_name: {dim: (min, opt, max)}}``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the graph itself is exported in it).
        backend: what builds the engine: ``"auto"``, ``"tensorrt"``, ``"tensorrt_rtx"`` or ``"onnxruntime"``.
        cache_dir: engine cache directory (default: ``$TORCH_TRT_MODULE_CACHE``, then
            ``$XDG_CACHE_HOME/torch_trt_module``, then ``~/.cache/torch_trt_module``).
        verify: check the graph against eager at the example and the profile's corners, and
            the compiled module against eager on the example.
        **options: any other :class:`Settings` field (``runtime``, ``max_batch``, ``targets``,
            ``workspace``, ``optimization_level``, ``tf32``, ``cache``, ``cache_max_size``,
            ``max_rebuilds``, ``cast_inputs``, ``device``, ``rtol``, ``atol``, ``exporter``, ``process_group``,
            ``partition``, ``min_block_size``, ``torch_executed_ops``, ...).

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
        raise InputError(f"compile() takes an nn.Module; got {type(model).__name__}. Fix: wrap the function in a "
                         "torch.nn.Module whose forward calls it")
    said = _say_eval_semantics(model, "compile()")
    with eval_semantics(model):  # inference semantics; every submodule's own mode is restored after
        return _compile_eval(model, example_inputs, settings, options, precision=precision, backend=backend,
                             cache_dir=cache_dir, verify=verify, said=said)


def _compile_eval(model: torch.nn.Module, example_inputs: Any, settings: Settings, options: dict[str, Any], *,
                  precision: str, backend: str, cache_dir: Any, verify: bool, said: bool
                  ) -> "TRTModule | SegmentedModule | PartitionedModule":
    """compile()'s work, with ``model`` in eval mode (inside :func:`eval_semantics`)."""
    device = _device_for(model, settings)
    choice = select_backend(settings.backend, device, runtime=settings.runtime)
    module_options = {"cast_inputs": settings.cast_inputs, "allow_host_code": settings.allow_host_code,
                      "cuda_graphs": settings.cuda_graphs, "runtime": settings.runtime, "source": model,
                      "weights": settings.weights}
    if example_inputs is None:
        state = {"settings": settings}
        told = [said]  # one WARNING about training mode, at compile() or at the first build

        def build(args: tuple[Any, ...], kwargs: dict[str, Any], mod: TRTModule) -> Compiled:
            if mod.engine is not None:  # a rebuild: widen the profile to cover the old one and this call
                state["settings"] = state["settings"].replace(dynamic=freeze_dynamic(_widened(mod, args, kwargs)))
            if not told[0]:
                told[0] = _say_eval_semantics(model, "the lazy module's build")
            settings = state["settings"]
            if settings.process_group is None:  # a first call ranks need not reach together: no collective
                settings = settings.replace(process_group=False)
            with eval_semantics(model):  # the source may have gone back to train() since compile()
                return compile_engine(model, args, kwargs, settings, choice, device)

        return TRTModule.lazy(build, device=device, max_rebuilds=settings.max_rebuilds, **module_options)
    args, kwargs = split_inputs(example_inputs)
    part_options = dict(options, precision=precision, backend=backend, cache_dir=cache_dir, verify=verify)
    if settings.torch_executed_ops and settings.partition != "never":
        return _split(model, args, kwargs, settings, choice, part_options, "torch_executed_ops is set")
    try:
        got = compile_engine(model, args, kwargs, settings, choice, device)
    except ExportError as e:
        if settings.partition != "auto" or isinstance(e, UnsupportedOutput):
            raise
        return _partitioned(model, e, part_options)
    if settings.partition != "never" and choice.build != "onnxruntime" and got.engine.backend == "onnxruntime":
        # The builder refused the graph (logged in _build): engines for the parts it takes instead.
        try:
            split = _split(model, args, kwargs, settings, choice, part_options, "the builder refused the graph")
        except TorchTRTError as e:
            log.warning("%s: the graph could not be split (%s); it runs whole on the next runtime",
                        type(model).__name__, str(e).splitlines()[0][:300])
        else:
            if split.engines:
                return split
            # No part became an engine: the whole graph on the next runtime is the same PyTorch on a
            # GPU (its program), and ONNX Runtime on a CPU.
            log.info("%s: no part of the graph became an engine (%s); it runs whole on the next runtime",
                     type(model).__name__, split.extra_repr())

    def rebuild() -> Engine:  # for an engine whose weights are folded into its graph (TorchScript export)
        with eval_semantics(model):  # called later, whatever mode the source is in by then
            return compile_engine(model, args, kwargs, settings, choice, device).engine

    return TRTModule(got.engine, device=device, prepared=got.prepared, refit_now=got.refit, rebuild=rebuild,
                     **module_options)


def _split(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
           choice: BackendChoice, options: dict[str, Any], why: str) -> "SegmentedModule":
    log.info("%s: %s; splitting its graph into engines and PyTorch (partition=%r)", type(model).__name__, why,
             settings.partition)
    options = {k: v for k, v in options.items() if v is not None}
    return compile_split(model, args, kwargs, settings, choice.build, options, compile_fn=compile)


def _partitioned(model: torch.nn.Module, error: ExportError, options: dict[str, Any]) -> PartitionedModule:
    log.warning("%s does not export as one graph (%s). partition='auto': torch.compile splits it at its graph "
                "breaks, each graph becomes an engine where it can and runs in PyTorch where it cannot "
                "(ttm.explain() lists them; partition='never' raises instead)",
                type(model).__name__, str(error).splitlines()[0])  # ours: written to be read whole
    # Each graph gets the same options; partition="split" inside: a graph may be split into engines
    # and PyTorch, but never captured by torch.compile again. Its profile comes from torch.compile.
    options = {k: v for k, v in options.items() if k != "dynamic" and v is not None}
    options["partition"] = "split"
    return PartitionedModule(model, options, str(error), compile_fn=_compile_part)


def _compile_part(model: torch.nn.Module, example_inputs: Any = None, **options: Any) -> Any:
    """compile(), looked up at each call: a PartitionedModule's graph compiles at its first call,
    maybe long after compile() returned, with this module's compile() as it is then."""
    return compile(model, example_inputs, **options)


def export_onnx(model: torch.nn.Module, example_inputs: Any, *, dynamic: Any = "batch", precision: str = "fp32",
                exporter: str = "auto", opset: int | None = None, max_batch: int | None = None, verify: bool = True,
                keep_fp32: bool = True) -> ExportedModel:
    """Export ``model`` to ONNX with dynamic axes and check it against eager (at the example and the
    profile's min, max and an off-opt shape). Its inference semantics, as :func:`compile`.

    Example:
        >>> exported = export_onnx(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4))
        >>> exported.input_names, exported.inputs[0].profile_str()
        (['input'], '(1..32, 4)')
    """
    settings = Settings.from_options(dynamic=dynamic, precision=precision, exporter=exporter, opset=opset,
                                     max_batch=max_batch, verify=verify, keep_fp32=keep_fp32)
    args, kwargs = split_inputs(example_inputs)
    with eval_semantics(model):  # as compile(): the inference semantics, the model's modes left as they were
        return _export(model, args, kwargs, settings)


def _say_eval_semantics(model: torch.nn.Module, what: str) -> bool:
    """One WARNING where ``model`` (or a submodule) is in training mode: the engine computes its inference
    semantics, as ``torch.onnx.export`` does by default. True if it said so."""
    training = training_modules(model)
    if not training:
        return False
    which = ("it is" if training[0] == "" else
             f"{len(training)} of its submodules are ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''})")
    log.warning("%s: %s in training mode; %s compiles its inference semantics (dropout off, BatchNorm running "
                "statistics), as torch.onnx.export does, and leaves every submodule's mode as it was. The compiled "
                "module always computes inference", type(model).__name__, which, what)
    return True


def _device_for(model: torch.nn.Module, settings: Settings) -> torch.device:
    if settings.device is not None:
        device = torch.device(settings.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            # Said here, before the export: otherwise torch's own "Found no NVIDIA driver" comes from deep
            # inside the runtime chain, after the work.

            raise BackendUnavailable(
                f"device={settings.device!r} asks for a CUDA GPU, but torch sees none here "
                f"(torch.cuda.is_available() is False; torch {torch.__version__}). Fix: pass device='cpu' or leave "
                "device= out (the model's own device), or run on a machine with a GPU and a CUDA build of torch")
        return device
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Compiled:
    """What :func:`compile_engine` found or made: the engine, a runner made on the way (an ONNX Runtime
    session, or a cache hit's loaded TensorRT engine) or None, and whether the engine holds other
    weights than the model's (a ``weights="follow"`` hit of the same structure: refit it first)."""

    engine: Engine
    prepared: Runner | None = None
    refit: bool = False


def compile_engine(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                   choice: BackendChoice, device: torch.device) -> Compiled:
    """Find the engine in the cache (local, then a remote store if set), or export, build and store it.
    Across a torch.distributed group: one rank per target builds, the others receive it (_fleet)."""
    if settings.cache is False:
        return _export_and_build(model, args, kwargs, settings, choice, device)

    if (group := _fleet.fleet_group(settings)) is not None:
        return _fleet.compile_in_fleet(group, model, args, kwargs, settings, choice, device,  # type: ignore[no-any-return]
                                lambda alone: compile_engine(model, args, kwargs, alone, choice, device))
    cache = open_cache(settings)  # the local directory, read through the remote store if one is set

    def rebuild(exported: ExportedModel) -> Engine:
        return _build(exported, settings, choice, device)[0]

    # weights="follow": entries are keyed by structure, and a hit is refit to the model's weights.
    follow = not keyed_by_value(settings)
    fp = fingerprint(model, args, kwargs, settings, choice, device)
    with cache.lock(fp) if fp is not None else contextlib.nullcontext():
        key = cache.lookup(fp) if fp is not None else None
        # The session is made while the entry is read (from ONNX Runtime's optimized graph where this
        # machine has one: ~5x faster than optimizing the graph again). With weights="follow" it
        # holds the entry's weights: kept where they are the model's (the same checkpoint in a new
        # process), else dropped and the module makes one with the model's weights patched in.
        hit = read_entry(cache, key, device, choice, rebuild) if key else None
        refit = follow
        if hit is not None and follow:
            if not hit[0].exported.weights:
                hit = None  # a TorchScript graph with its weights folded: found by structure, but not refittable
            elif _holds_weights(hit[0], model):
                refit = False
            else:
                hit = (hit[0], None)
        if hit is not None:
            STATS["cache_hits"] += 1
            log.info("engine cache hit %s (no export, no build%s)", key[:16] if key else "",
                     "; refit to the model's weights" if refit else "")
            return Compiled(hit[0], hit[1], refit=refit)
        log.info("engine cache miss for fingerprint %s: exporting and building", fp[:16] if fp else "(none)")
        exported = _export(model, args, kwargs, settings)
        key = content_key(exported.onnx, exported.to_meta(), settings, choice, device)
        with cache.lock(key):
            hit = read_entry(cache, key, device, choice, rebuild, session=not follow)
            if hit is not None:
                got = Compiled(hit[0], hit[1], refit=follow and bool(exported.weights))
            else:
                aux_name = timing_cache_name(choice, device)
                engine, facts = _build(exported, settings, choice, device,
                                       cache.read_aux(aux_name) if aux_name else None)
                checked = _check_built(engine, model, args, kwargs, settings, device)
                got = Compiled(engine, store_entry(cache, key, engine, device, choice) or checked)
                if aux_name and facts.get("timing_cache"):
                    cache.write_aux(aux_name, facts["timing_cache"])
        if fp is not None:
            cache.record(fp, key)
        return got


def _holds_weights(engine: Engine, model: torch.nn.Module) -> bool:
    """Whether the engine's graph holds exactly the model's weights (then a hit needs no refit)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    values = {}
    for init, (source, _, _) in engine.exported.weights.items():
        t = tensors.get(source)
        if t is None:
            return False
        values[init] = t
    with torch.no_grad():
        return initializers_equal(engine.onnx, values)


def _export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings
            ) -> ExportedModel:
    STATS["exports"] += 1
    exported, check = export_with_settings(model, args, kwargs, settings)
    if settings.verify:
        check_export(exported, check, settings)
    return exported


def _build(exported: ExportedModel, settings: Settings, choice: BackendChoice, device: torch.device,
           timing: bytes | None = None) -> tuple[Engine, dict[str, Any]]:
    STATS["builds"] += 1
    try:
        return build_with_choice(exported, settings, choice, device, timing)
    except BuildError as e:
        if settings.partition == "never" or choice.build == "onnxruntime":
            raise
        # partition="auto": the graph keeps its ONNX graph and PyTorch program without a plan, and
        # runs on the next runtime of the chain (never a wrong result: the checks still run).
        log.warning("%s cannot build this graph (%s). partition='auto': it runs without an engine, on ONNX "
                    "Runtime here or on the PyTorch program on a GPU (partition='never' raises instead)",
                    choice.build, " ".join(line.strip() for line in str(e).splitlines()[:3])[:400])
        fallback = BackendChoice("onnxruntime", choice.run, f"{choice.build} cannot build the graph")
        return build_with_choice(exported, settings, fallback, device, None)


def _export_and_build(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                      choice: BackendChoice, device: torch.device) -> Compiled:
    engine, _ = _build(_export(model, args, kwargs, settings), settings, choice, device)
    return Compiled(engine, _check_built(engine, model, args, kwargs, settings, device))


def _check_built(engine: Engine, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 settings: Settings, device: torch.device) -> Runner | None:
    """Check the built engine against eager (``verify=True``), and give back the runner the check ran
    where the returned module can take it (backends.reusable_runner)."""
    if not settings.verify:
        return None
    module = TRTModule(engine, device=device, runtime=settings.runtime)
    check_compiled(module, model, args, kwargs, settings, device)
    return reusable_runner(module.runner)


def _widened(mod: TRTModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, dict[int, tuple[int, int, int]]]:
    """A dynamic= dict covering the module's current profile and this call's shapes."""
    assert mod.engine is not None
    ex = mod.engine.exported
    leaves = match_inputs(ex.call_tree, bind_call(ex.params, args, kwargs), "")
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
