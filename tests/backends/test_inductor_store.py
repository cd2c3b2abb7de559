"""TorchInductor's compiled programs, stored per input signature (backends/_inductor_store.py).

Real Inductor compiles on this CPU (``optimize="inductor"``: on a CPU ``"auto"`` runs the passes
only); each test stores into its own directory (conftest). A new module stands for a new
process, whose in-memory programs are empty; one test runs a real second process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.numerics import strict_fp32, tf32_state
from torch_trt_module._core.sign import KEY_ENV
from torch_trt_module.backends import _inductor_store, _torch_opt
from torch_trt_module.backends._inductor_store import STATS, artifact_key

from .._support import REPO, convbn_input, convbn_model


def _compiled(model: torch.nn.Module) -> ttm.TRTModule:
    return ttm.compile(model, convbn_input(2), cache=False, runtime="torch", optimize="inductor", verify=False)


def _stored() -> list[Path]:
    root = _inductor_store.store_dir()
    assert root is not None
    return sorted(root.glob("*.ttmia"))


@pytest.fixture(autouse=True)
def _fresh_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in STATS:
        monkeypatch.setitem(STATS, k, 0)
    _inductor_store.warned.clear()


def test_each_shape_is_compiled_once_stored_and_loaded_by_a_new_module() -> None:
    model = convbn_model()
    xs = [convbn_input(b) for b in (2, 5, 2)]
    first = _compiled(model)
    outs = [first(x) for x in xs]
    assert STATS == {"compiled": 2, "loaded": 0, "stored": 2, "refused": 0}
    assert len(_stored()) == 2
    second = _compiled(model)
    again = [second(x) for x in xs]
    assert STATS == {"compiled": 2, "loaded": 2, "stored": 2, "refused": 0}
    for x, a, b in zip(xs, outs, again):
        torch.testing.assert_close(a, model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert second.runner.optimized == "1 BatchNorms folded, TorchInductor"


@pytest.mark.parametrize("cache", [False, True])
def test_the_module_a_cold_compile_returns_calls_the_program_its_check_compiled(cache: bool, tmp_path: Path) -> None:
    # The check after the build ran the program Inductor compiled; the returned module takes that
    # runner instead of loading the program from disk again (a second load cost the cold compile
    # 0.5-1.5 s on the H100).
    model, x = convbn_model(), convbn_input(2)
    where: dict[str, Any] = {"cache_dir": str(tmp_path)} if cache else {"cache": False}
    fast = ttm.compile(model, x, runtime="torch", optimize="inductor", **where)
    assert STATS == {"compiled": 1, "loaded": 0, "stored": 1, "refused": 0}
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert STATS == {"compiled": 1, "loaded": 0, "stored": 1, "refused": 0}
    torch.testing.assert_close(fast(convbn_input(3)), model(convbn_input(3)), rtol=1e-4, atol=1e-4)
    assert STATS == {"compiled": 2, "loaded": 0, "stored": 2, "refused": 0}  # a new shape: its own program


def test_a_damaged_artifact_is_compiled_again_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = convbn_model()
    x = convbn_input(3)
    _compiled(model)(x)
    (path,) = _stored()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the artifact's bytes: the checksum finds it before anything is unpickled
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        out = _compiled(model)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert STATS == {"compiled": 2, "loaded": 0, "stored": 2, "refused": 1}
    (warning,) = [r.getMessage() for r in caplog.records if "stored TorchInductor program" in r.getMessage()]
    assert warning.startswith(f"the stored TorchInductor program {path} could not be used (EngineLoadError: ")
    assert "checksum mismatch in the 'artifact' blob" in warning and warning.endswith("it is compiled again")
    _compiled(model)(x)  # stored again, whole: the next module loads it
    assert STATS["loaded"] == 1


def test_under_a_signing_key_an_artifact_signed_with_another_is_refused_unread(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = convbn_model()
    x = convbn_input(2)
    monkeypatch.setenv(KEY_ENV, "writer's key")
    _compiled(model)(x)
    monkeypatch.setenv(KEY_ENV, "reader's key")
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(_compiled(model)(x), model(x), rtol=1e-4, atol=1e-4)
    assert (STATS["loaded"], STATS["refused"]) == (0, 1)
    (warning,) = [r.getMessage() for r in caplog.records if "stored TorchInductor program" in r.getMessage()]
    assert f"(EngineLoadError: {_stored()[0]} is signed with another key than ${KEY_ENV}'s" in warning
    monkeypatch.delenv(KEY_ENV)  # without a key nothing is checked: the artifact stored under "reader's key" loads
    _compiled(model)(x)
    assert (STATS["loaded"], STATS["refused"]) == (1, 1)


def test_weights_refit_into_the_same_programs() -> None:
    model = convbn_model()
    x = convbn_input(2)
    fast = _compiled(model)
    fast(x)
    with torch.no_grad():
        model.conv.weight.mul_(-0.5)
        model.bn.running_var.mul_(3.0)
    fast.refit(model)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert STATS["compiled"] == 1  # the same artifact, new weight arguments


def test_after_max_static_shapes_one_dynamic_torch_compile_takes_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.utils import counters

    monkeypatch.setattr(_inductor_store, "MAX_STATIC", {"cpu": 1})
    calls: list[object] = []
    real = torch.compile

    def spy(fn: object, **kw: object) -> object:
        calls.append(kw)
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    model = convbn_model()
    fast = _compiled(model)
    graphs = counters["stats"]["unique_graphs"]
    xs = [convbn_input(b) for b in (2, 4, 6, 9)]
    marks = [hasattr(x, "_dynamo_weak_dynamic_indices") for x in xs]
    for x in xs:
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert STATS["compiled"] == 1 and len(calls) == 1
    assert calls[0] == {"fullgraph": True, "dynamic": None, "options": None}
    # batch 4 is compiled with the batch dim dynamic: batches 6 and 9 run without another compile
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert [hasattr(x, "_dynamo_weak_dynamic_indices") for x in xs] == marks == [False] * 4  # callers' tensors unmarked


def test_the_key_holds_the_graph_its_constants_layouts_options_and_numerics() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    w = [torch.randn(4, 4)]
    x = torch.randn(2, 4)
    cpu = torch.device("cpu")
    base = artifact_key(gm, w, [x], {}, cpu)
    assert artifact_key(gm, w, [x.clone()], {}, cpu) == base  # values are not keyed: layouts are
    assert artifact_key(gm, w, [torch.randn(3, 4)], {}, cpu) != base
    assert artifact_key(gm, w, [torch.randn(4, 2).t()], {}, cpu) != artifact_key(gm, w, [torch.randn(2, 4)], {}, cpu)
    assert artifact_key(gm, w, [x.double()], {}, cpu) != base
    assert artifact_key(gm, [torch.randn(4, 4).t()], [x], {}, cpu) != base
    assert artifact_key(gm, w, [x], {"cpp_wrapper": True}, cpu) != base
    with torch.no_grad():
        gm.get_submodule("0").weight.add_(1.0)  # a constant of the graph
    changed = artifact_key(gm, w, [x], {}, cpu)
    assert changed != base
    gm2 = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()))
    gm2.load_state_dict(gm.state_dict())
    assert artifact_key(gm2, w, [x], {}, cpu) != changed  # the code
    assert tf32_state()["cudnn_conv"], "torch's default: fp32 convolutions may use TF32"
    with strict_fp32():  # TF32 off for cuDNN and cuBLAS (every flag restored after)
        assert artifact_key(gm, w, [x], {}, cpu) != changed
    torch.use_deterministic_algorithms(True)
    try:
        assert artifact_key(gm, w, [x], {}, cpu) != changed
    finally:
        torch.use_deterministic_algorithms(False)
    assert artifact_key(gm, w, [x], {}, cpu) == changed


def _helper_graph(tmp_path: Path, body: str) -> torch.fx.GraphModule:
    # A graph calling a Python function, as the passes' graphs call ``_permuted_linear``: the same
    # module and function name each time, from a file holding ``body``.
    import importlib.util

    path = tmp_path / body.replace(" ", "").replace("+", "plus").replace("*", "times") / "ttm_helper.py"
    path.parent.mkdir()
    path.write_text(f"def helper(x):\n    return {body}\n")
    spec = importlib.util.spec_from_file_location("ttm_helper", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    graph = torch.fx.Graph()
    graph.output(graph.call_function(module.helper, (graph.placeholder("x"),)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_the_key_holds_the_source_of_the_functions_the_graph_calls_and_the_passes_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A library upgrade that edits a pass's helper keeps the graph's code (it names the helper)
    # the same: the stored program compiled from the old helper must not be loaded.
    x, cpu = torch.ones(2), torch.device("cpu")
    plus, times = _helper_graph(tmp_path, "x + 1"), _helper_graph(tmp_path, "x * 2")
    assert plus.code == times.code
    base = artifact_key(plus, [], [x], {}, cpu)
    assert artifact_key(times, [], [x], {}, cpu) != base
    assert artifact_key(plus, [], [x], {}, cpu) == base
    monkeypatch.setattr(_inductor_store, "OPTIMIZE_VERSION", "a-later-pass-1")
    assert artifact_key(plus, [], [x], {}, cpu) != base


_CHILD = """
import json, sys
from pathlib import Path
from typing import Any
import torch._inductor.codecache as codecache
headers = []
_real = codecache._precompile_header
def _counting(header, *args, **kwargs):
    headers.append(header)
    return _real(header, *args, **kwargs)
