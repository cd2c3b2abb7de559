"""The conformance cases of ../shared/zoo/cases.md as data.

Each :class:`Case` names a constructor (random weights, nothing downloads), a
function that makes the call's ``(args, kwargs)`` from a few named sizes, the
``dynamic=`` profile, the sizes of the example and of the three test points
(the profile's min, its max, and a point that is not the opt), and the
tolerance class. ``tests/zoo/test_zoo.py`` runs them; ``benchmarks/zoo_report.py``
runs them again for the table of docs/supported-models.md.

Inputs are drawn from a generator seeded per point, so a point's inputs do not
depend on which tests ran before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

Call = tuple[tuple[Any, ...], dict[str, Any]]
Dims = dict[str, int]


# --------------------------------------------------------------------------- tolerance classes

@dataclass(frozen=True)
class Tolerance:
    """One tolerance class of cases.md.

    ``rtol``/``atol`` feed ``compare_outputs`` (an element passes when abs <= atol OR
    rel <= rtol). ``cosine`` is a strict lower bound per output. Integer and boolean
    outputs are always compared exactly by ``compare_outputs``, and it fails any
    dtype mismatch, which is what E and H require.
    """

    name: str
    rtol: float
    atol: float
    cosine: float | None


TOLERANCES: dict[str, Tolerance] = {
    "S": Tolerance("S", rtol=1e-3, atol=1e-5, cosine=None),
    "M": Tolerance("M", rtol=1e-2, atol=1e-3, cosine=0.999),
    # E: compare_outputs turns tolerances to zero for non-float outputs; the zeros here
    # also make a float output (which E cases must not have) compare exactly.
    "E": Tolerance("E", rtol=0.0, atol=0.0, cosine=None),
    # H has no elementwise bar, only cosine and dtype; inf tolerances keep NaN failing.
    "H": Tolerance("H", rtol=math.inf, atol=math.inf, cosine=0.99),
}


# --------------------------------------------------------------------------- the case record

@dataclass(frozen=True)
class Case:
    """One row of cases.md."""

    id: int
    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[Dims, torch.Generator], Call]
    dynamic: dict[str, dict[int, tuple[int, int, int]]] | None
    example: Dims
    points: dict[str, Dims]  # "min", "max", "off": sizes of each test point
    tol: str
    input_names: tuple[str, ...]
    slow: bool = False
    precision: str = "fp32"
    #: why the case is expected to fail, with the precise cause (xfail strict)
    xfail: str | None = None

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.tol]

    @property
    def label(self) -> str:
        return f"{self.id:02d}-{self.name}"

    def model(self) -> nn.Module:
        """A fresh model with the seed-0 random weights, in eval mode."""
        torch.manual_seed(0)
        return self.build().eval()

    def inputs(self, point: str) -> Call:
        """The call for ``point`` ("example", "min", "max" or "off")."""
        dims = self.example if point == "example" else self.points[point]
        gen = torch.Generator().manual_seed(1000 + self.id * 10 + ("example", "min", "max", "off").index(point))
        return self.make_inputs(dims, gen)


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _batch(lo: int, opt: int, hi: int, *names: str) -> dict[str, dict[int, tuple[int, int, int]]]:
    return {n: {0: (lo, opt, hi)} for n in names}


# --------------------------------------------------------------------------- architectures (#1-#8)

def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


def _mobilenet_v3_small() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(weights=None)


def _efficientnet_b0() -> nn.Module:
    import torchvision

    return torchvision.models.efficientnet_b0(weights=None)


def _vit_tiny() -> nn.Module:
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128)
    randomize_zero_weights(model)  # torchvision zero-initialises the head: every output would be 0
    return model


def _lraspp() -> nn.Module:
    import torchvision

    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)


def _image(d: Dims, gen: torch.Generator) -> Call:
    return (_randn(d["b"], 3, d.get("h", 224), d.get("w", d.get("h", 224)), gen=gen),), {}


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128))


def _padded_mask(b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    # Tail padding with 0, a different valid length per row (at least 1 token each).
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    lengths[0] = s  # one full row, so the padded positions are not all of one kind
    return (torch.arange(s)[None, :] < lengths[:, None]).to(torch.int64)


def _bert_inputs(d: Dims, gen: torch.Generator) -> Call:
    b, s = d["b"], d["s"]
    ids = torch.randint(0, 1000, (b, s), generator=gen)
    types = torch.randint(0, 2, (b, s), generator=gen)
    return (), {"input_ids": ids, "attention_mask": _padded_mask(b, s, gen), "token_type_ids": types}


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, use_cache=False))


def _gpt2_inputs(d: Dims, gen: torch.Generator) -> Call:
    b, s = d["b"], d["s"]
    ids = torch.randint(0, 1000, (b, s), generator=gen)
    return (), {"input_ids": ids, "attention_mask": _padded_mask(b, s, gen)}


#: torch before 2.15 exports nn.LSTM as a Python loop over its time steps (torch._decomp's lstm_impl
#: unbinds that axis), which fixes the declared-dynamic time dim to the example's: measured with torch
#: 2.14.1 on the CPU. torch 2.15.0 kept it symbolic (benchmarks/zoo_results.json, 2026-11-24).
_LSTM_XFAIL = ("torch < 2.15 exports nn.LSTM as a loop over its time steps, which specialises the dynamic "
               "time dim (ExportError naming the LSTM)"
               if torch.torch_version.TorchVersion(torch.__version__) < (2, 15) else None)


def _lstm() -> nn.Module:
    return nn.LSTM(16, 32, num_layers=2, batch_first=True, bidirectional=True)


def _seq_inputs(d: Dims, gen: torch.Generator) -> Call:
    return (_randn(d["b"], d["t"], 16, gen=gen),), {}


# --------------------------------------------------------------------------- structure (#9-#17)

class ConvTuple(nn.Module):
    """#9: a tuple of two outputs from one convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.conv(x) * 0.5
        return c, torch.relu(c)


