"""Export an engine as a Triton Inference Server model repository entry.

Layout (Triton's own)::

    repo_dir/
      model_name/
        config.pbtxt          # ModelConfig in protobuf text format
        1/model.plan          # TensorRT / TensorRT-RTX engine   (platform "tensorrt_plan")
        1/model.onnx          # or the ONNX graph                  (platform "onnxruntime_onnx")

The config is written as text here, so exporting needs no Triton package;
``tests/tools/test_triton.py`` parses every config with Triton's own ModelConfig schema
(``tritonclient.grpc.model_config_pb2``).

Batching. Triton's batcher concatenates requests along a leading batch dimension
that the config leaves out of ``dims``. That is only correct when dim 0 of every
input is one dynamic batch dimension (same profile range, and the exporter's same
symbol where it names them) and dim 0 of every output follows it. Then
``max_batch_size`` defaults to the profile's max batch and ``dims`` drop dim 0;
otherwise ``max_batch_size`` is 0 and ``dims`` are the full shapes. Dynamic dims are
``-1``.

A plan only loads where the server's TensorRT backend is the exact TensorRT (or
TensorRT-RTX) version that built it, on a GPU the plan was built for. A
TensorRT-RTX plan needs a Triton built with TensorRT-RTX; ``platform="onnxruntime_onnx"``
exports the ONNX graph of the same engine instead, which any Triton runs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .._build.engine import Engine
from .._core.dtypes import TABLE
from .._core.io import atomic_write
from .._core.spec import TensorSpec
from .._errors import TritonExportError, TritonRepoExists
from .._runtime.module import TRTModule

__all__ = ["TRITON_DTYPES", "TritonExportError", "TritonRepoExists", "export_triton", "triton_config"]

log = logging.getLogger(__name__)

#: torch dtype names (as in engine metadata) -> Triton ModelConfig DataType names.
TRITON_DTYPES = {d.name: d.triton for d in TABLE if d.triton is not None}
PLATFORMS = ("tensorrt_plan", "onnxruntime_onnx")
_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}
# Model names become directory names and are typed into URLs (v2/models/<name>/infer).
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- config

def _dims(spec: TensorSpec) -> list[int]:
    """-1 for every dynamic dim: from the profile for inputs, the graph's dims for outputs."""
    if spec.min is not None and spec.max is not None:
        return [lo if lo == hi else -1 for lo, hi in zip(spec.min, spec.max)]
    return [d if isinstance(d, int) and d >= 0 else -1 for d in spec.dims]