codecache._precompile_header = _counting
import torch_trt_module as ttm
from torch_trt_module.backends import _inductor_store
_inductor_store.store_dir = lambda: Path(sys.argv[1])
_inductor_store.PRECOMPILED_HEADERS_ON_LOAD = sys.argv[3] == "1"
sys.path.insert(0, sys.argv[2])
from tests._support import convbn_input, convbn_model
model = convbn_model()
fast = ttm.compile(model, convbn_input(2), cache=False, runtime="torch", optimize="inductor", verify=False)
x = convbn_input(4)
err = float((fast(x) - model(x)).abs().max())
print(json.dumps({**_inductor_store.STATS, "err": err, "headers": headers}))
"""


def test_a_new_process_loads_the_program_with_or_without_the_precompiled_header_step() -> None:
    # Two real new processes load what this one stored: no Dynamo, no compile. Inductor runs its
    # precompiled-header step (a preprocessor run) in every process that loads a C++ library,
    # built or not; PRECOMPILED_HEADERS_ON_LOAD=False skips it at load. The step runs only with
    # the flag on, and both processes load the artifact (nothing compiled) and match eager.
    model = convbn_model()
    _compiled(model)(convbn_input(4))
    assert STATS["stored"] == 1
    runs = {}
    for flag in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(_inductor_store.store_dir()), str(REPO), flag],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flag] = json.loads(proc.stdout.strip().splitlines()[-1])
    for child in runs.values():
        assert (child["compiled"], child["loaded"], child["stored"], child["refused"]) == (0, 1, 0, 0)
        assert child["err"] < 1e-4
    assert runs["1"]["headers"], "with the flag on, Inductor's header step runs at load (what the flag skips)"
    assert runs["0"]["headers"] == []


class _Attention(torch.nn.Module):
    """``nn.MultiheadAttention`` with ``batch_first=True``: the passes call ``_permuted_linear`` on
    its in-projection, a Python function in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_a_graph_calling_the_passes_python_helpers_is_stored_and_loaded() -> None:
    # Inductor's cache refuses to serialize a graph that calls a Python function it does not know:
    # such programs were compiled in every process. They are traced into ATen ops first now.
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x)
    first = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
    torch.testing.assert_close(first(x), want, rtol=1e-4, atol=1e-4)
    assert STATS == {"compiled": 1, "loaded": 0, "stored": 1, "refused": 0}, first.runner.optimized
    second = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
    torch.testing.assert_close(second(x), want, rtol=1e-4, atol=1e-4)
    assert STATS == {"compiled": 1, "loaded": 1, "stored": 1, "refused": 0}


def test_a_graph_that_cannot_be_traced_into_aten_ops_still_compiles_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def fail(graph: torch.fx.GraphModule, args: object) -> None:  # a double for a tracing failure
        raise RuntimeError("data-dependent shape")

    monkeypatch.setattr(_inductor_store, "inline_python_calls", fail)
    model, x = _Attention().eval(), torch.randn(2, 5, 16)
    with caplog.at_level(logging.WARNING):
        fast = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert STATS["compiled"] == 1 and STATS["stored"] == 0 and fast.runner.optimized.endswith("TorchInductor")
    assert any(r.getMessage() == "the optimized program could not be traced into ATen ops (RuntimeError: "
               "data-dependent shape); TorchInductor compiles it as it is, and cannot store it" for r in caplog.records)


def test_store_artifacts_false_compiles_with_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_torch_opt, "STORE_ARTIFACTS", False)
    model = convbn_model()
    x = convbn_input(2)
    torch.testing.assert_close(_compiled(model)(x), model(x), rtol=1e-4, atol=1e-4)
    assert STATS["compiled"] == 0 and _stored() == []