class NestedOutput(nn.Module):
    """#10: dict -> tuple -> list nesting that must come back with the same container types."""

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"a": x + 1, "b": (x * 2, [x.sum(-1), x.mean(-1, keepdim=True)])}


class KeywordArgs(nn.Module):
    """#11: keyword arguments, one optional tensor and one Python constant."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        y = self.lin(x) * scale
        return y + bias if bias is not None else y


class IntInputs(nn.Module):
    """#12: integer ids and an integer mask feeding float math."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 32)
        self.proj = nn.Linear(32, 8)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids) * mask.unsqueeze(-1))


def _int_inputs(dtype: torch.dtype) -> Callable[[Dims, torch.Generator], Call]:
    def make(d: Dims, gen: torch.Generator) -> Call:
        ids = torch.randint(0, 1000, (d["b"], 16), generator=gen).to(dtype)
        mask = torch.randint(0, 2, (d["b"], 16), generator=gen).to(dtype)
        return (ids, mask), {}

    return make


class IntBoolOutputs(nn.Module):
    """#13: boolean and integer outputs (compared exactly)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x > 0, x.argmax(-1), x.topk(3).indices


def _no_ties(d: Dims, gen: torch.Generator) -> Call:
    # A permutation has no ties, so argmax/topk have one right answer; centred so x > 0 is mixed.
    n = d["b"] * d["n"] * 16
    x = (torch.randperm(n, generator=gen).to(torch.float32) - n / 2).reshape(d["b"], d["n"], 16)
    return (x,), {}


class Attention(nn.Module):
    """#14: inputs whose dynamic axes differ (q length and kv length are independent)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def _qkv(d: Dims, gen: torch.Generator) -> Call:
    b = d["b"]
    return (_randn(b, 4, d["q"], 32, gen=gen), _randn(b, 4, d["kv"], 32, gen=gen),
            _randn(b, 4, d["kv"], 32, gen=gen)), {}


