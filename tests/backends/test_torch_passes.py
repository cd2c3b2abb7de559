"""The PyTorch runtime's inference passes (backends/_torch_passes.py) and the optimizing runner
(backends/_torch_opt.py), each against the program as captured, on the CPU. The GPU side
(TorchInductor on CUDA, channels_last) runs in tests/gpu/test_acceptance.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._core import settings as _settings
from torch_trt_module._formats.program import load_program
from torch_trt_module.backends import _inductor_store, _pad_channels, _torch_opt
from torch_trt_module.backends._torch_passes import optimize_graph


def _stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorms with statistics and affine values far from the identity (a fold that forgot one shows)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


class ConvBN(torch.nn.Module):
    """Folds: conv+BN (with and without conv bias, BN with and without affine), a 1-d conv.
    Does not fold: a conv whose output is also read elsewhere (the BN must stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8, affine=False)
        self.c3, self.b3 = torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8)
        self.c4, self.b4 = torch.nn.Conv1d(8, 4, 1), torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h))) + h
        y = self.c3(h)
        h = self.b3(y) + y  # c3's output has two readers: not folded
        return self.b4(self.c4(h.flatten(2))).mean(-1)


def _program(model: torch.nn.Module, x: torch.Tensor, **options: object):
    fast = ttm.compile(model, x, cache=False, **options)
    program = load_program(fast.engine.program)
    from torch.export.graph_signature import InputKind

    state = {**program.state_dict, **program.constants}
    names = [s.target for s in program.graph_signature.input_specs if s.kind != InputKind.USER_INPUT]
    return fast, program.graph_module, names, [state[n] for n in names]


def _count(gm: torch.fx.GraphModule, op: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and op in str(n.target))


def test_batchnorm_folding_matches_the_captured_program() -> None:
    model = _stats(ConvBN())
    x = torch.randn(2, 3, 12, 12)
    _, gm, names, weights = _program(model, x)
    opt, plan = optimize_graph(gm, names)
    assert _count(gm, "batch_norm") == 4
    assert _count(opt, "batch_norm") == 1 and plan.folds == 3  # b3 stays: c3's output is read twice
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 12, 12)
        (want,) = gm(*weights, xb)
        (got,) = opt(*plan.derive(dict(zip(names, weights))), xb)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, model(xb), rtol=1e-5, atol=1e-5)
    # the original graph is left as it was
    assert _count(gm, "batch_norm") == 4


