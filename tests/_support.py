"""Helpers shared by the test files that compile through the engine cache (test_keys, test_compile,
test_entries): what is in a cache directory, what compile() did, and fresh Python processes;
``require_rtx``, the one rule for tests that need TensorRT-RTX (skip here, fail in CI); the refit
tests' model and broken weights (test_refit, test_tensorrt_refit); hand-written ONNX graphs; work in
threads (``in_threads``)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch

from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._cache.cache import EngineCache

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def cache_entry(root: Path) -> tuple[EngineCache, str, Any]:
    """The one entry of the cache at ``root``: the cache, its key and the entry read back."""
    cache = EngineCache(root)
    (info,) = cache.entries()
    entry = cache.get(info.key)
    assert entry is not None
    return cache, info.key, entry


class TwoInputs(torch.nn.Module):
    """Two tensor inputs that both reach the output: ``lin(x) * y``, x: (B, 8), y: (B, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l(x) * y


class ConvBN(torch.nn.Module):
    """A conv with its BatchNorm (the pair an exporter or a builder likes to fold) and a linear head:
    the refit tests' model (tests/runtime/test_refit.py, tests/backends/test_tensorrt_refit.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def convbn_model(seed: int = 0) -> ConvBN:
    """:class:`ConvBN` in eval mode, seeded, with BatchNorm statistics far from the identity (so a
    stale one shows)."""
    torch.manual_seed(seed)
    model = ConvBN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def convbn_input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


#: Weights a refit must refuse, and what its error then says: (breakage, message).
REFIT_BREAKAGES = [
    ("missing", "'head.bias' is missing"),
    ("shape", "'conv.weight' has shape (8, 3, 1, 1), the engine's weight has (8, 3, 3, 3)"),
    ("dtype", "'conv.weight' is torch.int32, the engine's weight is float32"),
]


def broken_state(breakage: str) -> dict[str, torch.Tensor]:
    """Another :func:`convbn_model`'s state dict, broken as :data:`REFIT_BREAKAGES` names."""
    state = convbn_model(seed=9).state_dict()
    if breakage == "missing":
        del state["head.bias"]
    elif breakage == "shape":
        state["conv.weight"] = torch.zeros(8, 3, 1, 1)
    else:
        state["conv.weight"] = torch.zeros(8, 3, 3, 3, dtype=torch.int32)
    return state


def onnx_model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: Sequence[Any] = ()) -> bytes:
    """A serialized ONNX model (opset 18) of one graph, for tests that write graphs by hand."""
    from onnx import helper as oh

    graph = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]).SerializeToString()


def onnx_vi(name: str, elem: int, dims: Sequence[Any]) -> Any:
    """An ONNX value info: ``name``, element type ``elem`` (``onnx.TensorProto.FLOAT``, ...), ``dims``."""
    from onnx import helper as oh

    return oh.make_tensor_value_info(name, elem, list(dims))


def keys(root: Path) -> set[str]:
    return {e.key for e in EngineCache(root).entries()}


def fingerprints(root: Path) -> set[str]:
    return {p.stem for p in (root / "index").glob("*.json")}


@contextlib.contextmanager
def counting() -> Iterator[dict[str, int]]:
    """The exports, builds and hits that happen inside the block."""
    before = dict(_compile.STATS)
    delta: dict[str, int] = {}
    yield delta
    delta.update({k: _compile.STATS[k] - before[k] for k in before})


def assert_matches(module: torch.nn.Module, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.inference_mode():
        got, want = module(*inputs), model(*inputs)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-2 if module.engine.meta["model"]["precision"] == "fp16" else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], text=True, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def last_json(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- TensorRT-RTX

@functools.lru_cache(maxsize=1)
def rtx_missing() -> str | None:
    """Why tensorrt_rtx cannot build here (the library's own import check), or None if it can."""
    from torch_trt_module.backends._trt_loader import import_tensorrt

    try:
        import_tensorrt("tensorrt_rtx")
    except Exception as e:  # noqa: BLE001 - BackendUnavailable, with the reason
        return str(e)
    return None


def require_rtx() -> None:
    """Skip the calling test where tensorrt_rtx cannot build, except in CI (``CI`` set), which installs
    the 'rtx' extra: there a missing TensorRT-RTX is a broken environment, and the test fails.

    Use it (or the ``rtx_required`` fixture of conftest.py) in every test that builds with
    TensorRT-RTX, directly or through ``backend="auto"``, and relies on getting a plan."""
    why = rtx_missing()
    if why is None:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"tensorrt_rtx is not importable, but CI installs the 'rtx' extra: {why}")
    pytest.skip(f"needs tensorrt_rtx (pip install 'torch_trt_module[rtx]'): {why}")


# Children load only the storage layer: the package's __init__ imports torch, about 1.5 s per process.
CHILD_PRELUDE = f"""
import sys, types
_pkg = types.ModuleType("torch_trt_module")
_pkg.__path__ = [{str(REPO / "torch_trt_module")!r}]
sys.modules["torch_trt_module"] = _pkg
"""


def child_argv(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *args]


def run_py(code: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **kw.pop("env", {})}
    return subprocess.run(child_argv(code), env=env, text=True, capture_output=True, timeout=60, **kw)


def in_threads(work: Callable[[int], None], n: int, *, timeout: float = 60) -> None:
    """Run ``work(i)`` for i in range(n), each in its own thread, all released at once; fail with
    the first thread's error, or where a thread is still running after ``timeout`` seconds (stuck)."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported by the calling thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not stuck, f"threads {stuck} did not finish within {timeout:g} s (stuck)"
    if errors:
        raise errors[0]