class Buffers(nn.Module):
    """#15: BatchNorm running statistics and a non-persistent buffer, both baked into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        # Non-default running stats, so a graph that ignored them would give different numbers.
        self.bn.running_mean.copy_(torch.randn(16))
        self.bn.running_var.copy_(torch.rand(16) + 0.5)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.offset


class ShapeArithmetic(nn.Module):
    """#16: sizes computed from the input's shape (must stay symbolic in the graph)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        flat = x.view(b, c, h * w).transpose(1, 2).reshape(b, -1)
        return flat, F.interpolate(x, size=(2 * h, 3 * w))


def _conv_half() -> nn.Module:
    return ConvTuple().half()


def _hw(d: Dims, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Call:
    return (_randn(d["b"], 3, d["h"], d["w"], gen=gen, dtype=dtype),), {}


def _x(*shape_keys: str | int) -> Callable[[Dims, torch.Generator], Call]:
    def make(d: Dims, gen: torch.Generator) -> Call:
        return (_randn(*(d[k] if isinstance(k, str) else k for k in shape_keys), gen=gen),), {}

    return make


def _kwargs_inputs(d: Dims, gen: torch.Generator) -> Call:
    # Called with keywords only; scale is a Python constant baked in at compile time.
    return (), {"x": _randn(d["b"], 32, gen=gen), "bias": _randn(d["b"], 32, gen=gen), "scale": 0.5}


# --------------------------------------------------------------------------- the table

_BERT_DYN = {n: {0: (1, 2, 8), 1: (2, 16, 128)} for n in ("input_ids", "attention_mask", "token_type_ids")}
_GPT2_DYN = {n: {0: (1, 2, 8), 1: (1, 16, 128)} for n in ("input_ids", "attention_mask")}
_HW = {0: (1, 2, 8), 2: (8, 64, 128), 3: (8, 64, 128)}

CASES: list[Case] = [
    Case(1, "resnet18", _resnet18, _image, _batch(1, 4, 8, "x"),
         example={"b": 4}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 6}},
         tol="M", input_names=("x",)),
    Case(2, "mobilenet_v3_small", _mobilenet_v3_small, _image,
         {"x": {0: (1, 2, 8), 2: (128, 224, 320), 3: (128, 224, 320)}},
         example={"b": 2, "h": 224}, points={"min": {"b": 1, "h": 128}, "max": {"b": 8, "h": 320},
                                             "off": {"b": 3, "h": 160, "w": 288}},
         tol="M", input_names=("x",), slow=True),
    Case(3, "efficientnet_b0", _efficientnet_b0, _image, _batch(1, 2, 8, "x"),
         example={"b": 2}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 5}},
         tol="M", input_names=("x",), slow=True),
    Case(4, "vit_tiny", _vit_tiny, _image, _batch(1, 2, 8, "x"),
         example={"b": 2}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 5}},
         tol="M", input_names=("x",), slow=True),
    Case(5, "lraspp_mobilenet_v3_large", _lraspp, _image,
         {"input": {0: (1, 2, 4), 2: (128, 256, 512), 3: (128, 256, 512)}},
         example={"b": 2, "h": 256}, points={"min": {"b": 1, "h": 128}, "max": {"b": 4, "h": 512},
                                             "off": {"b": 3, "h": 192, "w": 320}},
         tol="M", input_names=("input",), slow=True),
    Case(6, "bert", _bert, _bert_inputs, _BERT_DYN,
         example={"b": 2, "s": 16}, points={"min": {"b": 1, "s": 2}, "max": {"b": 8, "s": 128},
                                            "off": {"b": 6, "s": 40}},
         tol="M", input_names=("input_ids", "attention_mask", "token_type_ids")),
    Case(7, "gpt2", _gpt2, _gpt2_inputs, _GPT2_DYN,
         example={"b": 2, "s": 16}, points={"min": {"b": 1, "s": 1}, "max": {"b": 8, "s": 128},
                                            "off": {"b": 6, "s": 40}},
         tol="M", input_names=("input_ids", "attention_mask"), slow=True),
    Case(8, "lstm", _lstm, _seq_inputs, {"input": {0: (1, 2, 8), 1: (1, 10, 64)}},
         example={"b": 2, "t": 10}, points={"min": {"b": 1, "t": 1}, "max": {"b": 8, "t": 64},
                                            "off": {"b": 5, "t": 33}},
         tol="S", input_names=("input",), slow=True, xfail=_LSTM_XFAIL),
    Case(9, "conv_tuple", ConvTuple, _hw, {"x": _HW},
         example={"b": 2, "h": 64, "w": 64}, points={"min": {"b": 1, "h": 8, "w": 8},
                                                     "max": {"b": 8, "h": 128, "w": 128},
                                                     "off": {"b": 3, "h": 40, "w": 100}},
         tol="S", input_names=("x",)),
    Case(10, "nested_output", NestedOutput, _x("b", 8, 16), _batch(1, 2, 8, "x"),
         example={"b": 2}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 5}},
         tol="S", input_names=("x",)),
    Case(11, "keyword_args", KeywordArgs, _kwargs_inputs, _batch(1, 2, 8, "x", "bias"),
         example={"b": 2}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 5}},
         tol="S", input_names=("x", "bias")),
    Case(12, "int_inputs_int64", IntInputs, _int_inputs(torch.int64), _batch(1, 2, 8, "ids", "mask"),
         example={"b": 2}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 5}},
         tol="S", input_names=("ids", "mask")),
    Case(12, "int_inputs_int32", IntInputs, _int_inputs(torch.int32), _batch(1, 2, 8, "ids", "mask"),
         example={"b": 2}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 5}},
         tol="S", input_names=("ids", "mask")),
    Case(13, "int_bool_outputs", IntBoolOutputs, _no_ties, {"x": {0: (1, 2, 8), 1: (1, 8, 32)}},
         example={"b": 2, "n": 8}, points={"min": {"b": 1, "n": 1}, "max": {"b": 8, "n": 32},
                                           "off": {"b": 5, "n": 13}},
         tol="E", input_names=("x",)),
    Case(14, "sdpa_independent_lengths", Attention, _qkv,
         {"q": {0: (1, 2, 8), 2: (1, 16, 64)}, "k": {0: (1, 2, 8), 2: (1, 24, 128)},
          "v": {0: (1, 2, 8), 2: (1, 24, 128)}},
         example={"b": 2, "q": 16, "kv": 24}, points={"min": {"b": 1, "q": 1, "kv": 1},
                                                      "max": {"b": 8, "q": 64, "kv": 128},
                                                      "off": {"b": 3, "q": 50, "kv": 7}},
         tol="S", input_names=("q", "k", "v")),
    Case(15, "buffers", Buffers, _x("b", 16), _batch(1, 2, 8, "x"),
         example={"b": 2}, points={"min": {"b": 1}, "max": {"b": 8}, "off": {"b": 5}},
         tol="S", input_names=("x",)),
    Case(16, "shape_arithmetic", ShapeArithmetic, _hw, {"x": {0: (1, 2, 4), 2: (16, 32, 64), 3: (16, 32, 64)}},
         example={"b": 2, "h": 32, "w": 32}, points={"min": {"b": 1, "h": 16, "w": 16},
                                                     "max": {"b": 4, "h": 64, "w": 64},
                                                     "off": {"b": 3, "h": 24, "w": 40}},
         tol="S", input_names=("x",)),
    Case(17, "conv_tuple_fp16", _conv_half, lambda d, g: _hw(d, g, torch.float16), _batch(1, 2, 8, "x"),
         example={"b": 2, "h": 64, "w": 64}, points={"min": {"b": 1, "h": 64, "w": 64},
                                                     "max": {"b": 8, "h": 64, "w": 64},
                                                     "off": {"b": 5, "h": 64, "w": 64}},
         tol="H", input_names=("x",), slow=True),
]