class PermutedLinears(torch.nn.Module):
    """Linears over permuted inputs: batch-first MHA (its in-projection reads x.transpose(1, 0)), a
    permute that keeps the last dim, one that moves it (must not be rewritten) and a 2-d transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.keep = torch.nn.Linear(16, 16)
        self.moved = torch.nn.Linear(6, 3)
        self.flat = torch.nn.Linear(6, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.mha(x, x, x, need_weights=False)
        h = self.keep(h.permute(1, 0, 2)).permute(1, 0, 2)  # last dim stays; its input is contiguous
        m = self.moved(h[:, :, :5].permute(0, 2, 1))        # (B, 5, 6): the last dim moved, kept
        f = self.flat(x[0, :6, :6].t())                      # rank 2: kept
        return h.sum(-1) + m.sum((-1, -2)).unsqueeze(-1) + f.sum()


def test_linear_before_permute_matches_and_leaves_no_batched_gemm() -> None:
    # vit_b_16's in-projection ran as a bmm of 197 tiny GEMMs over a broadcast weight (0.81 ms of
    # 16 ms at batch 8 on the H100); over the unpermuted input it is one GEMM (issue 21).
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    model = PermutedLinears().eval()
    x = torch.randn(2, 6, 16)
    _, gm, names, weights = _program(model, x)
    weights = [w.detach() for w in weights]  # as TorchRunner passes them: ATen's matmul folds for a weight needing grad
    opt, plan = optimize_graph(gm, names)
    # the MHA's in-projection, `keep` and `moved` (which falls back as it runs: its last dim moves)
    assert _count(opt, "_permuted_linear") == 3
    derived = plan.derive(dict(zip(names, weights)))
    for batch in (1, 3):
        xb = torch.randn(batch, 6, 16)
        (want,) = gm(*weights, xb)
        (got,) = opt(*derived, xb)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, model(xb), rtol=1e-5, atol=1e-5)
        assert got.is_contiguous()
    xb = torch.randn(3, 6, 16)
    with torch.no_grad():
        before = make_fx(lambda *a: gm(*a), tracing_mode="fake")(*weights, xb)
        after = make_fx(lambda *a: opt(*a), tracing_mode="fake")(*derived, xb)
    def bmms(g: torch.fx.GraphModule) -> list[tuple[int, ...]]:
        return [tuple(n.args[0].meta["val"].shape) for n in g.graph.nodes if n.target is torch.ops.aten.bmm.default]

    # ATen's matmul over the MHA's transposed input: 6 GEMMs of 3 rows, the weight broadcast ...
    assert (6, 3, 16) in bmms(before)
    # ... and one GEMM over contiguous rows after; `keep`'s permute undoes a transpose (its input
    # is contiguous: left as it was), `moved` keeps its batched GEMM (its last dim moves)
    assert (6, 3, 16) not in bmms(after) and len(bmms(after)) == len(bmms(before)) - 1


class NormedAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.mha = torch.nn.LayerNorm(16), torch.nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.mha(h, h, h, need_weights=False)[0]


def test_linear_before_permute_sees_through_an_fp16_program_s_cast() -> None:
    # precision="fp16" keeps LayerNorm in fp32 and casts after it: linear(to(transpose(y), fp16))
    torch.manual_seed(0)
    model = NormedAttention().eval()
    _, gm, names, weights = _program(model, torch.randn(2, 6, 16), runtime="torch", precision="fp16",
                                     cast_inputs=True)
    weights = [w.detach() for w in weights]
    opt, plan = optimize_graph(gm, names)
    assert _count(opt, "_permuted_linear") == 3  # q, k and v
    derived = plan.derive(dict(zip(names, weights)))
    for batch in (1, 3):
        xb = torch.randn(batch, 6, 16, dtype=torch.float16)  # the program's input (compile() casts at the boundary)
        (want,) = gm(*weights, xb)
        (got,) = opt(*derived, xb)
        assert got.dtype == want.dtype == torch.float16
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


class Siblings(torch.nn.Module):
    """Sibling Linears: q/k/v with biases (merged, and one view of each needs a reshape: a slice
    of the merged output is not contiguous), a gated MLP's gate and up without biases (merged),
    a Linear whose output the program returns (its group is left alone) and a lone Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
        self.gate, self.up = torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(8, 12, bias=False)
        self.down = torch.nn.Linear(12, 8)
        self.out_a, self.out_b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        q = self.q(x).view(b, s * 8)  # merges (s, 8) of a (b, s, 20) slice: only a reshape can
        k = self.k(x).view(b, s, 2, 4).transpose(1, 2)
        att = (q.view(b, s, 2, 4).transpose(1, 2) @ k.transpose(-1, -2)).softmax(-1)
        h = (att @ self.v(x).view(b, s, 2, 2).transpose(1, 2)).transpose(1, 2).reshape(b, s, 4)
        m = self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        y = m + h.repeat(1, 1, 2)
        return self.out_a(y) + 1, self.out_b(y)  # out_b's output is returned as it is


def test_sibling_linears_are_merged_and_match_the_captured_program() -> None:
    # BERT's query, key and value projections as three GEMMs of N = 768 leave most of an H100's SMs
    # idle at batch 8; merged, they are one GEMM of N = 2304 (issue 21)
    torch.manual_seed(0)
    model = Siblings().eval()
    x = torch.randn(2, 5, 8)
    _, gm, names, weights = _program(model, x)
    weights = [w.detach() for w in weights]
    unmerged, _ = optimize_graph(gm, names)  # without the weights' shapes: nothing merged
    opt, plan = optimize_graph(gm, names, weights=dict(zip(names, weights)))
    assert _count(unmerged, "linear") == _count(gm, "linear") == 8
    assert plan.merges == 2 and _count(opt, "linear") == 5  # q+k+v and gate+up; down, out_a, out_b
    assert _count(opt, "reshape") - _count(gm, "reshape") == 3  # the views of q, k and v's slices
    derived = plan.derive(dict(zip(names, weights)))
    for batch in (1, 3):
        xb = torch.randn(batch, 5, 8)
        want, got = gm(*weights, xb), opt(*derived, xb)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert a.is_contiguous()
        for a, b in zip(got, model(xb)):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimize", ["passes", "inductor"])
