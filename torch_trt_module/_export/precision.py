"""Mixed precision in the style of autocast, written into the exported graph.

TensorRT-RTX and TensorRT 11 build strongly typed networks: precision comes from
the ONNX dtypes, so "fp16, with sensitive ops in fp32" has to be in the graph
itself. :func:`convert_model` returns a copy of the model that computes that way
whenever it runs, eagerly or under an exporter (torch.export and the TorchScript
tracer run its Python, so the casts become ``Cast`` nodes in the ONNX graph):

1. **Parameters.** Normalisation and softmax modules (``nn.LayerNorm``,
   ``nn.GroupNorm``, ``nn.BatchNorm*``, ``nn.SyncBatchNorm``, ``nn.InstanceNorm*``,
   ``nn.RMSNorm``, ``nn.LocalResponseNorm``, ``nn.Softmax``, ``nn.LogSoftmax``,
   ``nn.Softmin``) keep fp32 parameters and buffers; everything else is cast to
   the target dtype.
2. **Functions.** A :class:`~torch.overrides.TorchFunctionMode`
   (:class:`fp32_islands`), entered by the returned model's ``forward``, applies
   autocast's two rules to calls made from Python (module code, ``F.*``, tensor
   methods and operators):

   - *fp32 ops* take fp16/bf16 inputs upcast to fp32 and return fp32, which then
     flows on through elementwise ops by type promotion: softmax, log_softmax,
     softmin; layer, group, batch, instance, RMS and local-response norms,
     ``F.normalize``; the reductions sum, mean, var, std, var_mean, std_mean,
     norm, vector_norm, logsumexp, cumsum, prod, nansum, nanmean (when called
     without an explicit ``dtype=``); adaptive average pooling (a mean over every
     pixel).
   - *low-precision ops* (linear, bilinear, conv*, conv_transpose*, prelu,
     matmul / ``@``, mm, bmm, addmm, addbmm, baddbmm, mv, addmv, addr, einsum,
     the RNN kernels) cast fp32 inputs to the low dtype when they meet a
     low-precision input, i.e. where fp32 activations reach fp16 weights. Inputs
     that are all fp32 (a model that upcasts on purpose) are left alone.

   ``F.scaled_dot_product_attention`` is decomposed into low-precision matmuls
   around an fp32 softmax (the numerics of flash attention), and
   ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) runs with that
   attention inside it. Under :func:`low_precision_attention` with ``fused=True``
   (the capture of the program the PyTorch runtime runs) it stays one fused call
   in the low dtype instead: flash and memory-efficient attention keep their
   softmax in fp32 themselves, and never write the fp32 scores to memory (vit_b_16
   fp16 at batch 32 on an H100: 6.61 ms decomposed, against 6.01 ms for
   ``torch.compile`` under autocast, which runs the fused kernel).

Not covered: ops reached only from C++ (custom ops), and torch functions called
inside another Python-level torch function, which the mode sees as one call;
multi-head attention, the one such composite that matters, is handled as above.
The model's outputs can be fp32 where the last op is an fp32 op (a final
LayerNorm); compiled modules cast outputs back to the dtype eager returns.
Training-mode batch norm would not update its running statistics through the
fp32 copies (compile() exports eval-mode models only).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import math
import types
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._errors import PrecisionError

__all__ = ["FP32_MODULES", "MixedPrecisionModel", "PrecisionError", "convert_model", "fp32_islands"]

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_LOW = (torch.float16, torch.bfloat16)


def _classes(*names: str) -> tuple[type[nn.Module], ...]:
    # Some classes are newer than the oldest torch we support (nn.RMSNorm is 2.4+).
    return tuple(getattr(nn, n) for n in names if hasattr(nn, n))


#: Module classes whose parameters and buffers stay fp32.
FP32_MODULES: tuple[type[nn.Module], ...] = _classes(
    "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "Softmax", "LogSoftmax", "Softmin",
)


# --------------------------------------------------------------------------- casts

def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the tensors of a nest of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuples (torch.return_types, ...)
        return type(obj)(*(_map(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _dtypes(objs: Iterable[Any]) -> list[torch.dtype]:
    """Floating dtypes of the tensors in ``objs`` (and in lists/tuples one level down)."""
    out = []
    for o in objs:
        for t in (o if isinstance(o, (tuple, list)) else (o,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out.append(t.dtype)
    return out


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _LOW else t


def _to(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.to(dtype) if t.dtype == torch.float32 else t


def _in_fp32(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An fp32 op: fp16/bf16 inputs upcast, the fp32 result returned as it is (autocast's rule)."""
    if not any(d in _LOW for d in _dtypes(list(args) + list(kwargs.values()))):
        return func(*args, **kwargs)
    return func(*_map(args, _up), **_map(kwargs, _up))


