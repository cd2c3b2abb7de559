"""``doctor()``: what this machine can run, and a small end-to-end check of each backend that can.

A report a user can paste into a bug: the GPUs, driver and CUDA; torch, ONNX Runtime and
its providers; TensorRT, TensorRT-RTX and the TensorRT lean runtime, each importable or not
and why; the TF32 state. Then, for every runtime that can run here, a smoke test: build a
tiny model, run it, and check parity against eager.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from .._core.numerics import tf32_state
from .._pipeline.compile import compile as ttm_compile
from .._verify.parity import verify
from ..backends import rtx_runs_on


__all__ = ["DoctorReport", "doctor"]


@dataclass
class Smoke:
    """One backend's end-to-end check: ``ok``, ``failed`` or ``skipped``, and the detail."""

    runtime: str
    status: str
    detail: str
    seconds: float = 0.0


@dataclass
class DoctorReport:
    """What :func:`doctor` found. ``ok`` is False when a backend that can run here failed its smoke test.

    Example:
        >>> report = doctor(smoke=False)
        >>> sorted(report.to_json())[:3]
        ['gpus', 'ok', 'onnxruntime']
    """

    system: dict[str, Any] = field(default_factory=dict)
    torch: dict[str, Any] = field(default_factory=dict)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    onnxruntime: dict[str, Any] = field(default_factory=dict)
    tensorrt: dict[str, dict[str, Any]] = field(default_factory=dict)
    tf32: dict[str, bool] = field(default_factory=dict)
    smoke: list[Smoke] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.smoke)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def __str__(self) -> str:
        lines = ["torch_trt_module doctor", f"  python      {self.system.get('python')} on {self.system.get('platform')}",
                 f"  torch       {self.torch.get('version')} (CUDA {self.torch.get('cuda') or 'none'}, "
                 f"cuDNN {self.torch.get('cudnn') or 'none'})",
                 f"  driver      {self.system.get('driver') or 'none found'}"]
        if not self.gpus:
            lines.append("  gpus        none (torch sees no CUDA device)")
        for g in self.gpus:
            lines.append(f"  gpu {g['index']}       {g['name']}, compute capability {g['compute_capability']}, "
                         f"{g['memory_gib']:.0f} GiB")
        ort = self.onnxruntime
        lines.append(f"  onnxruntime {ort.get('version') or 'not importable: ' + str(ort.get('error'))}"
                     + (f", providers {', '.join(ort.get('providers', []))}" if ort.get("version") else ""))
        for name, info in self.tensorrt.items():
            state = info["version"] if info.get("version") else f"not importable ({info.get('error')})"
            lines.append(f"  {name:<13} {state}" + (f"; {info['note']}" if info.get("note") else ""))
        lines.append(f"  tf32        cuDNN conv {'on' if self.tf32.get('cudnn_conv') else 'off'}, "
                     f"cuBLAS matmul {'on' if self.tf32.get('cuda_matmul') else 'off'}")
        if self.smoke:
            lines.append("smoke tests (build, run, parity against eager):")
            for s in self.smoke:
                lines.append(f"  {s.runtime:<24} {s.status.upper():<8} {s.detail}"
                             + (f" ({s.seconds:.1f} s)" if s.seconds else ""))
        lines.append("result: " + ("OK" if self.ok else "FAILED: a backend that can run here failed its smoke test"))
        return "\n".join(lines)


def _driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0].strip() if out.returncode == 0 and first else None


def _trt_info() -> dict[str, dict[str, Any]]:
    info: dict[str, dict[str, Any]] = {}
    for name, needs in (("tensorrt", "Builder"), ("tensorrt_rtx", "Builder"), ("tensorrt_lean", "Runtime")):
        try:
            module = __import__(name)
            if not hasattr(module, needs):
                raise ImportError(f"imported but has no {needs} (a stub without its libraries?)")
            entry: dict[str, Any] = {"version": str(module.__version__), "error": None}
        except Exception as e:  # noqa: BLE001 - stub wheels fail with OSError and friends
            entry = {"version": None, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        if name == "tensorrt_rtx" and entry["version"]:
            entry["note"] = ("runs engines on this GPU" if rtx_runs_on("cuda") else
                             "builds here ahead of time; cannot run engines on this machine's GPU")
        if name == "tensorrt_lean" and entry["version"]:
            entry["note"] = "runtime only: loads version-compatible plans built by full TensorRT"
        info[name] = entry
    return info


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _smoke(runtime: str, device: str, backend: str, options: dict[str, Any]) -> Smoke:
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = _Tiny().eval().to(device)
        x = torch.randn(2, 3, 16, 16, device=device)
        module = ttm_compile(model, x, backend=backend, cache=False, **options)
        report = verify(model, module, torch.randn(3, 3, 16, 16, device=device))
        ran = module.backend
        if not report.passed:
            return Smoke(runtime, "failed", f"ran on {ran}; parity: {report.outputs[0].reason}",
                         time.perf_counter() - t0)
        worst = max(o.max_abs for o in report.outputs)
        return Smoke(runtime, "ok", f"ran on {ran} ({module.device}); max abs err {worst:.2g}",
                     time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - every failure is the report's content
        return Smoke(runtime, "failed", f"{type(e).__name__}: {e}".splitlines()[0][:300], time.perf_counter() - t0)


def doctor(*, smoke: bool = True) -> DoctorReport:
    """Report this machine's GPUs, drivers, runtimes and TF32 state; with ``smoke`` (the default),
    build, run and check a tiny model on every backend that can run here.

    Example:
        >>> report = torch_trt_module.doctor()   # doctest: +SKIP
        >>> print(report); report.ok             # doctest: +SKIP
    """

    report = DoctorReport()
    report.system = {"python": platform.python_version(), "platform": platform.platform(), "driver": _driver(),
                     "executable": sys.executable}
    report.torch = {"version": torch.__version__, "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                    "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            report.gpus.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                                "memory_gib": p.total_memory / 2**30, "sm_count": p.multi_processor_count})
    try:
        import onnxruntime as ort

        report.onnxruntime = {"version": ort.__version__, "providers": list(ort.get_available_providers())}
    except Exception as e:  # noqa: BLE001
        report.onnxruntime = {"version": None, "error": f"{type(e).__name__}: {e}"}
    report.tensorrt = _trt_info()
    report.tf32 = tf32_state()
    if not smoke:
        return report
    report.smoke.append(_smoke("onnxruntime (cpu)", "cpu", "onnxruntime", {}))
    cuda = torch.cuda.is_available()
    if not cuda:
        report.smoke.append(Smoke("any GPU runtime", "skipped", "no CUDA GPU"))
        return report
    report.smoke.append(_smoke("auto (cuda)", "cuda", "auto", {}))
    if report.tensorrt["tensorrt"]["version"]:
        report.smoke.append(_smoke("tensorrt", "cuda", "tensorrt", {}))
    else:
        report.smoke.append(Smoke("tensorrt", "skipped", "full TensorRT is not importable"))
    if report.tensorrt["tensorrt_rtx"]["version"] and rtx_runs_on("cuda"):
        report.smoke.append(_smoke("tensorrt_rtx", "cuda", "tensorrt_rtx", {}))
    else:
        why = "not importable" if not report.tensorrt["tensorrt_rtx"]["version"] else \
            f"does not support compute capability {report.gpus[0]['compute_capability']}"
        report.smoke.append(Smoke("tensorrt_rtx", "skipped", why))
    return report

