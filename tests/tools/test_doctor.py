"""torch_trt_module._tools.doctor: what ``doctor()`` reports about this machine (smoke=False: GPUs, torch,
ONNX Runtime, the TensorRT modules, TF32), how an importable stub is told apart from a runtime, the
smoke tests' verdict, and ``torch-trt-module doctor --json``: pure JSON on stdout, exit 0 when every
backend that can run here passed, 1 when one failed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import types
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import cli
from torch_trt_module._tools import doctor as _doctor
from torch_trt_module._tools.doctor import DoctorReport, Smoke
from torch_trt_module._core.numerics import tf32_state

from .._support import rtx_missing


@pytest.fixture(scope="module")
def report() -> DoctorReport:
    return ttm.doctor(smoke=False)


def test_the_report_without_smoke_tests(report: DoctorReport) -> None:
    assert report.system["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report.system["executable"] == sys.executable and report.system["platform"]
    assert report.torch["version"] == torch.__version__ and report.torch["cuda"] == torch.version.cuda
    assert report.torch["cuda_available"] is torch.cuda.is_available()
    assert len(report.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    import onnxruntime

    assert report.onnxruntime == {"version": onnxruntime.__version__,
                                  "providers": list(onnxruntime.get_available_providers())}
    assert "CPUExecutionProvider" in report.onnxruntime["providers"]
    assert set(report.tensorrt) == {"tensorrt", "tensorrt_rtx", "tensorrt_lean"}
    assert report.tf32 == tf32_state()
    assert report.smoke == [] and report.ok  # nothing ran, so nothing failed


def test_each_tensorrt_module_is_a_version_or_the_reason(report: DoctorReport) -> None:
    for name, info in report.tensorrt.items():
        assert (info["version"] is None) != (info["error"] is None), name
    rtx = report.tensorrt["tensorrt_rtx"]
    if rtx_missing() is None:
        import tensorrt_rtx

        assert rtx["version"] == tensorrt_rtx.__version__
        if not torch.cuda.is_available():
            assert rtx["note"] == "builds here ahead of time; cannot run engines on this machine's GPU"
    else:
        assert rtx["error"].startswith(("ModuleNotFoundError", "ImportError", "OSError")) and "note" not in rtx
    lean = report.tensorrt["tensorrt_lean"]
    if lean["version"]:
        assert lean["note"] == "runtime only: loads version-compatible plans built by full TensorRT"


def test_an_importable_stub_is_not_a_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    # Wheels that install without their libraries import fine and lack the classes.
    stub = types.ModuleType("tensorrt")
    stub.__version__ = "10.0.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    info = ttm.doctor(smoke=False).tensorrt["tensorrt"]
    assert info == {"version": None,
                    "error": "ImportError: imported but has no Builder (a stub without its libraries?)"}


def test_the_report_is_json_and_its_text_has_every_part(report: DoctorReport) -> None:
    data = json.loads(json.dumps(report.to_json()))
    assert sorted(data) == ["gpus", "ok", "onnxruntime", "smoke", "system", "tensorrt", "tf32", "torch"]
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "torch_trt_module doctor" and lines[-1] == "result: OK"
    assert f"  torch       {torch.__version__} (CUDA " in text
    assert f"  onnxruntime {report.onnxruntime['version']}, providers " in text
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_lean"):
        assert any(line.startswith(f"  {name:<13} ") for line in lines), name
    assert "  tf32        cuDNN conv " in text
    if not report.gpus:
        assert "  gpus        none (torch sees no CUDA device)" in lines


def test_a_failed_smoke_test_fails_the_report() -> None:
    report = DoctorReport(smoke=[Smoke("onnxruntime (cpu)", "ok", "fine", 1.0),
                                 Smoke("tensorrt", "skipped", "full TensorRT is not importable")])
    assert report.ok and str(report).endswith("result: OK")
    report.smoke.append(Smoke("tensorrt_rtx", "failed", "BuildError: no", 2.0))
    assert not report.ok and report.to_json()["ok"] is False
    text = str(report)
    assert "smoke tests (build, run, parity against eager):" in text
    assert "  tensorrt_rtx             FAILED   BuildError: no (2.0 s)" in text
    assert text.endswith("result: FAILED: a backend that can run here failed its smoke test")


def test_a_smoke_test_that_raises_is_reported_failed_with_the_error() -> None:
    smoke = _doctor._smoke("bogus", "cpu", "no-such-backend", {})
    assert smoke.status == "failed" and smoke.runtime == "bogus"
    assert smoke.detail.startswith("SettingsError: option 'backend' got 'no-such-backend'")


# --------------------------------------------------------------------------- torch-trt-module doctor

def command() -> list[str]:
    exe = shutil.which("torch-trt-module", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch_trt_module"]


def test_doctor_json_exits_0_with_json_on_stdout() -> None:
    proc = subprocess.run([*command(), "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)  # nothing but the JSON: logs go to stderr
    assert data["ok"] is True
    smoke = {s["runtime"]: s for s in data["smoke"]}
    assert smoke["onnxruntime (cpu)"]["status"] == "ok"
    assert smoke["onnxruntime (cpu)"]["detail"].startswith("ran on onnxruntime (cpu); max abs err ")
    if not torch.cuda.is_available():
        assert smoke["any GPU runtime"] == {"runtime": "any GPU runtime", "status": "skipped", "detail": "no CUDA GPU",
                                            "seconds": 0.0}


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(list(argv))
    return code, out.getvalue()


def test_doctor_exits_1_when_a_smoke_test_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(runtime: str, device: str, backend: str, options: dict[str, Any]) -> Smoke:
        return Smoke(runtime, "failed", "RuntimeFailure: the runtime crashed")

    monkeypatch.setattr(_doctor, "_smoke", failing)
    code, out = run_cli("doctor", "--json")
    assert code == 1
    assert json.loads(out)["ok"] is False
    code, out = run_cli("doctor")
    assert code == 1 and "  onnxruntime (cpu)        FAILED   RuntimeFailure: the runtime crashed\n" in out


def test_doctor_no_smoke_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_doctor, "_smoke", lambda *a, **k: pytest.fail("--no-smoke ran a smoke test"))
    code, out = run_cli("doctor", "--json", "--no-smoke")
    assert code == 0 and json.loads(out)["smoke"] == []
