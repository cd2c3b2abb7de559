"""What the command line prints: engine descriptions, I/O tables, layer information, and engines
read back from engine files and saved modules (always through the verified container)."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from .._build.engine import Engine
from .._errors import UsageError
from .._pipeline.saved import read_state
from .. import backends
from ..backends import _trt_loader

__all__ = ["built_for", "describe", "io_tables", "layer_info", "mib", "read_engine", "text_table"]


def read_engine(path: str) -> tuple[Any, str]:
    """An :class:`~torch_trt_module.Engine` from an engine file or a saved TRTModule, and which it
    was. Both hold the same checksummed container; it is verified before anything is used."""

    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"TTMBOX") or data.startswith(b"TTMENG"):
        return Engine.from_bytes(data, source=path), "engine file"
    if data.startswith(b"PK\x03\x04"):  # a torch.save archive: a cut-off one is "truncated or corrupt"
        state = read_state(path)  # never runs code from the file
    else:
        state = None
    for key, value in (state.items() if isinstance(state, dict) else ()):
        if key.endswith("_extra_state") and isinstance(value, dict) and "engine" in value:
            return Engine.from_state(value, source=path), "saved TRTModule"
    raise UsageError(f"{path} is not an engine file, a saved TRTModule or an .onnx file")


def layer_info(engine: Any) -> tuple[list[str], str | None]:
    """TensorRT's per-layer information (it needs a deserialized engine, so a GPU runtime), or why none."""

    if not engine.has_plan:
        return [], "none: ONNX Runtime runs the graph's ops"
    why = backends.can_run_plan(engine.backend, engine.meta, "cuda")
    if why is not None:
        return [], f"layer information needs a GPU runtime ({why})"

    trt = _trt_loader.import_runtime(engine.backend)[1]
    inspector = _trt_loader.deserialize(engine.plan, backend=engine.backend, device="cuda").create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.ONELINE)
    return [ln for ln in str(info).splitlines() if ln.strip()], None


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n / 1024:.1f} KiB"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def io_tables(model_meta: Mapping[str, Any]) -> list[str]:
    def shape(v: Any) -> Any:
        return "-" if v is None else tuple(v)

    ins = [[s["name"], s["dtype"], tuple(s["dims"]), shape(s.get("min")), shape(s.get("opt")), shape(s.get("max"))]
           for s in model_meta.get("inputs", [])]
    outs = [[s["name"], s["dtype"], tuple(s["dims"])] for s in model_meta.get("outputs", [])]
    return ["inputs", text_table(["name", "dtype", "dims", "min", "opt", "max"], ins),
            "outputs", text_table(["name", "dtype", "dims"], outs)]


def built_for(meta: Mapping[str, Any]) -> str:
    if meta.get("targets"):
        return "targets " + ", ".join(meta["targets"])
    if meta.get("gpu"):
        return f"GPU {meta['gpu']['name']} (compute capability {meta['gpu']['compute_capability']})"
    return "RTX's default targets" if meta.get("backend") == "tensorrt_rtx" else "ONNX Runtime (any machine)"


def describe(meta: Mapping[str, Any], plan_size: int, onnx_size: int) -> list[str]:
    """Lines describing an engine's metadata (build, inspect and ``cache info`` print these)."""
    import json

    model = meta.get("model") or {}
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta["created"])) if "created" in meta else "?"
    return [f"  backend    {meta.get('backend', '?')} {meta.get('backend_version', '')} for {built_for(meta)}",
            f"  precision  {model.get('precision', '?')}, exporter {model.get('exporter', '?')}, "
            f"torch {meta.get('torch_version', '?')}",
            f"  size       engine {mib(plan_size)}, ONNX graph {mib(onnx_size)}",
            f"  created    {created}; export {meta.get('export_time_s', 0):.2f} s, "
            f"build {meta.get('build_time_s', 0):.2f} s",
            f"  settings   {json.dumps(meta.get('settings', {}), sort_keys=True)}", *io_tables(model)]