def test_merged_linears_follow_a_refit(optimize: str) -> None:
    torch.manual_seed(0)
    model = Siblings().eval()
    fast = ttm.compile(model, torch.randn(2, 5, 8), cache=False, runtime="torch", optimize=optimize)
    assert fast.runner.optimized.startswith("2 Linear groups merged, ")
    x = torch.randn(3, 5, 8)
    for step in range(2):
        with torch.no_grad():
            model.k.weight.mul_(1.5)  # the middle of the merged weight
            model.up.weight.add_(0.1)
        for a, b in zip(fast(x), model(x)):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5, msg=f"stale after step {step}")


def test_the_passes_version_is_in_the_keyed_optimize_version() -> None:
    from torch_trt_module.backends._torch_passes import PASSES_VERSION

    assert PASSES_VERSION in _settings.OPTIMIZE_VERSION  # a changed pass is a cache miss


def test_fp16_program_folds_through_its_cast() -> None:
    model = _stats(ConvBN())
    x = torch.randn(2, 3, 12, 12)
    _, gm, names, weights = _program(model, x, precision="fp16")
    opt, plan = optimize_graph(gm, names)
    assert plan.folds >= 2 and _count(opt, "batch_norm") < _count(gm, "batch_norm")
    assert _count(opt, "_assert_tensor_metadata") == 0
    xb = torch.randn(3, 3, 12, 12).half()
    (want,) = gm(*weights, xb)
    (got,) = opt(*plan.derive(dict(zip(names, weights))), xb)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_channels_last_lays_out_conv_weights_only() -> None:
    model = _stats(ConvBN())
    _, gm, names, weights = _program(model, torch.randn(2, 3, 12, 12))
    opt, plan = optimize_graph(gm, names)
    derived = plan.derive(dict(zip(names, weights)), channels_last=True)
    conv4d = [derived[i] for i in plan.conv_weights if derived[i].dim() == 4]
    assert len(conv4d) == 3
    assert all(w.is_contiguous(memory_format=torch.channels_last) and w.stride(1) == 1 for w in conv4d)
    others = [w for i, w in enumerate(derived) if i not in plan.conv_weights]
    assert all(w.is_contiguous() for w in others)
    xb = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(opt(*derived, xb)[0], gm(*weights, xb)[0], rtol=1e-5, atol=1e-5)


class ConvAndSkip(torch.nn.Module):
    """An image that a convolution reads, and one that a convolution and an add read."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y) + y


def test_an_image_only_convolutions_read_is_the_one_given_channels_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Optimized.conv_inputs``: what a graph runner's static inputs may take the runner's layout
    for (``_cudagraphs.STATIC_INPUT_LAYOUT``). Made for a GPU's device (no CUDA call is made):
    channels_last weights are a GPU's only. The channel padding is off here: with it, the pad reads
    the 3-channel image (tests/backends/test_pad_channels.py)."""
    monkeypatch.setattr(_pad_channels, "PAD_INPUT_CHANNELS", False)
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    _, gm, names, weights = _program(ConvAndSkip().eval(), (x, y))
    on_gpu = _torch_opt.Optimized.make(gm, names, weights, "inductor", torch.device("cuda"))
    assert on_gpu is not None and on_gpu.channels_last and on_gpu.conv_inputs == [0]
    on_cpu = _torch_opt.Optimized.make(gm, names, weights, "inductor", torch.device("cpu"))
    assert on_cpu is not None and on_cpu.conv_inputs == []  # no channels_last weights on a CPU