#: Cases #1, #6 and #9-#16 are the core set the default (CI) run must cover.
CORE_IDS = frozenset({1, 6, 9, 10, 11, 12, 13, 14, 15, 16})


def by_label(label: str) -> Case:
    return next(c for c in CASES if c.label == label)


# --------------------------------------------------------------------------- checking a report

def class_failures(report: Any, tol: Tolerance) -> list[str]:
    """Why ``report`` (a ParityReport made with ``tol``'s rtol/atol) misses tolerance class ``tol``.

    ``compare_outputs`` already applied the elementwise bar, exact comparison of
    integer/boolean outputs, the dtype check and the structure check; this adds the
    class's cosine bound (strictly greater, per output).
    """
    problems = [] if report.passed else [str(report)]
    if tol.cosine is not None:
        for o in report.outputs:
            if not o.cosine > tol.cosine:  # also catches NaN cosine
                problems.append(f"output {o.name}: cosine {o.cosine:.6f} is not > {tol.cosine} (class {tol.name})")
    return problems


def worst(report: Any) -> dict[str, float]:
    """The figures a results table shows: the largest errors and the lowest cosine over outputs."""
    outs = report.outputs
    return {"max_abs": max((o.max_abs for o in outs), default=0.0),
            "max_rel": max((o.max_rel for o in outs), default=0.0),
            "min_cosine": min((o.cosine for o in outs), default=1.0)}


