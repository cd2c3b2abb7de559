"""``cuda_graphs="auto"`` (backends/_autographs.py): which shapes get a graph, and that no path is
ever stale, wrong or stuck.

On a machine without a GPU, capture, replay and timing go through :class:`TimedGraphs`, a TEST
DOUBLE of ``TorchCudaGraphs``: it captures and replays like ``HostGraphs`` (test_cudagraphs.py)
and reports the host and wall times a test scripts, for the plain runs and the replays. That
shows the runner's own decisions (when it judges, what it keeps, what a refit or a failure does)
and nothing about CUDA; tests/gpu/test_autographs_cuda.py times and replays real graphs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core.spec import TensorSpec
from torch_trt_module._errors import BackendUnavailable, SettingsError
from torch_trt_module.backends._autographs import EVICTIONS_PER_GRAPH, KEEP, LAUNCH_BOUND, REPEATS, AutoGraphRunner

from .._support import in_threads
from .test_cudagraphs import HostGraphs

LOGGER = "torch_trt_module.backends._autographs"
LAUNCH_BOUND_CALL = {"plain": (1.7e-3, 1.75e-3), "graph": (0.05e-3, 0.5e-3)}  # mobilenet-like (seconds)
GPU_BOUND_CALL = {"plain": (1.5e-3, 12e-3), "graph": (0.05e-3, 11.9e-3)}  # resnet50 at batch 128


class TimedGraphs(HostGraphs):
    """TEST DOUBLE of ``TorchCudaGraphs``: ``HostGraphs``'s capture and replay, the times a test
    scripts (``timings[label] = (host_s, wall_s)``), and a caller that may be capturing."""

    def __init__(self, timings: dict[str, tuple[float, float]], fail: BaseException | None = None) -> None:
        super().__init__(fail)
        self.timings = timings
        self.timed: list[str] = []
        self.caller_capturing = False

    def capturing(self) -> bool:
        return self.caller_capturing

    def time(self, fn: Callable[[], list[torch.Tensor]], *, repeats: int, label: str
             ) -> tuple[list[torch.Tensor], float, float]:
        self.timed.append(label)
        outputs: list[torch.Tensor] = []
        for _ in range(repeats):
            self.synchronize()
            outputs = fn()
        host, wall = self.timings[label]
        return outputs, host, wall


class ScaleRunner:
    """TEST DOUBLE of a runner with weights (``TorchRunner``'s surface): ``y = x * scale``, a refit
    gives a new weight tensor, as TorchRunner's refit swaps its list."""

    backend = "test"

    def __init__(self, scale: float = 2.0) -> None:
        self.device = torch.device("cpu")
        self.inputs = [TensorSpec("x", "float32", ("b", 3), (1, 3), (4, 3), (8, 3))]
        self.outputs = [TensorSpec("y", "float32", ("b", 3))]
        self.scale = torch.tensor(scale)
        self.calls = 0

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        return [inputs[0] * self.scale]

    def refit(self, values: dict[str, torch.Tensor]) -> "ScaleRunner":
        self.scale = values["scale"].clone()
        return self


def _auto(timings: dict[str, tuple[float, float]], **kw: Any) -> tuple[AutoGraphRunner, ScaleRunner, TimedGraphs]:
    inner, driver = ScaleRunner(), TimedGraphs(timings, fail=kw.pop("fail", None))
    return AutoGraphRunner(inner, device="cpu", driver=driver, **kw), inner, driver


def _x(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 3)


def test_a_launch_bound_shape_is_judged_at_its_second_call_and_replayed_after(caplog: pytest.LogCaptureFixture) -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL)
    x = _x()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        (y1,) = auto.run([x])  # plain: nothing judged, nothing captured
        assert (driver.timed, auto.graphs.stats["captures"]) == ([], 0)
        (y2,) = auto.run([x])  # judged: REPEATS plain runs, then a capture and REPEATS replays
    assert driver.timed == ["plain", "graph"]
    assert auto.verdicts == {(((4, 3), torch.float32),): "graph"}
    assert auto.graphs.stats["captures"] == 1 and auto.graphs.stats["replays"] == 1 + REPEATS
    assert caplog.messages == ["cuda_graphs='auto' on test: (4, 3) float32: a CUDA graph (0.500 ms a call, plain "
                               "1.750 ms, 1.700 ms of it to enqueue)"]
    for y in (y1, y2):
        torch.testing.assert_close(y, x * 2)
    new = _x()
    (y3,) = auto.run([new])
    torch.testing.assert_close(y3, new * 2)  # the static input buffer took the new values
    assert auto.graphs.stats["replays"] == 1 + REPEATS + 1 and driver.timed == ["plain", "graph"]
    (y4,) = auto.run([_x()])
    assert not torch.equal(y3, y4)  # fresh tensors: the next replay did not overwrite the last outputs
    assert auto.stats == {"judged": 1, "kept": 1, "plain": 0, "failed": 0}


