"""torch_trt_module._tools.bench: ``measure`` (how often each callable runs, the statistics it reports,
errors in their row, the time budget), the candidates ``bench`` times and the reasons it gives for
those that cannot run here, and the markdown table."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._tools import bench as _bench
from torch_trt_module._tools.bench import BACKENDS, Timing, make_candidates, markdown_table, measure, time_candidates

from .._support import REPO


def counter() -> tuple[Callable[[], None], list[int]]:
    calls = [0]

    def fn() -> None:
        calls[0] += 1

    return fn, calls


@pytest.mark.parametrize("warmup,iters", [(5, 50), (1, 10), (3, 7), (0, 1), (2, 100)])
def test_each_callable_runs_first_warmup_one_untimed_call_a_round_and_iters_timed(warmup: int, iters: int) -> None:
    fn, calls = counter()
    (timing,) = measure({"f": fn}, warmup=warmup, iters=iters).values()
    assert isinstance(timing, Timing)
    assert timing.iters == iters and timing.warmup == max(warmup, 1) and timing.timer == "perf_counter"
    rounds = max(1, min(5, iters // 4))
    per_round = math.ceil(iters / rounds)
    n_rounds = math.ceil(iters / per_round)
    assert calls[0] == 1 + max(warmup - 1, 0) + n_rounds + iters


def test_statistics_come_from_the_timed_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # The clock is replaced so that the numbers are known: the first call, then 1..10 ms.
    times = itertools.chain([100.0], (float(t) for t in range(1, 11)))
    monkeypatch.setattr(_bench, "_timed", lambda fn, cuda: (fn(), next(times))[1])
    timing = measure({"f": lambda: None}, warmup=1, iters=10)["f"]
    assert isinstance(timing, Timing)
    assert (timing.first_ms, timing.min_ms, timing.mean_ms, timing.iters) == (100.0, 1.0, 5.5, 10)
    assert timing.median_ms == pytest.approx(5.5) and 9.0 <= timing.p90_ms <= 10.0 and 9.0 <= timing.p99_ms <= 10.0


def test_a_callable_that_raises_gets_its_error_and_the_others_are_timed() -> None:
    fn, calls = counter()
    state = {"n": 0}

    def late() -> None:
        state["n"] += 1
        if state["n"] > 3:  # after its warm-up
            raise RuntimeError("out of memory\nsecond line")

    out = measure({"broken": lambda: 1 / 0, "ok": fn, "late": late}, warmup=2, iters=8)
    assert list(out) == ["broken", "ok", "late"]  # the caller's order
    assert out["broken"] == "ZeroDivisionError: division by zero"
    assert out["late"] == "RuntimeError: out of memory"
    assert isinstance(out["ok"], Timing) and out["ok"].iters == 8


def test_the_time_budget_stops_early_after_min_iters() -> None:
    timing = measure({"slow": lambda: time.sleep(0.01)}, warmup=1, iters=400, max_seconds=0.05, min_iters=5)["slow"]
    assert isinstance(timing, Timing)
    assert 5 <= timing.iters < 400  # 400 calls of 10 ms would take 4 s
    assert timing.median_ms >= 9.0  # the sleep is timed


def test_the_time_budget_is_kept_within_a_round() -> None:
    t0 = time.perf_counter()
    measure({"slow": lambda: time.sleep(0.01)}, warmup=1, iters=400, max_seconds=0.05, min_iters=5)
    assert time.perf_counter() - t0 < 0.5  # the budget, the first call and min_iters, with slack


def test_markdown_table() -> None:
    assert markdown_table(["backend", "ms"], [["eager", 1.5], ["onnxruntime", 12]]).splitlines() == [
        "| backend     | ms  |",
        "| ----------- | --- |",
        "| eager       | 1.5 |",
        "| onnxruntime | 12  |",
    ]


# --------------------------------------------------------------------------- candidates

@pytest.fixture(scope="module")
def model_and_export() -> tuple[torch.nn.Module, ttm.ExportedModel]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).eval()
    return model, ttm.export_onnx(model, torch.randn(2, 8), exporter="torchscript")


def reasons(cands: list[_bench.Candidate]) -> dict[str, str | None]:
    return {c.name: c.reason for c in cands}


def test_candidates_that_cannot_run_here_say_why(model_and_export: tuple[torch.nn.Module, Any]) -> None:
    model, exported = model_and_export
    cpu = torch.device("cpu")
    got = reasons(make_candidates(["eager", "onnxruntime", "trtmodule-onnxruntime", "nope"], model=model,
                                  exported=exported, device=cpu))
    assert got["eager"] is None and got["onnxruntime"] is None and got["trtmodule-onnxruntime"] is None
    assert got["nope"] == f"failed to set up: UsageError: unknown backend 'nope'; expected one of {', '.join(BACKENDS)}"
    got = reasons(make_candidates(["eager", "onnxruntime"], model=None, exported=exported, device=cpu))
    assert got["eager"] == ("not runnable on this machine: the model is an ONNX file; there is no PyTorch module "
                            "to run")
    got = reasons(make_candidates(["torch.compile", "onnxruntime"], model=model, exported=None, device=cpu,
                                  export_error="ExportError: boom"))
    assert got == {"torch.compile": None, "onnxruntime": "no ONNX graph: the export failed (ExportError: boom)"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without a GPU")
def test_gpu_candidates_on_a_machine_without_one(model_and_export: tuple[torch.nn.Module, Any]) -> None:
    model, exported = model_and_export
    got = reasons(make_candidates(["onnxruntime-cuda", "trtmodule-torch"], model=model, exported=exported,
                                  device=torch.device("cpu")))
    assert got["onnxruntime-cuda"] == "not runnable on this machine: no CUDA GPU"
    assert got["trtmodule-torch"] == ("not runnable on this machine: the PyTorch runtime is the chain's runtime for "
                                      "CUDA GPUs; this run has none")


def test_time_candidates_times_what_can_run(model_and_export: tuple[torch.nn.Module, Any]) -> None:
    model, exported = model_and_export
    cands = make_candidates(["eager", "onnxruntime", "trtmodule-onnxruntime", "nope"], model=model, exported=exported,
                            device=torch.device("cpu"), ort_threads=1)
    out = time_candidates(cands, {"input": torch.randn(4, 8)}, warmup=1, iters=4)
    assert set(out) == {"eager", "onnxruntime", "trtmodule-onnxruntime"}  # "nope" has a reason, not a row
    assert all(isinstance(t, Timing) and t.iters == 4 and t.timer == "perf_counter" for t in out.values())
    (trt_module,) = [c for c in cands if c.name == "trtmodule-onnxruntime"]
    assert trt_module.call is not None
    torch.testing.assert_close(trt_module.call({"input": torch.ones(2, 8)}), model(torch.ones(2, 8)).detach())


# --------------------------------------------------------------------------- benchmarks/zoo_report.py's coverage helpers

def zoo_report() -> Any:
    import importlib.util

    path = REPO / "benchmarks" / "zoo_report.py"
    spec = importlib.util.spec_from_file_location("zoo_report_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_share_of_ops_on_engines_counts_only_graphs_with_a_plan() -> None:
    split = zoo_report()._graph_split([{"ops": 10, "runs_on": "engine"}, {"ops": 6, "runs_on": "pytorch"},
                                       {"ops": 4, "runs_on": "next runtime"},
                                       {"ops": 20, "runs_on": "engine (some calls in pytorch)"},
                                       {"ops": 10, "runs_on": "split", "engines": 2, "engine_ops": 6}])
    assert (split["graphs"], split["engines"], split["in_pytorch"], split["next_runtime"], split["split"]) == \
        (5, 4, 1, 1, 1)
    assert (split["ops"], split["engine_ops"], split["engine_fraction"]) == (50, 36, 0.72)
    assert zoo_report()._graph_split([])["engine_fraction"] is None


def test_the_coverage_summary_counts_correct_runs_against_the_goal() -> None:
    rows = [{"model": "a", "result": "full graph", "correct": True},
            {"model": "b", "result": "partitioned", "correct": True},
            {"model": "c", "result": "full graph", "correct": False, "failure": "batch 3: too far"},
            {"model": "d", "result": "failed", "correct": False, "failure": "compile: ExportError: no"}]
    s = zoo_report().coverage_summary(rows)
    assert (s["models"], s["correct"], s["full_graph"], s["partitioned"], s["wrong"], s["failed"]) == (4, 2, 1, 1, 1, 1)
    assert s["rate"] == 0.5 and not s["meets_goal"] and s["partitioned_no_engine"] == 1  # "engines" absent: 0
    assert s["failures"] == {"c": "batch 3: too far", "d": "compile: ExportError: no"}
    assert zoo_report().coverage_summary(rows[:2])["meets_goal"]
    table = zoo_report().render_coverage("hf", {"rows": rows})
    assert "**2 of 4 run correctly under `partition='auto'` (50%; goal >= 95%: not met)**" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 2 + len(rows)  # header, rule, a row each


def test_a_coverage_block_goes_after_the_zoo_table_and_is_replaced_in_place() -> None:
    zr = zoo_report()
    start, end = zr.coverage_markers("hf")
    text = f"# T\n\n## Supported models\n\n{zr.START}\nzoo\n{zr.END}\n\n## Reliability\n"
    once = zr.replace_block(text, start, end, "first", after=zr.END)
    assert once == f"# T\n\n## Supported models\n\n{zr.START}\nzoo\n{zr.END}\n\n{start}\nfirst\n{end}\n\n## Reliability\n"
    assert zr.replace_block(once, start, end, "second", after=zr.END) == once.replace("first", "second")