def randomize_zero_weights(model: nn.Module, std: float = 0.02) -> list[str]:
    """Give every all-zero weight matrix random values; returns the names changed.

    torchvision zero-initialises some classifier heads (VisionTransformer's), so with
    random weights the model outputs exactly 0 and any graph that returned zeros would
    "match" it. A parity test must be able to fail, so those weights get random values.
    """
    changed = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                changed.append(name)
    return changed


def input_spread(y: torch.Tensor) -> float:
    """How much a batch's outputs differ from the first row's, relative to the largest output."""
    top = float(y.detach().abs().max())
    return float((y - y[:1]).abs().max()) / top if top > 0 else 0.0


#: Below this relative spread across a batch of different random images, the logits do not
#: depend on the input at float32 resolution and a parity test would compare constants.
MIN_INPUT_SPREAD = 1e-3


def condition_head(model: nn.Module, size: int) -> list[str]:
    """Zero the Linear biases when the random-weight logits do not depend on the input.

    With torchvision's random init some deep nets (googlenet) shrink their features to ~1e-11,
    so the logits are the classifier bias plus nothing float32 can see: a graph that ignored
    its input would "match". Without the bias the logits are the (tiny but input-dependent)
    features times the weights, and the parity check compares something again.
    """
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        y = model(x)
    if not isinstance(y, torch.Tensor) or input_spread(y) >= MIN_INPUT_SPREAD:
        return []
    changed = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.zero_()
                changed.append(f"{name}.bias")
    return changed


# --------------------------------------------------------------------------- the torchvision sweep

#: Classifiers with more parameters than this are skipped: their fp32 ONNX graph and engine are
#: each over 600 MB, and export plus three copies of the weights (model, graph, ORT session) exceed
#: the time and memory a 2-core, 24 GB CI machine can give one model.
SWEEP_MAX_PARAMS = 150_000_000
#: The standard ImageNet crop; an architecture whose documented minimum is larger gets that.
SWEEP_DEFAULT_SIZE = 224
#: Batch profile of the sweep: example 2 (exporters specialise 1), tested at min, max and off-opt.
SWEEP_DYNAMIC = {"x": {0: (1, 2, 4)}}
SWEEP_POINTS = {"min": 1, "off": 3, "max": 4}


def classifier_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def classifier_facts(name: str) -> dict[str, Any]:
    """Parameter count and input size from torchvision's weight metadata (no download, no build)."""
    import torchvision

    meta = list(torchvision.models.get_model_weights(name))[0].meta
    min_h, min_w = meta.get("min_size", (1, 1))
    size = max(SWEEP_DEFAULT_SIZE, min_h, min_w)
    params = int(meta["num_params"])
    skip = None
    if params > SWEEP_MAX_PARAMS:
        skip = (f"{params / 1e6:.0f}M parameters > the sweep's {SWEEP_MAX_PARAMS / 1e6:.0f}M limit "
                "(graph and engine over 600 MB each; too slow and large for the CPU sweep)")
    return {"params": params, "input_size": size, "min_size": [min_h, min_w], "skip": skip}