def test_a_gpu_bound_shape_runs_plain_for_good_and_is_never_captured(caplog: pytest.LogCaptureFixture) -> None:
    auto, inner, driver = _auto(GPU_BOUND_CALL)
    x = _x(8)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(5):
            (y,) = auto.run([x])
            torch.testing.assert_close(y, x * 2)
    assert driver.timed == ["plain"]  # no graph to time: the host was ahead of the GPU
    assert auto.graphs.stats["captures"] == 0 and auto.graphs.shapes == []
    assert auto.verdicts == {(((8, 3), torch.float32),): "plain"}
    assert caplog.messages == ["cuda_graphs='auto' on test: (8, 3) float32: plain (12.000 ms a call, the host ahead "
                               "of the GPU: 1.500 ms to enqueue)"]
    assert inner.calls == 1 + REPEATS + 3


def test_the_launch_bound_threshold_is_the_documented_share_of_the_wall_time() -> None:
    wall = 2e-3
    below, _, _ = _auto({"plain": (LAUNCH_BOUND * wall * 0.99, wall), "graph": (0.0, 0.1e-3)})
    at, _, _ = _auto({"plain": (LAUNCH_BOUND * wall, wall), "graph": (0.0, 0.1e-3)})
    for auto in (below, at):
        x = _x()
        auto.run([x])
        auto.run([x])
    assert list(below.verdicts.values()) == ["plain"] and list(at.verdicts.values()) == ["graph"]


def test_a_graph_that_is_not_faster_enough_is_dropped_with_its_memory(caplog: pytest.LogCaptureFixture) -> None:
    plain_wall = 1.75e-3
    auto, inner, driver = _auto({"plain": (1.7e-3, plain_wall), "graph": (0.05e-3, KEEP * plain_wall * 1.01)})
    x = _x()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        auto.run([x])
        auto.run([x])
        (y,) = auto.run([x])
    torch.testing.assert_close(y, x * 2)
    assert auto.graphs.stats["captures"] == 1 and auto.graphs.shapes == []  # captured, timed, dropped
    assert auto.verdicts == {(((4, 3), torch.float32),): "plain"}
    assert caplog.messages == ["cuda_graphs='auto' on test: (4, 3) float32: plain (a CUDA graph took 1.502 ms a "
                               "call, plain 1.750 ms: not faster by 15%)"]
    assert auto.graphs.stats["replays"] == 1 + REPEATS  # only the capture's and the timed ones


def test_a_refit_drops_the_graphs_and_a_shape_is_captured_again_at_its_second_call_after() -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL)
    x = _x()
    auto.run([x])
    auto.run([x])
    assert auto.graphs.shapes != []
    assert auto.refit({"scale": torch.tensor(3.0)}) is auto
    assert auto.graphs.shapes == []  # the graph read the old weight's memory
    (y,) = auto.run([x])  # plain: the first call since the refit
    torch.testing.assert_close(y, x * 3)
    assert auto.graphs.stats["captures"] == 1
    (y,) = auto.run([x])  # captured again, with no new judgement (the verdict stands)
    torch.testing.assert_close(y, x * 3)
    assert auto.graphs.stats["captures"] == 2 and driver.timed == ["plain", "graph"]