@pytest.mark.parametrize("optimize", ["passes", "inductor"])
def test_runner_refolds_at_every_refit(optimize: str) -> None:
    """Follow mode: BatchNorm statistics and conv weights change; the folded weights follow."""
    model = _stats(ConvBN())
    fast = ttm.compile(model, torch.randn(2, 3, 12, 12), cache=False, runtime="torch", optimize=optimize)
    assert fast.runner.optimized == ("3 BatchNorms folded, TorchInductor" if optimize == "inductor"
                                      else "3 BatchNorms folded, eager kernels")
    x = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    for step in range(3):
        with torch.no_grad():
            model.b1.running_var.mul_(1.5)
            model.b2.running_mean.add_(0.3)
            model.c1.weight.mul_(0.9)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4, msg=f"stale after step {step}")


def test_inductor_failure_falls_back_to_the_graph(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A double of Inductor's compile that raises, as Inductor does where it cannot compile (no
    compiler, an op it lacks): the module still computes, and says so once."""

    def failing_compile(*_: object, **__: object) -> object:
        raise RuntimeError("InductorError: no C++ compiler")

    monkeypatch.setattr(_inductor_store, "_compile_artifact", failing_compile)
    _inductor_store.warned.clear()
    model = _stats(ConvBN())
    fast = ttm.compile(model, torch.randn(2, 3, 12, 12), cache=False, runtime="torch", optimize="inductor",
                       verify=False)
    x = torch.randn(2, 3, 12, 12)
    with caplog.at_level(logging.WARNING):
        out1, out2 = fast(x), fast(x)
    torch.testing.assert_close(out1, model(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out2, out1)
    warned = [r.getMessage() for r in caplog.records if "TorchInductor could not compile" in r.getMessage()]
    assert warned == ["TorchInductor could not compile this program (RuntimeError: InductorError: no C++ "
                      "compiler); it runs without Inductor"]
    assert fast.runner.optimized == "3 BatchNorms folded, eager kernels"


def test_a_failing_cpp_wrapper_falls_back_to_the_python_wrapper(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """On a GPU, Inductor first compiles with its C++ wrapper. A double of Inductor's compile that
    fails with it (no C++ compiler on the user's machine) and works without: the call is computed
    by the graph, the next one by Inductor with the Python wrapper, and one WARNING says why."""
    seen: list[object] = []

    def compile_(graph: torch.fx.GraphModule, args: list[torch.Tensor], options: dict[str, object]) -> Any:
        seen.append(options)
        if options.get("cpp_wrapper"):
            raise RuntimeError("InductorError: CppCompileError: g++ not found")
        return graph.forward

    monkeypatch.setattr(_inductor_store, "_compile_artifact", compile_)
    monkeypatch.setattr(_inductor_store, "store_dir", lambda: None)  # the double's callable cannot be stored
    monkeypatch.setitem(_torch_opt._TIERS, False, _torch_opt._TIERS[True])  # the GPU's tiers, on this CPU
    _inductor_store.warned.clear()
    model = _stats(ConvBN())
    fast = ttm.compile(model, torch.randn(2, 3, 12, 12), cache=False, runtime="torch", optimize="inductor",
                       verify=False)
    assert fast.runner.optimized == "3 BatchNorms folded, TorchInductor (C++ wrapper)"
    x = torch.randn(2, 3, 12, 12)
    with caplog.at_level(logging.WARNING):
        outs = [fast(x) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert seen == [{"cpp_wrapper": True, "cpp.vec_isa_ok": False}, {}]  # compiled twice: C++, then Python
    assert [r.getMessage() for r in caplog.records if "TorchInductor" in r.getMessage()] == [
        "TorchInductor could not compile this program with its C++ wrapper (RuntimeError: InductorError: "
        "CppCompileError: g++ not found); it compiles with the Python wrapper"]
    assert fast.runner.optimized == "3 BatchNorms folded, TorchInductor"


def test_the_gpu_tier_s_isa_option_leaves_the_process_s_isa_list_as_it_was(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    """The GPU's tiers compile with ``cpp.vec_isa_ok=False`` (torch 2.11 checks each vector ISA in
    a fresh process at every start: 37.8 s of a warm start on the H100 machine). Inductor keeps
    one ISA list for the whole process. Where this compile filled it (empty), it is emptied
    again, so the user's own CPU compiles still check and use their ISAs; where the user's
    compile filled it first, it stays. Real Inductor on this CPU, with the GPU tier's ISA option
    (without the C++ wrapper, whose CPU form is another code path)."""
    from torch._inductor.cpu_vec_isa import supported_vec_isa_list, valid_vec_isa_list

    def fresh() -> None:  # Inductor's ISA answers as in a process where nothing compiled C++ yet
        valid_vec_isa_list.cache_clear()
        for isa in supported_vec_isa_list:
            getattr(type(isa).__bool__, "cache_clear", lambda: None)()

    # Inductor's own cache keys its code by the option, not by the ISA it picked (an earlier run's
    # vectorized kernels would come back for a compile that has no ISA): this test's cache is its own.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fresh()
    checked = [str(isa) for isa in valid_vec_isa_list()]  # what this CPU's checks find
    monkeypatch.setitem(_torch_opt._TIERS, False, ({"cpp.vec_isa_ok": False},))
    model, x = _stats(ConvBN()), torch.randn(2, 3, 12, 12)
    fresh()
    fast = ttm.compile(model, x, cache=False, runtime="torch", optimize="inductor", verify=False)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    assert fast.runner.optimized == "3 BatchNorms folded, TorchInductor"
    assert valid_vec_isa_list.cache_info().currsize == 0
    users = valid_vec_isa_list()  # the user's CPU compile after ours: checked, all of them
    assert [str(isa) for isa in users] == checked
    other = ttm.compile(model, torch.randn(3, 3, 10, 10), cache=False, runtime="torch", optimize="inductor",
                        verify=False)
    other(torch.randn(3, 3, 10, 10))
    assert valid_vec_isa_list.cache_info().currsize == 1 and valid_vec_isa_list() is users


def _forwarding_compile(monkeypatch: pytest.MonkeyPatch, fail_at_batch: int) -> None:
    """A double of Inductor's compile whose program is the graph itself, but which raises as Inductor
    does when it compiles for an input of ``fail_at_batch`` rows (a lowering that fails only for
    the new shapes). Nothing is stored: the double's callable is no artifact."""

    def compile_(graph: torch.fx.GraphModule, args: list[torch.Tensor], options: dict[str, object]) -> Any:
        if args[-1].shape[0] == fail_at_batch:
            raise RuntimeError("InductorError: LoweringException at the new shapes")
        return graph.forward

    monkeypatch.setattr(_inductor_store, "_compile_artifact", compile_)
    monkeypatch.setattr(_inductor_store, "store_dir", lambda: None)


