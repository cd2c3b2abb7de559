"""torch_trt_module._core.numerics: strict_fp32 turns TF32 off for one block and puts every flag back
exactly (after an exception too, nested, and when the user set TF32 with the legacy ``allow_tf32``
API); tf32_state reads the flags without the legacy getters; the tolerance policy and its lookups.

The flags are process-wide, so every test here runs under a fixture that restores them.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
import torch

from torch_trt_module._core import numerics as _numerics
from torch_trt_module._core.numerics import (
    POLICY,
    Tolerance,
    eager_uses_tf32,
    numerics_of,
    policy_for,
    strict_fp32,
    tf32_state,
)

NEW_API = _numerics._new_api()
needs_new_api = pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the legacy allow_tf32 flags")


def flags() -> dict[str, Any]:
    """Every TF32 setting torch has, read without the legacy getters (they raise once APIs are mixed)."""
    state: dict[str, Any] = {p: _numerics._get(p) for p in _numerics._PRECISION_FLAGS}
    try:
        state["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses to answer once the matmul flags of the two APIs disagree
        state["float32_matmul_precision"] = "mixed"
    return state


def legacy_flags() -> dict[str, bool]:
    """The legacy booleans; raises RuntimeError where torch sees a mix of the legacy and new APIs."""
    return {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}


@pytest.fixture(autouse=True)
def restore_flags() -> Iterator[None]:
    before, legacy = flags(), legacy_flags()  # raises if an earlier test left the two APIs mixed
    yield
    # The legacy setters first: torch keeps hidden state behind them, and restoring only the
    # fp32_precision strings can leave the legacy getters raising in every later test (torch.export
    # reads them), even though every string reads as before.
    torch.backends.cudnn.allow_tf32 = legacy["cudnn"]
    torch.backends.cuda.matmul.allow_tf32 = legacy["matmul"]
    torch.set_float32_matmul_precision(before["float32_matmul_precision"])
    for path in _numerics._PRECISION_FLAGS:
        if isinstance(before[path], str):
            _numerics._set(path, before[path])
    assert flags() == before and legacy_flags() == legacy, "the test left TF32 flags changed"


# --------------------------------------------------------------------------- strict_fp32

def test_strict_fp32_turns_tf32_off_and_restores_every_flag() -> None:
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.set_float32_matmul_precision("high")
    before = flags()
    assert tf32_state() == {"cudnn_conv": True, "cuda_matmul": True}
    with strict_fp32():
        assert tf32_state() == {"cudnn_conv": False, "cuda_matmul": False}
        if NEW_API:
            assert {p: _numerics._get(p) for p in _numerics._STRICT} == dict.fromkeys(_numerics._STRICT, "ieee")
    assert flags() == before


def test_every_flag_is_restored_after_an_exception() -> None:
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    before = flags()
    with pytest.raises(RuntimeError, match="boom"):
        with strict_fp32():
            raise RuntimeError("boom")
    assert flags() == before and tf32_state()["cudnn_conv"]


def test_nested_strict_blocks_restore_to_the_outer_state() -> None:
    torch.set_float32_matmul_precision("high")
    before = flags()
    with strict_fp32():
        inside = flags()
        with strict_fp32():
            assert flags() == inside
        assert flags() == inside  # the inner block restored the outer block's (strict) flags
    assert flags() == before


@needs_new_api
@pytest.mark.parametrize("setting", ["ieee", "tf32", "none"])
def test_values_of_the_new_api_survive_as_they_were(setting: str) -> None:
    for path in _numerics._PRECISION_FLAGS:
        _numerics._set(path, setting)
    before = flags()
    with strict_fp32():
        pass
    assert flags() == before


@pytest.mark.parametrize("cudnn,matmul", [(False, True), (True, False), (False, False), (True, True)])
def test_a_user_s_legacy_allow_tf32_settings_survive(cudnn: bool, matmul: bool) -> None:
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.backends.cuda.matmul.allow_tf32 = matmul
    before = flags()
    assert legacy_flags() == {"cudnn": cudnn, "matmul": matmul}
    with strict_fp32():
        assert tf32_state() == {"cudnn_conv": False, "cuda_matmul": False}
    assert flags() == before
    # The legacy getters raise where the two APIs were left mixed; restored exactly, they still read.
    assert legacy_flags() == {"cudnn": cudnn, "matmul": matmul}
    assert tf32_state() == {"cudnn_conv": cudnn, "cuda_matmul": matmul}


def test_a_second_thread_waits_for_the_first_strict_block() -> None:
    # Two overlapping blocks would each restore what the other set; one runs at a time.
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    before = flags()
    inside, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with strict_fp32():
            order.append("first in")
            inside.set()
            release.wait(5)
            order.append("first out")

    def second() -> None:
        inside.wait(5)
        with strict_fp32():
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    inside.wait(5)
    threads[1].join(0.2)  # second is blocked on the lock meanwhile
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["first in", "first out", "second in"]
    assert flags() == before


# --------------------------------------------------------------------------- tf32_state

@needs_new_api
def test_tf32_state_follows_the_precision_flags_and_their_parents() -> None:
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert tf32_state()["cudnn_conv"] is False
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert tf32_state()["cudnn_conv"] is True
    torch.backends.cudnn.conv.fp32_precision = "none"  # inherit: cudnn's and the root's are "none" too
    assert tf32_state()["cudnn_conv"] is False


@needs_new_api
def test_tf32_state_of_matmul_follows_float32_matmul_precision() -> None:
    torch.set_float32_matmul_precision("highest")
    assert tf32_state()["cuda_matmul"] is False
    torch.set_float32_matmul_precision("high")
    assert tf32_state()["cuda_matmul"] is True
    torch.set_float32_matmul_precision("medium")
    assert tf32_state()["cuda_matmul"] is True


@needs_new_api
@pytest.mark.parametrize("path,key", [("cuda.matmul.fp32_precision", "cuda_matmul"),
                                      ("fp32_precision", "cuda_matmul"),
                                      ("cudnn.fp32_precision", "cudnn_conv")])  # conv inherits it
def test_tf32_state_after_the_new_api(path: str, key: str) -> None:
    torch.backends.cudnn.conv.fp32_precision = "none"
    _numerics._set(path, "tf32")
    try:
        assert tf32_state()[key] is True
        assert eager_uses_tf32("cuda")  # verify() asks this for a model on a GPU
    finally:
        for p in ("fp32_precision", "cudnn.fp32_precision", "cuda.matmul.fp32_precision"):
            _numerics._set(p, "none")
        torch.set_float32_matmul_precision("highest")  # un-mix, so the fixture can read the flags again


def test_tf32_state_reads_without_the_legacy_getters_when_apis_are_mixed() -> None:
    torch.backends.cudnn.allow_tf32 = False  # legacy: conv and rnn together
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # new: conv alone; now the legacy getter raises
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs|used a mix"):
        torch.backends.cudnn.allow_tf32
    assert tf32_state()["cudnn_conv"] is True


def test_eager_uses_tf32_only_on_cuda_devices() -> None:
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert eager_uses_tf32("cuda") and eager_uses_tf32(torch.device("cuda", 1))  # no GPU needed: only the flags
    assert not eager_uses_tf32("cpu") and not eager_uses_tf32(None) and not eager_uses_tf32("meta")
    with strict_fp32():
        assert not eager_uses_tf32("cuda")


# --------------------------------------------------------------------------- the policy

def test_policy_grows_looser_from_fp32_to_bf16() -> None:
    order = [POLICY[n] for n in ("fp32", "tf32", "fp16", "bf16")]
    assert set(POLICY) == {"fp32", "tf32", "fp16", "bf16"}
    for tighter, looser in zip(order, order[1:]):
        assert tighter.rtol <= looser.rtol and tighter.atol <= looser.atol
        assert tighter.atol_rms <= looser.atol_rms and tighter.min_cosine >= looser.min_cosine
    assert all(0 < t.min_cosine < 1 and t.atol_rms > 0 for t in order)


def test_atol_follows_the_output_scale() -> None:
    t = POLICY["fp32"]
    assert t.atol_for(0.0) == t.atol
    assert t.atol_for(1e4) == pytest.approx(t.atol_rms * 1e4)
    assert Tolerance(rtol=0.1, atol=0.5).atol_for(1e9) == 0.5  # no scale term: the plain check


def test_policy_for_without_overrides_is_the_policy() -> None:
    for name, tol in POLICY.items():
        assert policy_for(name) is tol
    with pytest.raises(KeyError):
        policy_for("int8")


@pytest.mark.parametrize("rtol,atol", [(0.5, None), (None, 0.25), (0, 0)])
def test_explicit_tolerances_make_the_plain_elementwise_check(rtol: float | None, atol: float | None) -> None:
    base = POLICY["fp16"]
    got = policy_for("fp16", rtol=rtol, atol=atol)
    assert got == Tolerance(rtol=base.rtol if rtol is None else rtol, atol=base.atol if atol is None else atol)
    assert got.atol_rms == 0.0 and got.min_cosine == 0.0  # as Polygraphy: no scale term, no cosine bound
    assert isinstance(got.rtol, float) and isinstance(got.atol, float)


@pytest.mark.parametrize("precision,tf32,expected", [("fp32", False, "fp32"), ("fp32", True, "tf32"),
                                                     ("fp16", True, "fp16"), ("bf16", False, "bf16")])
def test_numerics_of(precision: str, tf32: bool, expected: str) -> None:
    assert numerics_of(precision, tf32=tf32) == expected


def test_tolerance_is_frozen() -> None:
    with pytest.raises(AttributeError):
        POLICY["fp32"].rtol = 1.0  # type: ignore[misc]