def test_a_module_refit_before_every_call_never_pays_a_capture() -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL)
    x = _x()
    auto.run([x])
    auto.run([x])  # judged: a graph
    for step in range(5):  # evaluation in a training loop: new weights before each call
        auto.refit({"scale": torch.tensor(float(step))})
        (y,) = auto.run([x])
        torch.testing.assert_close(y, x * step, msg=f"stale at step {step}")
    assert auto.graphs.stats["captures"] == 1


def test_a_capture_that_fails_turns_graphs_off_and_every_call_still_answers(caplog: pytest.LogCaptureFixture) -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL, fail=RuntimeError("operation not permitted when stream is capturing"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for rows in (4, 4, 4, 2, 2, 2):
            x = _x(rows)
            (y,) = auto.run([x])
            torch.testing.assert_close(y, x * 2)
    assert auto.off is not None and "operation not permitted when stream is capturing" in auto.off
    assert auto.stats["failed"] == 1 and driver.timed == ["plain"]  # never judged again
    (msg,) = caplog.messages
    assert msg.startswith("cuda_graphs='auto' on test: graphs are off for this module, which runs plain (a CUDA "
                          "graph failed for input shapes (4, 3) float32: could not capture a CUDA graph")


def test_a_replay_that_fails_turns_graphs_off_and_the_call_runs_plain() -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL)
    x = _x()
    auto.run([x])
    auto.run([x])

    def broken(inputs: Sequence[torch.Tensor], key: Any = None) -> list[torch.Tensor]:
        raise RuntimeError("CUDA error: an illegal instruction")

    auto.graphs.run = broken  # type: ignore[method-assign]
    (y,) = auto.run([x])
    torch.testing.assert_close(y, x * 2)
    assert auto.off is not None and "an illegal instruction" in auto.off and auto.graphs.shapes == []


def test_a_call_inside_the_callers_own_capture_runs_plain_and_counts_nothing() -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL)
    driver.caller_capturing = True
    x = _x()
    for _ in range(3):
        (y,) = auto.run([x])
        torch.testing.assert_close(y, x * 2)
    assert (driver.timed, auto.graphs.stats["captures"], driver.syncs) == ([], 0, 0)  # no sync inside a capture
    driver.caller_capturing = False
    auto.run([x])
    assert driver.timed == []  # the first counted call


def test_shapes_that_keep_changing_stop_being_captured(caplog: pytest.LogCaptureFixture) -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL, max_graphs=1)
    limit = EVICTIONS_PER_GRAPH * 1
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for rows in range(1, limit + 4):
            x = _x(rows)
            auto.run([x])
            (y,) = auto.run([x])
            torch.testing.assert_close(y, x * 2)
    assert auto.graphs.stats["evictions"] == limit
    assert auto.graphs.stats["captures"] == limit + 1
    assert list(auto.verdicts.values()).count("plain") == 2
    assert caplog.messages[-1] == (f"cuda_graphs='auto' on test: ({limit + 3}, 3) float32: plain (launch-bound, but "
                                   f"{limit} graphs were dropped to make room for new shapes already: the shapes keep "
                                   "changing)")


def test_two_shapes_that_take_turns_in_one_graph_slot_settle_instead_of_capturing_at_every_call() -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL, max_graphs=1)
    a, b = _x(4), _x(2)
    for _ in range(20):
        for x in (a, b):
            (y,) = auto.run([x])
            torch.testing.assert_close(y, x * 2)
    # a and b judged (2 captures), then each captured again when its turn came, until the LRU had
    # dropped EVICTIONS_PER_GRAPH graphs: the next shape to need a capture runs plain from then on.
    assert auto.graphs.stats["captures"] == EVICTIONS_PER_GRAPH + 1
    assert auto.verdicts == {(((4, 3), torch.float32),): "graph", (((2, 3), torch.float32),): "plain"}
    replays = auto.graphs.stats["replays"]
    auto.run([a])
    assert auto.graphs.stats["replays"] == replays + 1  # a keeps its graph