def test_an_inductor_failure_at_a_later_shape_falls_back_instead_of_failing_the_call(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Before: only the first call's failure fell back; a failure when Inductor compiled again for a
    # new batch size failed the user's call, which the graph itself runs.
    _forwarding_compile(monkeypatch, fail_at_batch=5)
    _inductor_store.warned.clear()
    model = _stats(ConvBN())
    fast = ttm.compile(model, torch.randn(2, 3, 12, 12), cache=False, runtime="torch", optimize="inductor",
                       verify=False)
    fast(torch.randn(2, 3, 12, 12))
    assert fast.runner.optimized == "3 BatchNorms folded, TorchInductor"
    x = torch.randn(5, 3, 12, 12)
    with caplog.at_level(logging.WARNING):
        out = fast(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert [r.getMessage() for r in caplog.records if "TorchInductor" in r.getMessage()] == [
        "TorchInductor could not compile this program (RuntimeError: InductorError: LoweringException at the new "
        "shapes); it runs without Inductor"]
    assert fast.runner.optimized == "3 BatchNorms folded, eager kernels"


@pytest.mark.parametrize("optimize", ["passes", "inductor"])
def test_a_pass_that_fails_at_a_later_shape_falls_back_to_the_program_as_captured(
        optimize: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A double of a pass's runtime function that fails at batch 5 (a pass bug that only some inputs
    # reach): the call is computed by the program as captured, and so are the calls after it.
    from torch_trt_module.backends import _torch_passes

    real = _torch_passes._permuted_linear

    def flaky(y: torch.Tensor, *rest: Any) -> torch.Tensor:
        if y.shape[0] == 5:  # the permute's input is batch-first MHA's (B, L, E)
            raise RuntimeError("a pass bug at batch 5")
        return real(y, *rest)

    monkeypatch.setattr(_torch_passes, "_permuted_linear", flaky)
    _inductor_store.warned.clear()
    torch.manual_seed(0)
    model = NormedAttention().eval()
    fast = ttm.compile(model, torch.randn(2, 6, 16), cache=False, runtime="torch", optimize=optimize)
    assert not fast.runner.optimized.startswith("none")
    x = torch.randn(5, 6, 16)
    with caplog.at_level(logging.WARNING):
        outs = [fast(x), fast(x), fast(torch.randn(2, 6, 16))]
    torch.testing.assert_close(outs[0], model(x).detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1], outs[0])
    warned = [r.getMessage() for r in caplog.records if "passes" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("the inference passes' program failed on these inputs (")
    assert "a pass bug at batch 5" in warned[0]
    assert fast.runner.optimized == "none (the inference passes' program failed; it runs as captured)"


class _Pick(torch.nn.Module):
    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, idx) * 2


def test_an_error_the_graph_raises_too_is_the_inputs_and_keeps_inductor(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _forwarding_compile(monkeypatch, fail_at_batch=-1)
    _inductor_store.warned.clear()
    x, idx = torch.randn(4, 3), torch.tensor([0, 3])
    fast = ttm.compile(_Pick().eval(), (x, idx), cache=False, runtime="torch", optimize="inductor", verify=False)
    fast(x, idx)
    with caplog.at_level(logging.WARNING), pytest.raises(ttm.RuntimeFailure, match="index"):
        fast(x, torch.tensor([0, 9]))  # out of range: the graph fails as well
    assert not [r for r in caplog.records if "TorchInductor" in r.getMessage()]
    assert fast.runner.optimized == "TorchInductor"
    torch.testing.assert_close(fast(x, idx), x.index_select(0, idx) * 2)


def test_optimize_is_keyed_with_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    default = _settings.Settings.from_options()
    assert default.engine_fields()["optimize"] == f"auto@{_settings.OPTIMIZE_VERSION}"
    assert _settings.Settings.from_options(optimize="none").engine_fields() != default.engine_fields()
    before = default.engine_fields()
    monkeypatch.setattr(_settings, "OPTIMIZE_VERSION", "bnfold-2")
    assert default.engine_fields() != before
    with pytest.raises(ttm.SettingsError, match="option 'optimize'"):
        _settings.Settings.from_options(optimize="fast")


def test_optimize_none_runs_the_program_as_captured() -> None:
    model = _stats(ConvBN())
    fast = ttm.compile(model, torch.randn(2, 3, 12, 12), cache=False, runtime="torch", optimize="none")
    assert fast.runner.optimized == "none"
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_training_loop_is_followed_with_batchnorm_refolded(foreach: bool) -> None:
    """tests/gpu/test_optimized_runtime.py's loop on the CPU: train-mode forwards move the BatchNorm
    statistics, SGD steps every weight; after each step the folded program equals eager in fp32,
    and an explicit refit changes nothing (it was not stale)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    fast = ttm.compile(model, torch.randn(2, 3, 32, 32), cache=False, runtime="torch", optimize="passes")
    assert fast.runner.optimized == "20 BatchNorms folded, eager kernels"
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=foreach)
    target = torch.randn(4, 10)
    for step in range(3):
        model.train()
        loss = (model(torch.randn(4, 3, 32, 32)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        y = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            got = fast(y)
            torch.testing.assert_close(got, model(y), rtol=1e-4, atol=1e-5, msg=f"step {step}")
            fast.refit(model)
            torch.testing.assert_close(fast(y), got, rtol=1e-6, atol=1e-7, msg=f"stale at step {step}")