def sweep_one(name: str) -> dict[str, Any]:
    """Export, ONNX Runtime parity (class M) at batch 1/3/4, and a TensorRT-RTX build of one classifier."""
    import time
    import warnings

    import torchvision

    import torch_trt_module as ttm

    facts = classifier_facts(name)
    rec: dict[str, Any] = {"model": name, **facts, "status": "fail", "exporter": None, "failure": None}
    if facts["skip"]:
        rec["status"] = "skipped"
        return rec
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception warn about their init defaults
        model = torchvision.models.get_model(name, weights=None).eval()
    rec["randomized"] = randomize_zero_weights(model)
    size = facts["input_size"]
    rec["zeroed_bias"] = condition_head(model, size)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    step = "export"
    try:
        t0 = time.perf_counter()
        # The export's own check uses compile()'s fp32 default tolerances; this sweep measures
        # against class M instead, so the figures below are the ones reported.
        exported = ttm.export_onnx(model, example, dynamic=SWEEP_DYNAMIC, verify=False)
        rec["export_s"] = round(time.perf_counter() - t0, 2)
        rec["exporter"] = exported.exporter
        rec["onnx_mb"] = round(len(exported.onnx) / 1e6, 1)
        step = "tensorrt_rtx build"
        try:
            engine = ttm.build_engine(exported, backend="tensorrt_rtx")
            rec["rtx"] = {"ok": True, "engine_mb": round(len(engine.plan or b"") / 1e6, 1),
                          "build_s": engine.meta.get("build_time_s")}
            if not engine.plan:
                rec["rtx"] = {"ok": False, "error": "the build returned an empty engine"}
        except ttm.TorchTRTError as e:
            rec["rtx"] = {"ok": False, "error": _first_line(e)}
            engine = ttm.build_engine(exported, backend="onnxruntime")  # parity is still measured
        step = "onnxruntime parity"
        module = ttm.TRTModule(engine, device="cpu")
        tol = TOLERANCES["M"]
        points: dict[str, Any] = {}
        problems: list[str] = []
        for label, batch in SWEEP_POINTS.items():
            x = torch.randn(batch, 3, size, size, generator=gen)
            report = ttm.verify(model, module, x, rtol=tol.rtol, atol=tol.atol)
            with torch.inference_mode():
                ref = model(x)
            rms = float(ref.float().pow(2).mean().sqrt()) if isinstance(ref, torch.Tensor) else float("nan")
            points[label] = {"batch": batch, **worst(report), "ref_rms": rms, "passed": report.passed}
            if report.structure_error:
                problems.append(f"batch {batch}: {report.structure_error}")
            problems += [f"batch {batch}: {o.reason}; max abs err {o.max_abs:.3g} at output rms {rms:.3g}, "
                         f"cosine 1 - {1.0 - o.cosine:.1e}" for o in report.outputs if not o.passed]
            problems += [f"batch {batch}: {p}" for p in class_failures(report, tol)[0 if report.passed else 1:]]
            spread = input_spread(ref) if isinstance(ref, torch.Tensor) and batch > 1 else None
            points[label]["input_spread"] = spread
            if spread is not None and spread < MIN_INPUT_SPREAD:
                problems.append(f"batch {batch}: eager output does not depend on the input (relative spread "
                                f"{spread:.1e}), so parity cannot be judged")
        rec["parity"] = {
            "class": "M", "points": points, "passed": not problems,
            "max_abs": max(p["max_abs"] for p in points.values()),
            "min_cosine": min(p["min_cosine"] for p in points.values()),
            "ref_rms": min(p["ref_rms"] for p in points.values()),
        }
        failures = list(problems)
        if not rec["rtx"]["ok"]:
            failures.insert(0, f"TensorRT-RTX build: {rec['rtx']['error']}")
        rec["status"] = "pass" if not failures else "fail"
        rec["failure"] = "; ".join(failures) or None
    except Exception as e:  # noqa: BLE001 - a sweep records every failure and goes on
        rec["failure"] = f"{step}: {type(e).__name__}: {_first_line(e)}"
    return rec


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(ln.strip() for ln in str(e).strip().splitlines()[:3] if ln.strip())
    return text[:limit] or type(e).__name__