def test_the_wrappers_say_what_the_runtime_does_and_that_graphs_replay_it() -> None:
    from torch_trt_module.backends._cudagraphs import CudaGraphRunner

    inner = ScaleRunner()
    inner.optimized = "2 BatchNorms folded, eager kernels"  # type: ignore[attr-defined] # TorchRunner's surface
    auto = AutoGraphRunner(inner, device="cpu", driver=TimedGraphs(LAUNCH_BOUND_CALL))
    assert auto.optimized == "2 BatchNorms folded, eager kernels, CUDA graphs where faster"
    graphs = CudaGraphRunner(inner, device="cpu", driver=TimedGraphs(LAUNCH_BOUND_CALL))
    assert graphs.optimized == "2 BatchNorms folded, eager kernels, CUDA graphs"
    assert AutoGraphRunner(ScaleRunner(), device="cpu", driver=TimedGraphs({})).optimized == \
        "test, CUDA graphs where faster"  # a runner that says nothing of its program: its name


def test_the_wrappers_answer_for_the_runners_program_and_never_hand_out_its_calls() -> None:
    from torch_trt_module.backends._cudagraphs import CudaGraphRunner

    inner = ScaleRunner()
    inner.program_format = "compact graph"  # type: ignore[attr-defined] # TorchRunner's surface
    inner.weight_names = ["scale"]  # type: ignore[attr-defined]
    inner.call_for = lambda key: inner.run  # type: ignore[attr-defined] # a planned call (OnnxRuntimeRunner's)
    for wrapper in (AutoGraphRunner(inner, device="cpu", driver=TimedGraphs({})),
                    CudaGraphRunner(inner, device="cpu", driver=TimedGraphs({}))):
        assert (wrapper.program_format, wrapper.weight_names) == ("compact graph", ["scale"])
        # TRTModule's fast path takes a runner's call_for where it has one: the inner one would skip the graphs.
        assert getattr(wrapper, "call_for", None) is None
        with pytest.raises(AttributeError, match="object has no attribute 'scale'"):
            wrapper.scale