def _batch_dim(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> tuple[tuple[int, int, int] | None, str]:
    """(min, opt, max) of a batch dim shared by every input and output, or None and why not."""
    if not inputs:
        return None, "the engine has no inputs"
    ranges = []
    for s in inputs:
        if s.rank == 0 or s.min is None or s.max is None or s.opt is None:
            return None, f"input {s.name!r} has no dim 0 with a profile (shape {s.profile_str()})"
        if s.min[0] == s.max[0]:
            return None, f"input {s.name!r} has a static dim 0 (shape {s.profile_str()})"
        ranges.append((s.min[0], s.opt[0], s.max[0]))
    if len({(lo, hi) for lo, _, hi in ranges}) != 1:
        got = ", ".join(f"{s.name}: {lo}..{hi}" for s, (lo, _, hi) in zip(inputs, ranges))
        return None, f"the inputs' dim 0 ranges differ ({got}), so they are not one batch dim"
    symbols = {s.dims[0] for s in inputs}
    shared = next(iter(symbols)) if len(symbols) == 1 and isinstance(next(iter(symbols)), str) else None
    for o in outputs:
        if not o.dims:
            return None, f"output {o.name!r} is a scalar (no batch dim to split results along)"
        d0 = o.dims[0]
        if isinstance(d0, int):
            return None, f"output {o.name!r} has a static dim 0 ({d0}), so it does not follow the batch"
        # Where the exporter names dims (torch.export does), an output's dim 0 must be the
        # inputs' very symbol: 's0 + s1' or '2*s0' would split the batch wrongly.
        if shared is not None and d0 != shared and d0 != "?":
            return None, f"output {o.name!r} dim 0 is {d0!r}, not the inputs' batch dim {shared!r}"
    lo, opt, hi = ranges[0]
    return (lo, min(r[1] for r in ranges), hi), ""


def _preferred(opt: int, max_batch: int) -> list[int]:
    """Powers of two up to max_batch, the profile's opt batch, and max_batch itself."""
    sizes = {max_batch}
    p = 2
    while p < max_batch:
        sizes.add(p)
        p *= 2
    if 1 < opt <= max_batch:
        sizes.add(opt)
    return sorted(sizes)


def _tensor_block(spec: TensorSpec, dims: list[int]) -> str:
    dtype = TRITON_DTYPES.get(spec.dtype)
    if dtype is None:
        raise TritonExportError(
            f"tensor {spec.name!r} has dtype {spec.dtype}, which has no Triton type here; expected one of "
            f"{', '.join(TRITON_DTYPES)}. Fix: cast it in the model before returning or after reading it.")
    lines = [f'    name: "{spec.name}"', f"    data_type: {dtype}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:
        # Triton needs at least one dim: a [batch]-only or scalar tensor is declared as
        # [1] and reshaped to [] (Triton's documented idiom).
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def triton_config(engine: "Engine", model_name: str, *, max_batch_size: int | None = None,
                  dynamic_batching: bool = True, instance_count: int = 1, platform: str | None = None,
                  instance_kind: str | None = None) -> str:
    """The ``config.pbtxt`` text for ``engine`` (what :func:`export_triton` writes).

    Example:
        >>> print(triton_config(engine, "resnet18"))   # doctest: +SKIP
        name: "resnet18"
        platform: "tensorrt_plan"
        max_batch_size: 32
        ...
    """
    _check_name(model_name)
    platform = _platform(engine, platform)
    if not isinstance(instance_count, int) or isinstance(instance_count, bool) or instance_count < 1:
        raise TritonExportError(f"instance_count got {instance_count!r}; expected an int >= 1 "
                                "(instances of the model per GPU, or on the CPU)")
    kind = _kind(platform, instance_kind)
    ex = engine.exported
    inputs, outputs = list(ex.inputs), list(ex.outputs)
    batch, why_not = _batch_dim(inputs, outputs)
    if max_batch_size is None:
        max_batch = batch[2] if batch is not None else 0
        if batch is None:
            log.info("Triton config for %r: no batching (%s); max_batch_size 0, full shapes in dims",
                     model_name, why_not)
    else:
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 0:
            raise TritonExportError(f"max_batch_size got {max_batch_size!r}; expected an int >= 0 "
                                    "(0 turns Triton's batching off) or None for the profile's max batch")
        max_batch = max_batch_size
        if max_batch > 0 and batch is None:
            raise TritonExportError(
                f"max_batch_size={max_batch} asks Triton to batch requests along dim 0, but {why_not}. "
                "Triton's batching needs every input to share one dynamic dim 0 that every output follows. "
                "Fix: pass max_batch_size=0 (no batching; full shapes), or recompile with "
                "dynamic='batch' (or the same {0: (min, opt, max)} range for every input).")
        if batch is not None and max_batch > batch[2]:
            raise TritonExportError(
                f"max_batch_size={max_batch} is larger than the engine's profile allows (batch "
                f"{batch[0]}..{batch[2]}). Fix: pass max_batch_size <= {batch[2]}, or recompile with "
                f"max_batch={max_batch} (or dynamic={{name: {{0: (1, opt, {max_batch})}}}} for each input).")
    if max_batch > 0:
        assert batch is not None
        if batch[0] > 1:
            raise TritonExportError(
                f"the engine's profile starts at batch {batch[0]}, but Triton sends any batch from 1 to "
                f"max_batch_size. Fix: recompile with a profile from 1 (dynamic={{name: {{0: (1, opt, max)}}}}), "
                "or pass max_batch_size=0 and batch on the client side.")
    strip = 1 if max_batch > 0 else 0
    parts = [f'name: "{model_name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}"]
    parts.append("input [\n" + ",\n".join(_tensor_block(s, _dims(s)[strip:]) for s in inputs) + "\n]")
    parts.append("output [\n" + ",\n".join(_tensor_block(s, _dims(s)[strip:]) for s in outputs) + "\n]")
    if max_batch > 0 and dynamic_batching:
        assert batch is not None
        sizes = ", ".join(map(str, _preferred(batch[1], max_batch)))
        parts.append(f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n}}")
    group = [f"    count: {instance_count}", f"    kind: {kind}"]
    if platform == "tensorrt_plan":
        # Our engines have exactly one optimization profile, index 0; naming it pins every
        # instance to it (Triton's field for TensorRT profiles is instance_group.profile).
        group.append('    profile: [ "0" ]')
    parts.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    return "\n".join(parts) + "\n"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 255:
        raise TritonExportError(
            f"model_name {name!r} is not a valid Triton model name: it becomes a directory name and part of "
            "request URLs. Expected letters, digits, '_', '-' and '.', not starting with '.' or '-' "
            "(e.g. 'resnet18' or 'bert_base-v2'). Fix: rename it, e.g. "
            f"{re.sub(r'[^A-Za-z0-9_.-]', '_', str(name)).lstrip('.-') or 'model'!r}.")


def _platform(engine: "Engine", platform: str | None) -> str:
    if platform is None:
        return "tensorrt_plan" if engine.has_plan else "onnxruntime_onnx"
    if platform not in PLATFORMS:
        raise TritonExportError(f"platform got {platform!r}; expected one of {', '.join(map(repr, PLATFORMS))}")
    if platform == "tensorrt_plan" and not engine.has_plan:
        raise TritonExportError(
            f"platform='tensorrt_plan' needs a TensorRT engine, but this engine was built for {engine.backend} and "
            "has no plan. Fix: pass platform='onnxruntime_onnx' (or leave it None), or compile with "
            "backend='tensorrt' / 'tensorrt_rtx'.")
    return platform


def _kind(platform: str, instance_kind: str | None) -> str:
    if instance_kind is None:
        return "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    kind = "KIND_" + instance_kind.upper().removeprefix("KIND_")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise TritonExportError(f"instance_kind got {instance_kind!r}; expected 'gpu' or 'cpu'")
    if platform == "tensorrt_plan" and kind != "KIND_GPU":
        raise TritonExportError("a TensorRT plan runs on a GPU only; instance_kind must be 'gpu' (or None)")
    return kind


# --------------------------------------------------------------------------- files

def export_triton(compiled_or_engine: Any, repo_dir: str | os.PathLike[str], model_name: str, *,
                  max_batch_size: int | None = None, dynamic_batching: bool = True, instance_count: int = 1,
                  version: int = 1, platform: str | None = None, instance_kind: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write ``repo_dir/model_name/{config.pbtxt, <version>/model.plan|model.onnx}`` for Triton.

    Args:
        compiled_or_engine: a :class:`TRTModule` (its ``.engine``) or an :class:`Engine`.
        repo_dir: the model repository (``tritonserver --model-repository=repo_dir``).
        model_name: the model's name in Triton (letters, digits, ``_ - .``).
        max_batch_size: Triton's ``max_batch_size``. None: the profile's max batch when every
            input shares a dynamic dim 0 (else 0). 0: no batching, full shapes in ``dims``.
        dynamic_batching: add ``dynamic_batching`` with preferred sizes (ignored when
            ``max_batch_size`` is 0).
        instance_count: model instances per GPU (or on the CPU).
        version: the version directory to write (an int >= 1).
        platform: ``"tensorrt_plan"`` or ``"onnxruntime_onnx"``. None: the plan when the
            engine has one, else its ONNX graph.
        instance_kind: ``"gpu"`` or ``"cpu"``. None: GPU for plans; for ONNX, the device of
            the module given (CPU for an ``Engine``).
        overwrite: replace an existing, non-empty version directory and a differing config.

    Returns:
        The model's directory, ``repo_dir/model_name``.

    Example:
        >>> trt_model = torch_trt_module.compile(model, torch.randn(4, 3, 224, 224))   # doctest: +SKIP
        >>> export_triton(trt_model, "model_repository", "resnet18")                   # doctest: +SKIP
        PosixPath('model_repository/resnet18')
        >>> # tritonserver --model-repository=model_repository
    """
    engine, device_kind = _engine_of(compiled_or_engine)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TritonExportError(f"version got {version!r}; expected an int >= 1 (Triton's version directories)")
    platform = _platform(engine, platform)
    if instance_kind is None and platform == "onnxruntime_onnx":
        instance_kind = device_kind
    config = triton_config(engine, model_name, max_batch_size=max_batch_size, dynamic_batching=dynamic_batching,
                           instance_count=instance_count, platform=platform, instance_kind=instance_kind)
    model_dir = Path(repo_dir) / model_name
    version_dir = model_dir / str(version)
    config_path = model_dir / "config.pbtxt"
    if version_dir.exists() and any(version_dir.iterdir()) and not overwrite:
        present = ", ".join(sorted(p.name for p in version_dir.iterdir()))
        raise TritonRepoExists(
            f"{version_dir} already exists and is not empty ({present}). "
            f"Fix: pass overwrite=True to replace it, or version={version + 1} to add a version.")
    if config_path.exists() and config_path.read_text() != config and not overwrite:
        raise TritonRepoExists(
            f"{config_path} exists with a different config (another engine, or other options); every version of "
            "a model shares one config. Fix: pass overwrite=True to replace it, or use another model_name.")
    version_dir.mkdir(parents=True, exist_ok=True)
    filename = _FILES[platform]
    if overwrite:
        for stale in _FILES.values():
            if stale != filename and (version_dir / stale).exists():
                (version_dir / stale).unlink()  # Triton would keep loading a stale model file
    blob = engine.plan if platform == "tensorrt_plan" else engine.onnx
    assert blob is not None
    # The model first, the config last: a polling server sees a complete version or none.
    atomic_write(version_dir / filename, blob)  # a polling Triton never sees half a file
    atomic_write(config_path, config.encode())
    if platform == "tensorrt_plan":
        log.info("wrote %s (%s %s plan: the server's TensorRT must be this exact version)", version_dir / filename,
                 engine.backend, engine.meta.get("backend_version", "?"))
    else:
        log.info("wrote %s", version_dir / filename)
    return model_dir


def _engine_of(obj: Any) -> tuple["Engine", str]:
    """The Engine, and the instance kind a module's device suggests for ONNX exports."""

    if isinstance(obj, TRTModule):
        if obj.engine is None:
            raise TritonExportError("this TRTModule has no engine yet (a lazy module builds at its first call); "
                                    "call it once, or compile with example_inputs, before exporting")
        device = obj.device
        return obj.engine, ("gpu" if device is not None and device.type == "cuda" else "cpu")
    if isinstance(obj, Engine):
        return obj, "cpu"
    raise TritonExportError(
        f"export_triton takes a TRTModule or an Engine; got {type(obj).__name__}. "
        "Fix: pass torch_trt_module.compile(model, example_inputs) or its .engine.")
