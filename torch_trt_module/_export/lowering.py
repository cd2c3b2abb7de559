"""Lowerings applied while torch.export captures a model.

``scaled_dot_product_attention`` is captured as the math it stands for (matmul, scale, masks,
softmax, matmul) instead of the fused op. Why: torch.export records the fused op with the output
strides of the CPU/CUDA fused kernels (laid out as ``(B, L, H, E)``), so a model that follows it with
``transpose(1, 2)`` and a ``view``/``reshape`` (Hugging Face T5, Swin, timm MaxViT) gets a ``view`` in
the program. torch.onnx then decomposes the fused op into its math form, whose output is contiguous
as ``(B, H, L, E)``, and that ``view`` no longer fits: ``ValueError: Cannot view a tensor with shape
... as a tensor with shape ...``. Lowering during the capture makes the program and the ONNX graph
hold the same math, with the strides it really has.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._errors import ExportError

__all__ = ["attention_math", "lowered_attention"]


def attention_math(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` in plain tensor ops, with its signature and semantics.

    - ``attn_mask``: boolean (True takes part in attention) or additive, broadcast to
      ``(..., L, S)``; ``is_causal`` masks with a top-left aligned lower triangle, as torch does.
    - ``enable_gqa``: key and value heads (dim -3) are repeated to the query's head count, each
      ``Hq // Hkv`` times in a row (``repeat_interleave``'s order).
    - A query row that every key is masked from gets zeros, like torch's own kernels (a plain
      softmax would give NaN).
    - ``dropout_p`` must be 0: an engine runs inference, and dropout in the graph would make every
      call random. Raises ExportError otherwise.
    """
    if dropout_p:
        raise ExportError(
            f"scaled_dot_product_attention was called with dropout_p={dropout_p} while exporting; an engine runs "
            "inference, so expected dropout_p=0. Fix: pass dropout_p=0.0 when not self.training (as Hugging Face "
            "models do), or set the model's attention dropout to 0.")
    head_dim = query.size(-1)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if enable_gqa and key.size(-3) != query.size(-3):
        key = _repeat_heads(key, query.size(-3))
        value = _repeat_heads(value, query.size(-3))
    # Scaling the query before the product (not the scores after it) keeps fp16 scores in range.
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    masked = None  # where True, the score is masked out with -inf
    if is_causal:
        length, source = query.size(-2), key.size(-2)
        masked = ~torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            masked = ~attn_mask if masked is None else masked | ~attn_mask
        else:
            scores = scores + attn_mask
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if masked is not None or attn_mask is not None:
        # Rows masked everywhere: softmax of all -inf is NaN; torch's kernels return zeros there.
        empty = (scores == float("-inf")).all(dim=-1, keepdim=True)
        probs = probs.masked_fill(empty, 0.0)
    return torch.matmul(probs, value)


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``t.repeat_interleave(heads // t.size(-3), dim=-3)`` as expand + reshape, which every exporter
    translates (repeat_interleave's ONNX support varies)."""
    groups = heads // t.size(-3)
    expanded = t.unsqueeze(-3).expand(*t.shape[:-2], groups, *t.shape[-2:])
    return expanded.flatten(-4, -3)


class _LowerAttention(TorchFunctionMode):
    """Replaces every ``F.scaled_dot_product_attention`` call with :func:`attention_math`, and
    counts them (:attr:`calls`). Inside ``__torch_function__`` the mode is off, so the math's own
    ops pass through untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs.get("query")
            if isinstance(query, torch.Tensor) and not query.is_nested:
                self.calls += 1
                return attention_math(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def lowered_attention() -> Iterator[_LowerAttention]:
    """While active, ``scaled_dot_product_attention`` runs (and is traced) as its math form; the
    yielded mode's ``calls`` counts the calls it lowered."""
    with _LowerAttention() as mode:
        yield mode