@pytest.mark.parametrize("made_inside", [False, True], ids=["input made outside", "input made inside"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_a_compiled_program_is_captured_in_the_callers_mode_and_not_compiled_again(mode: str,
                                                                                  made_inside: bool) -> None:
    # Dynamo guards on the grad and inference modes: a capture made in another mode than the plain
    # calls compiled the program a second time (with Inductor on a GPU: seconds to minutes).
    compiles = []

    def backend(gm: torch.fx.GraphModule, example: Any) -> Any:
        compiles.append(gm)
        return gm.forward

    program = torch.compile(lambda x: x * 2 + 1, backend=backend, dynamic=False)
    inner = ScaleRunner()
    inner.run = lambda inputs: [program(inputs[0])]  # type: ignore[method-assign]
    auto = AutoGraphRunner(inner, device="cpu", driver=TimedGraphs(LAUNCH_BOUND_CALL))
    x = None if made_inside else _x()
    with {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}[mode]():
        x = _x() if x is None else x  # under inference mode: an inference tensor
        for _ in range(4):  # plain, judged (plain runs, the capture, replays), replayed
            (y,) = auto.run([x])
            torch.testing.assert_close(y, x * 2 + 1)
    assert auto.verdicts == {(((4, 3), torch.float32),): "graph"}
    assert len(compiles) == 1


def test_without_a_driver_auto_needs_a_cuda_device_and_says_so() -> None:
    with pytest.raises(BackendUnavailable) as err:
        AutoGraphRunner(ScaleRunner(), device="cpu")
    assert str(err.value) == ("cuda_graphs='auto' captures graphs on a CUDA device; this runner is on cpu. Fix: pass "
                              "cuda_graphs=False for a module that does not run on a GPU.")


@pytest.mark.parametrize("bad", ["yes", 1, 0, "True"])  # (None is "the default" for every option)
def test_the_option_takes_false_true_or_auto_and_names_them(bad: Any) -> None:
    with pytest.raises(SettingsError) as err:
        ttm.compile(torch.nn.Linear(3, 2).eval(), torch.randn(2, 3), cache=False, cuda_graphs=bad)
    assert str(err.value) == (f"option 'cuda_graphs' got {bad!r}; expected False, True (a CUDA graph for each input "
                              "shape) or 'auto' (a graph for the shapes where it makes the call faster)")
    with pytest.raises(SettingsError, match="option 'cuda_graphs' got"):
        ttm.TRTModule(cuda_graphs=bad)


@pytest.mark.parametrize("options", [{}, {"cuda_graphs": "auto"}], ids=["default", "explicit"])
def test_auto_on_the_cpu_runs_the_runtime_unwrapped_and_quietly(caplog: pytest.LogCaptureFixture,
                                                                 options: dict[str, Any]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()).eval()
    with caplog.at_level(logging.WARNING):
        fast = ttm.compile(model, torch.randn(2, 3), cache=False, runtime="torch", **options)
    assert fast.cuda_graphs == "auto" and type(fast.runner).__name__ == "TorchRunner"
    assert not [r for r in caplog.records if "cuda_graphs" in r.getMessage()]
    x = torch.randn(5, 3)
    torch.testing.assert_close(fast(x), model(x))


def test_threads_calling_at_once_get_their_own_answers_and_each_shape_is_judged_once() -> None:
    auto, inner, driver = _auto(LAUNCH_BOUND_CALL)

    def work(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for i in range(30):
            x = torch.randn(4 if i % 2 else 2, 3, generator=gen)
            (y,) = auto.run([x])
            torch.testing.assert_close(y, x * 2)

    in_threads(work, 4)
    assert auto.stats == {"judged": 2, "kept": 2, "plain": 0, "failed": 0}
    assert auto.graphs.stats["captures"] == 2 and driver.timed.count("plain") == 2


def test_auto_never_captures_a_tensorrt_rtx_engine_built_to_allocate_while_it_runs() -> None:
    """An RTX context built without REQUIRE_USER_ALLOCATION allocates during enqueue, which a capture
    cannot hold; only cuda_graphs=True builds with the flag, so "auto" leaves such engines plain."""
    from types import SimpleNamespace

    from torch_trt_module.backends import _capturable

    def engine(backend: str, flags: list[str] | None) -> Any:  # only the two fields _capturable reads
        return SimpleNamespace(backend=backend, meta={} if flags is None else {"builder_flags": flags})

    assert not _capturable(engine("tensorrt_rtx", []))
    assert not _capturable(engine("tensorrt_rtx", None))  # an engine saved before the flag was recorded
    assert _capturable(engine("tensorrt_rtx", ["REQUIRE_USER_ALLOCATION", "REFIT"]))
    assert _capturable(engine("tensorrt", [])) and _capturable(engine("torch", None))


def test_every_path_takes_the_callers_dtypes_and_returns_the_out_dtypes() -> None:
    # An fp16 engine under "auto": the first call (plain), the judgement, the replays and a plain
    # shape all cast the same way, so a module sees fp32 whichever path ran.
    from .test_cudagraphs import HalfRunner, _half_expected

    for timings, verdict in ((LAUNCH_BOUND_CALL, "graph"), (GPU_BOUND_CALL, "plain")):
        inner = HalfRunner(torch.device("cpu"))
        auto = AutoGraphRunner(inner, device="cpu", driver=TimedGraphs(timings), out_dtypes=[torch.float32])
        assert auto.takes_caller_dtypes and auto.out_dtypes == [torch.float32]
        for _ in range(4):
            x = torch.randn(4, 6)
            (y,) = auto.run([x])
            assert y.dtype == torch.float32
            torch.testing.assert_close(y, _half_expected(x), rtol=0, atol=0)
        assert auto.verdicts == {(((4, 6), torch.float32),): verdict}
        assert set(inner.seen) == {torch.float16}