def _in_low(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A low-precision op: where fp32 inputs meet fp16/bf16 ones (fp32 activations reaching
    fp16 weights), the fp32 ones are cast down. All-fp32 calls are the model's own choice."""
    found = _dtypes(list(args) + list(kwargs.values()))
    low = next((d for d in found if d in _LOW), None)
    if low is None or torch.float32 not in found:
        return func(*args, **kwargs)
    return func(*_map(args, _to(low)), **_map(kwargs, _to(low)))


# --------------------------------------------------------------------------- attention

# Set by low_precision_attention (below) for the calls of one capture, in its thread.
_FUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("ttm_fused_attention", default=False)
_CALLS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("ttm_attention_calls", default=None)


@contextlib.contextmanager
def low_precision_attention(*, fused: bool) -> Iterator[list[int]]:
    """While active, low-precision calls of ``scaled_dot_product_attention`` are counted in the
    list this yields (``[n]``); with ``fused=True`` each stays one fused call in the low dtype, for
    the PyTorch runtime's program; with ``fused=False`` it is decomposed (as without this), for ONNX.

    Example:
        >>> with low_precision_attention(fused=True) as calls:   # doctest: +SKIP
        ...     program = torch.export.export(mixed_precision_model, args)
    """
    calls = [0]
    fused_token, calls_token = _FUSED.set(fused), _CALLS.set(calls)
    try:
        yield calls
    finally:
        _FUSED.reset(fused_token)
        _CALLS.reset(calls_token)


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with its matmuls in fp16/bf16 and its softmax in
    fp32 (what flash attention does numerically), written as plain ops."""
    low = next((d for d in _dtypes((query, key, value)) if d in _LOW), None)
    if low is None:  # all fp32: the model's own choice
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    query, key, value = (t.to(low) for t in (query, key, value))
    if (calls := _CALLS.get()) is not None:
        calls[0] += 1
    if _FUSED.get():
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            # An additive mask in the low dtype: fp32's most negative value would become -inf.
            attn_mask = attn_mask.float().clamp(min=torch.finfo(low).min).to(low)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.size(-3) != query.size(-3):
        reps = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(reps, dim=-3)
        value = value.repeat_interleave(reps, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    # Scaling q before the matmul (not the scores after) keeps the fp16 product in range.
    scores = torch.matmul(query * scale, key.transpose(-2, -1)).float()
    keep: torch.Tensor | None = None
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            scores = scores + attn_mask.float()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if keep is not None:
        # A row with nothing to attend to gives 0, as torch's own SDPA does, not NaN.
        weights = weights.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        weights = torch.dropout(weights, dropout_p, train=True)
    return torch.matmul(weights.to(low), value)


def _softmax_island(*args: Any, **kwargs: Any) -> Any:
    """Softmax in fp32, cast back to the input's dtype: inside multi-head attention the next
    op is a bmm with fp16 values, and nothing there would cast it down again."""
    low = next((d for d in _dtypes(list(args) + list(kwargs.values())) if d in _LOW), None)
    out = _in_fp32(F.softmax, args, kwargs)
    return out if low is None else out.to(low)


def _patched(fn: Callable[..., Any], **replacements: Any) -> Callable[..., Any] | None:
    """A copy of the Python function ``fn`` in which the global names in ``replacements``
    mean something else; ``fn``'s module is left untouched, so this is thread-safe. None
    when ``fn`` no longer uses those names (a torch version that changed it)."""
    code = getattr(fn, "__code__", None)
    if code is None or not set(replacements) <= set(code.co_names):
        return None
    scope = {**fn.__globals__, **replacements}
    new = types.FunctionType(code, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    # A torch function re-dispatches to itself by name while another torch-function mode is
    # active (torch.export's own, while tracing): that call must reach this copy.
    scope[fn.__name__] = new
    return new


# F.multi_head_attention_forward calls softmax and scaled_dot_product_attention from its
# module's globals, inside its body, where the mode cannot see them (see the docstring).
_MHA = _patched(F.multi_head_attention_forward, softmax=_softmax_island,
                scaled_dot_product_attention=_attention)


# --------------------------------------------------------------------------- the mode

def _functions(names: dict[Any, list[str]]) -> frozenset[Any]:
    return frozenset(getattr(owner, n) for owner, ns in names.items() for n in ns if hasattr(owner, n))


_FP32_FUNCTIONS = _functions({
    F: ["softmax", "log_softmax", "softmin", "layer_norm", "group_norm", "batch_norm", "instance_norm",
        "rms_norm", "local_response_norm", "normalize",
        # global average pooling is a mean over every pixel (ReduceMean in the graph)
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"],
    torch: ["softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm",
            "sum", "mean", "var", "std", "var_mean", "std_mean", "norm", "logsumexp", "cumsum", "prod",
            "nansum", "nanmean", "adaptive_avg_pool1d"],
    torch.Tensor: ["softmax", "log_softmax", "sum", "mean", "var", "std", "norm", "logsumexp", "cumsum",
                   "prod", "nansum", "nanmean"],
    torch.linalg: ["vector_norm", "norm"],
})
# Calls that pass dtype= chose their precision themselves; they are left alone.
_TAKES_DTYPE = frozenset(f for f in _FP32_FUNCTIONS if getattr(f, "__name__", "") in
                         {"sum", "mean", "cumsum", "prod", "nansum", "nanmean", "softmax", "log_softmax",
                          "softmin", "vector_norm", "norm"})
_LOW_FUNCTIONS = _functions({
    F: ["linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "prelu"],
    torch: ["matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "mv", "addmv", "addr", "einsum",
            "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
            "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"],
    torch.Tensor: ["matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv"],
})


class fp32_islands(TorchFunctionMode):  # noqa: N801 - used like a function: `with fp32_islands():`
    """While active, numerically sensitive torch functions run in fp32 and low-precision
    ops cast fp32 inputs down where they meet fp16/bf16 weights (see the module docstring).

    Example:
        >>> x = torch.randn(4, 8).half()
        >>> with fp32_islands():
        ...     y = torch.softmax(x, dim=-1)      # computed in fp32 and returned in fp32
        >>> y.dtype
        torch.float32
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FP32_FUNCTIONS:
            if func in _TAKES_DTYPE and kwargs.get("dtype") is not None:
                return func(*args, **kwargs)
            return _in_fp32(func, args, kwargs)
        if func in _LOW_FUNCTIONS:
            return _in_low(func, args, kwargs)
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            if _MHA is not None:
                return _in_low(_MHA, args, kwargs)
            return _in_fp32(func, args, kwargs)  # correct, only slower: all of attention in fp32
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- modules

class MixedPrecisionModel(nn.Module):
    """What :func:`convert_model` returns: the converted model, run under :class:`fp32_islands`.

    Call it as the original, with floating inputs in the target dtype (as for ``model.half()``).
    Call this wrapper, not ``.model``: the kept fp32 modules rely on the mode's casts.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, kept: list[str]) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.kept = kept  # qualified names of the modules kept in fp32 (for logs and tests)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with fp32_islands():
            return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, modules kept in fp32: {len(self.kept)}"


def convert_model(model: nn.Module, precision: str, *, keep_fp32: bool = True) -> nn.Module:
    """A converted deep copy of ``model`` for ``precision`` ("fp16", "bf16" or "fp32").

    ``keep_fp32=True`` (the default): numerically sensitive modules and functions stay
    in fp32 with casts at their boundaries, in the style of autocast (this module's
    docstring says exactly which), and a :class:`MixedPrecisionModel` is returned.
    ``keep_fp32=False``: the whole model is cast, as ``copy.deepcopy(model).to(dtype)``.
    ``"fp32"`` returns an unchanged copy. ``model`` itself is never modified.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18().eval()
        >>> half = convert_model(net, "fp16")
        >>> half.model.bn1.weight.dtype, half.model.conv1.weight.dtype
        (torch.float32, torch.float16)
        >>> half(torch.randn(1, 3, 64, 64).half()).dtype
        torch.float16
    """
    if precision not in _DTYPES:
        raise PrecisionError(
            f"precision got {precision!r}; expected one of {', '.join(map(repr, _DTYPES))}. "
            "Fix: pass 'fp16' or 'bf16' for reduced precision, 'fp32' for none.")
    if not isinstance(model, nn.Module):
        raise PrecisionError(f"model must be a torch.nn.Module; got {type(model).__name__}. "
                             "Fix: pass the nn.Module itself (not its state_dict or forward).")
    dtype = _DTYPES[precision]
    work = copy.deepcopy(model)
    if dtype == torch.float32:
        return work
    if not keep_fp32:
        return work.to(dtype)
    kept_ids: set[int] = set()
    kept: list[str] = []
    for name, mod in work.named_modules():
        if id(mod) not in kept_ids and isinstance(mod, FP32_MODULES):
            kept.append(name)
            kept_ids.update(id(m) for m in mod.modules())  # its whole subtree stays fp32
    for mod in work.modules():
        if id(mod) not in kept_ids:
            # Not recursive: a parent's cast must not reach into a kept child.
            mod._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    kinds = sorted({type(m).__name__ for m in work.modules() if id(m) in kept_ids and isinstance(m, FP32_MODULES)})
    log.info("mixed precision %s: %d module(s) kept in fp32 (%s)", precision, len(kept), ", ".join(kinds) or "none")
    return MixedPrecisionModel(work, dtype, kept)
