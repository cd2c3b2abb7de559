"""The optimizing PyTorch runtime on a CUDA GPU (issue 21): the captured program after the
inference passes, compiled by TorchInductor, against eager with PyTorch's default numerics.

- each optimized path (fp32, fp16) at the profile's corners;
- the first convolution's input channels padded (on by default where Inductor compiles for a GPU),
  with a refit;
- follow mode through a training loop, with BatchNorm folded and refolded at every refit;
- follow mode's look after a quiet call's run: each kind of change seen, refit and run again;
- a saved module loaded where Inductor's caches are empty (another machine, simulated by a
  fresh process with an empty ``TORCHINDUCTOR_CACHE_DIR``);
- a corrupt program in the engine cache is detected and rebuilt, and the rebuilt module is
  optimized again;
- a warm cache hit in a fresh process loads the compact graph (``_formats.graph``) on the GPU,
  and Inductor's stored artifact for it (C++ wrapper): no compile;
- a damaged artifact is detected, compiled again and stored again;
- an encoder block: its q/k/v Linears merged, Inductor's C++ wrapper, and in fp16 and bf16 its
  attention fused in the low dtype, against eager at the profile's corners.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_trt_module as ttm
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._verify.compare import compare_outputs
from torch_trt_module._core.numerics import eager_uses_tf32, policy_for, strict_fp32

pytestmark = pytest.mark.gpu
torchvision = pytest.importorskip("torchvision")

if not torch.cuda.is_available():  # pragma: no cover - the marker's skip, made explicit for collection
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _policy(precision: str) -> object:
    return policy_for("tf32") if precision == "fp32" and eager_uses_tf32("cuda") else policy_for(precision)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().cuda()
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real activations, not the identity
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64, device="cuda"))
    return model.eval()


@pytest.mark.parametrize("optimize", ["passes", "inductor"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_optimized_program_matches_eager_at_the_profile_corners(precision: str, optimize: str) -> None:
    model = _resnet()
    fast = ttm.compile(model, torch.randn(4, 3, 64, 64, device="cuda"), precision=precision, max_batch=16,
                       cast_inputs=True, cache=False, optimize=optimize)
    assert fast.backend == "torch"
    # fp16: the casts around the folded BatchNorms go too (backends/_casts.py).
    folded = "20 BatchNorms folded" + (", 40 casts dropped" if precision == "fp16" else "")
    # Inductor on a GPU: the first convolution's 3 input channels padded too (by default, since
    # the eleventh session); the eager kernels' program is not padded.
    assert fast.runner.optimized == folded + (
        ", 1 convolutions' input channels padded, channels_last weights, TorchInductor (C++ wrapper)"
        if optimize == "inductor" else ", eager kernels") + ", CUDA graphs where faster"
    for batch in (1, 4, 16):
        for call in range(3):  # plain, judged (graphs="auto", the default), then a replay where one was kept
            x = torch.randn(batch, 3, 64, 64, device="cuda")
            # The reference is eager in IEEE fp32, so that only the compiled side rounds (in TF32 or in
            # fp16), as the policies assume. Against eager in TF32 the two sides' rounding errors add:
            # on the H100, 1 element of 16000 at batch 16 missed the TF32 bar by 1% (0.00129 against
            # 0.00128, cosine 0.999997), in one of the nine calls.
            with torch.no_grad(), strict_fp32():
                want = model(x)
            report = compare_outputs(fast(x).float(), want, tolerance=_policy(precision))
            assert report.passed, f"batch {batch}, call {call + 1}: {report}"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_padded_input_channels_match_eager_and_follow_a_refit(precision: str) -> None:
    """``backends/_pad_channels.py``, on by default: resnet18's 3-channel first convolution padded
    (to 4 in fp32, 8 in fp16), against eager at the profile's corners, then after its weights
    change (the padded weight is derived: refit, never stale)."""
    model = _resnet()
    fast = ttm.compile(model, torch.randn(4, 3, 64, 64, device="cuda"), precision=precision, max_batch=16,
                       cast_inputs=True, cache=False)
    assert "1 convolutions' input channels padded" in fast.runner.optimized
    for step in range(2):
        for batch in (1, 16):
            x = torch.randn(batch, 3, 64, 64, device="cuda")
            with torch.no_grad(), strict_fp32():
                want = model(x)
            report = compare_outputs(fast(x).float(), want, tolerance=_policy(precision))
            assert report.passed, f"step {step}, batch {batch}: {report}"
        with torch.no_grad():
            model.conv1.weight.mul_(1.5)
            model.bn1.running_var.mul_(0.5)


@pytest.mark.parametrize("optimize", ["passes", "inductor"])
def test_follow_mode_refolds_batchnorm_through_a_training_loop(optimize: str) -> None:
    """After every step (BatchNorm statistics and every weight moved), the followed module equals
    eager in IEEE fp32, and an explicit refit changes nothing (it was not stale).

    Both sides run under strict_fp32(): in TF32, two correct programs that round differently (a
    folded convolution, an unfolded one) drift apart once training drives the logits toward a
    small difference of large sums (the first run of this test on the H100, with a loss of
    ``output.square()``: 8 of 10 steps "failed" with nothing stale). TF32 parity is the corners test's.
    """
    model = _resnet()
    fast = ttm.compile(model, torch.randn(4, 3, 64, 64, device="cuda"), cache=False, optimize=optimize)
    assert "BatchNorms folded" in fast.runner.optimized
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = torch.randn(8, 1000, device="cuda")
    mismatched, stale = [], []
    for step in range(10):
        model.train()
        loss = (model(torch.randn(8, 3, 64, 64, device="cuda")) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # and the forward above moved every BatchNorm's running statistics
        model.eval()
        y = torch.randn(4, 3, 64, 64, device="cuda")
        with torch.no_grad(), strict_fp32():
            want = model(y)
            got = fast(y)
            report = compare_outputs(got, want, tolerance=policy_for("fp32"))
            if not report.passed:
                mismatched.append(f"step {step}: {report}")
            fast.refit(model)
            if not torch.allclose(fast(y), got, rtol=1e-6, atol=1e-6):
                stale.append(step)
    assert not stale, f"follow mode served stale weights at steps {stale}"
    assert not mismatched, "\n".join(mismatched)


@pytest.mark.parametrize("cuda_graphs", ["auto", True])
def test_follow_mode_looks_after_the_run_and_is_never_stale(cuda_graphs: bool | str) -> None:
    """Quiet calls enqueue their run and look at the source's weights after it
    (``_runtime/following.py``): a change found then is refit, and the call runs again. Each kind
    of change, made after quiet calls (so the call that meets it looks late), against eager."""
    model = _resnet()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    fast = ttm.compile(model, x, cache=False, cuda_graphs=cuda_graphs)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    fused = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # writes without bumping versions
    other = _resnet()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)

    def step(opt: torch.optim.Optimizer) -> None:
        model.train()  # the forward also moves every BatchNorm's running statistics
        with torch.enable_grad():  # the calls around it run under no_grad
            model(torch.randn(8, 3, 64, 64, device="cuda")).square().mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()

    def reassign() -> None:
        with torch.no_grad():
            model.fc.weight.data = model.fc.weight.data * 2  # new memory, no version bump

    changes = {"an SGD step": lambda: step(sgd), "a fused Adam step": lambda: step(fused),
               "a reassigned .data": reassign, "load_state_dict": lambda: model.load_state_dict(other.state_dict())}
    failed = []
    with torch.no_grad(), strict_fp32():
        for name, change in changes.items():
            for _ in range(4):  # quiet calls: the first looks first, the rest look late
                fast(x)
            before = fast.weights_version
            change()
            got, want = fast(x), model(x)
            report = compare_outputs(got, want, tolerance=policy_for("fp32"))
            if not report.passed or fast.weights_version != before + 1:
                failed.append(f"{name}: version {before} -> {fast.weights_version}, {report}")
    assert not failed, "\n".join(failed)


_LOAD = """
import sys, torch, torch_trt_module as ttm
fast = ttm.load(sys.argv[1], device="cuda")
x = torch.load(sys.argv[2])
out = fast(x.cuda())
torch.save(out.cpu(), sys.argv[3])
print(fast.runner.optimized)
"""


def test_a_saved_module_compiles_again_where_inductor_has_no_cache(tmp_path: Path) -> None:
    model = _resnet()
    fast = ttm.compile(model, torch.randn(4, 3, 64, 64, device="cuda"), cache=False, optimize="inductor")
    x = torch.randn(3, 3, 64, 64)
    ttm.save(fast, tmp_path / "m.pt")
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "empty-inductor-cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "m.pt"), str(tmp_path / "x.pt"),
                        str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TorchInductor" in r.stdout
    with torch.no_grad():
        want = model(x.cuda())
    assert compare_outputs(torch.load(tmp_path / "out.pt").cuda(), want, tolerance=_policy("fp32")).passed


def test_a_corrupt_program_is_rebuilt_and_optimized_again(tmp_path: Path) -> None:
    model = _resnet()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    ttm.compile(model, x, cache_dir=tmp_path, optimize="inductor")
    (blob,) = (tmp_path / "entries").glob("*+program+*.blob")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10
    blob.write_bytes(bytes(data))
    builds = _compile.STATS["builds"]
    fast = ttm.compile(model, x, cache_dir=tmp_path, optimize="inductor")
    assert _compile.STATS["builds"] == builds + 1
    assert "TorchInductor" in fast.runner.optimized
    with torch.no_grad():
        want = model(x)
    assert compare_outputs(fast(x), want, tolerance=_policy("fp32")).passed


_HIT = """
import sys, torch, torch_trt_module as ttm
torch.manual_seed(0)
import torchvision
model = torchvision.models.resnet18(num_classes=10).eval().cuda()
x = torch.load(sys.argv[2]).cuda()
fast = ttm.compile(model, x, cache_dir=sys.argv[1], runtime="torch")
print(fast.runner.program_format)
torch.save(fast(x).cpu(), sys.argv[3])
"""


def test_a_warm_hit_in_a_fresh_process_loads_the_compact_graph_on_the_gpu(tmp_path: Path) -> None:
    # The compact graph's device arguments are rewritten for the GPU (_retarget) at load: a program
    # captured with device= arguments must run there as it did at compile time.
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    outs = []
    for run in ("cold", "warm"):
        r = subprocess.run([sys.executable, "-c", _HIT, str(tmp_path / "cache"), str(tmp_path / "x.pt"),
                            str(tmp_path / f"{run}.pt")], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs == ["compact graph", "compact graph"]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    with torch.no_grad():
        want = model(x.cuda())
    for run in ("cold", "warm"):
        assert compare_outputs(torch.load(tmp_path / f"{run}.pt").cuda(), want, tolerance=_policy("fp32")).passed


_ARTIFACT = """
import json, sys, torch, torch_trt_module as ttm
from torch_trt_module.backends import _inductor_store
torch.manual_seed(0)
import torchvision
model = torchvision.models.resnet18(num_classes=10).eval().cuda()
x = torch.load(sys.argv[1]).cuda()
fast = ttm.compile(model, x, cache=False, runtime="torch", verify=False)
torch.save(fast(x).cpu(), sys.argv[2])
print(json.dumps({**_inductor_store.STATS, "optimized": fast.runner.optimized}))
"""


def test_inductor_s_artifact_loads_in_a_fresh_process_and_a_damaged_one_is_compiled_again(tmp_path: Path) -> None:
    # Each process has its own in-memory programs: the second one loads the artifact the first
    # stored (under TORCHINDUCTOR_CACHE_DIR); the third finds it damaged and compiles it again.
    import json

    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    stats = []
    for run in ("cold", "warm", "damaged"):
        if run == "damaged":
            (art,) = (tmp_path / "inductor" / "torch_trt_module").glob("*.ttmia")
            data = bytearray(art.read_bytes())
            data[-64] ^= 0x01
            art.write_bytes(bytes(data))
        r = subprocess.run([sys.executable, "-c", _ARTIFACT, str(tmp_path / "x.pt"), str(tmp_path / f"{run}.pt")],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        stats.append(json.loads(r.stdout.strip().splitlines()[-1]))
        if run == "damaged":
            assert "could not be used (EngineLoadError" in r.stderr and "it is compiled again" in r.stderr
    cold, warm, damaged = ({k: s[k] for k in ("compiled", "loaded", "refused")} for s in stats)
    assert cold == {"compiled": 1, "loaded": 0, "refused": 0}
    assert warm == {"compiled": 0, "loaded": 1, "refused": 0}
    assert damaged == {"compiled": 1, "loaded": 0, "refused": 1}
    assert all("TorchInductor (C++ wrapper)" in s["optimized"] for s in stats), stats
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    with torch.no_grad():
        want = model(x.cuda())
    for run in ("cold", "warm", "damaged"):
        got = torch.load(tmp_path / f"{run}.pt").cuda()
        assert compare_outputs(got, want, tolerance=_policy("fp32")).passed, run


class _Encoder(nn.Module):
    """A BERT-like block: separate q, k, v Linears (merged by the passes), padding-masked attention
    through ``F.scaled_dot_product_attention`` (fused in fp16/bf16 programs), LayerNorm, MLP."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        keep = mask[:, None, None, :].bool()
        a = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                                       attn_mask=keep)
        h = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, d)))
        return self.ln2(h + self.down(nn.functional.gelu(self.up(h))))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_an_encoder_block_merged_fused_and_compiled_matches_eager(precision: str) -> None:
    torch.manual_seed(0)
    model = _Encoder().eval().cuda()
    x = torch.randn(2, 16, 64, device="cuda")
    mask = torch.ones(2, 16, device="cuda")
    mask[:, 12:] = 0  # tail padding
    fast = ttm.compile(model, (x, mask), dynamic={"x": {0: (1, 2, 8)}, "mask": {0: (1, 2, 8)}}, precision=precision,
                       cast_inputs=True, cache=False)
    assert fast.backend == "torch"
    assert fast.runner.optimized == "1 Linear groups merged, TorchInductor (C++ wrapper), CUDA graphs where faster"
    from torch_trt_module._formats.program import load_program

    program = load_program(fast.engine.program).graph_module
    assert any("scaled_dot_product" in str(n.target) for n in program.graph.nodes)  # fused, in every precision
    for batch in (1, 2, 8):
        for call in range(3):  # plain, judged, then a replay where a graph was kept
            xb, mb = torch.randn(batch, 16, 64, device="cuda"), mask[:1].expand(batch, 16).contiguous()
            with torch.no_grad():
                want = model(xb, mb)
            report = compare_outputs(fast(xb, mb).float(), want, tolerance=_policy(precision))
            assert report.passed, f"batch {batch}, call {call + 1}: {report}"
