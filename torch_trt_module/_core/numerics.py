"""Numerics: the TF32 state of PyTorch, strict-fp32 reference calls, and the tolerance policy.

On a CUDA GPU PyTorch runs cuDNN convolutions in TF32 by default
(``torch.backends.cudnn.conv.fp32_precision == "tf32"``), so an fp32 model's eager
outputs differ from strict fp32 by about 1e-3 relative. The export check compares the
ONNX graph (run in strict fp32 by ONNX Runtime) with eager, so it runs the eager
reference under :func:`strict_fp32`: TF32 off for that one call, every flag restored
afterwards to exactly what it was. A user's settings are never changed otherwise.

The tolerance policy (:data:`POLICY`) is per numerics: ``fp32`` (strict), ``tf32`` (either
side computed fp32 math in TF32), ``fp16`` and ``bf16``. An element passes when
``abs_err <= atol_eff`` OR ``rel_err <= rtol`` (Polygraphy's rule), with
``atol_eff = max(atol, atol_rms * rms(reference))`` per output, and an output passes only
when its cosine similarity is at least ``min_cosine`` too. The absolute bar follows the
output's scale, so a model with large activations (logits of rms 1e4) is judged by its
relative accuracy, while a graph that is wrong anywhere (an error of the order of the
output's rms) or everywhere a little (the cosine) is still refused.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["POLICY", "Tolerance", "eager_uses_tf32", "numerics_of", "policy_for", "strict_fp32", "tf32_state"]


@dataclass(frozen=True)
class Tolerance:
    """How close an output must be to its reference (see the module docstring).

    Example:
        >>> t = POLICY["fp32"]
        >>> t.atol_for(rms=1000.0) == max(t.atol, t.atol_rms * 1000.0)
        True
    """

    rtol: float
    atol: float
    atol_rms: float = 0.0
    min_cosine: float = 0.0

    def atol_for(self, rms: float) -> float:
        """The absolute bar for an output whose reference has this root-mean-square."""
        return max(self.atol, self.atol_rms * rms)


#: Default tolerances per numerics. fp32: strict IEEE fp32 on both sides (ONNX Runtime, and eager
#: under strict_fp32()); tf32: one side ran fp32 math in TF32 (10-bit mantissa, ~1e-3 relative
#: per product); fp16/bf16: the graph itself is in that precision (autocast-style islands in fp32).
POLICY: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-3, atol=1e-5, atol_rms=1e-3, min_cosine=0.99999),
    "tf32": Tolerance(rtol=1e-2, atol=1e-4, atol_rms=1e-2, min_cosine=0.9999),
    "fp16": Tolerance(rtol=1e-2, atol=1e-3, atol_rms=2e-2, min_cosine=0.999),
    "bf16": Tolerance(rtol=5e-2, atol=1e-2, atol_rms=5e-2, min_cosine=0.99),
}


def policy_for(numerics: str, *, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The policy for ``numerics``; an explicit ``rtol``/``atol`` turns it into the plain
    elementwise check with those values (no scale term, no cosine bound), as Polygraphy does."""
    base = POLICY[numerics]
    if rtol is None and atol is None:
        return base
    return Tolerance(rtol=base.rtol if rtol is None else float(rtol), atol=base.atol if atol is None else float(atol))


# --------------------------------------------------------------------------- TF32 flags

# The precision API of torch >= 2.9: each is "ieee", "tf32" or "none" (inherit from the parent).
_PRECISION_FLAGS = ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.fp32_precision",
                    "cudnn.conv.fp32_precision", "cudnn.rnn.fp32_precision")
_STRICT = ("cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision", "cudnn.rnn.fp32_precision")
_LEGACY_FLAGS = ("cudnn.allow_tf32", "cuda.matmul.allow_tf32")
# One strict call at a time: two overlapping ones would each restore what the other set.
_lock = threading.RLock()


def _owner(path: str) -> tuple[Any, str] | None:
    *parents, last = path.split(".")
    obj: Any = torch.backends
    for part in parents:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return (obj, last) if hasattr(obj, last) else None


def _get(path: str) -> Any:
    found = _owner(path)
    return None if found is None else getattr(*found)


def _set(path: str, value: Any) -> None:
    found = _owner(path)
    if found is not None:
        setattr(found[0], found[1], value)


def _new_api() -> bool:
    return isinstance(_get("cudnn.conv.fp32_precision"), str)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Run the block with TF32 off for cuDNN and cuBLAS fp32 math; restore every flag after.

    Only the flags are touched, and each is put back to exactly the value it had (so a user's
    legacy ``allow_tf32`` settings and the newer ``fp32_precision`` ones both survive).

    Example:
        >>> before = tf32_state()
        >>> with strict_fp32():
        ...     tf32_state()["cudnn_conv"]
        False
        >>> tf32_state() == before
        True
    """
    with _lock:
        if _new_api():
            saved = {p: _get(p) for p in _PRECISION_FLAGS if isinstance(_get(p), str)}
            try:
                for p in _STRICT:
                    _set(p, "ieee")
                yield
            finally:
                for p, v in saved.items():
                    _set(p, v)
        else:  # torch < 2.9: only the legacy booleans exist
            saved = {p: _get(p) for p in _LEGACY_FLAGS}
            try:
                for p in _LEGACY_FLAGS:
                    _set(p, False)
                yield
            finally:
                for p, v in saved.items():
                    _set(p, v)


def _decided(chain: tuple[str, ...]) -> bool | None:
    """The first flag of ``chain`` that is set ("ieee"/"tf32") decides; None when all say "none"."""
    for p in chain:
        v = _get(p)
        if isinstance(v, str) and v != "none":
            return v == "tf32"
    return None


def _effective(chain: tuple[str, ...], default: bool) -> bool:
    decided = _decided(chain)
    return default if decided is None else decided


def _legacy_matmul_tf32() -> bool:
    """Whether ``torch.get_float32_matmul_precision()`` allows TF32; asked only when no precision
    flag of the matmul chain decides.

    torch raises RuntimeError from that getter once it considers the legacy and the new API mixed,
    which happens as soon as any new ``fp32_precision`` flag was set (even one of cuDNN's). Every
    legacy setter writes through to ``cuda.matmul.fp32_precision``, so with the whole matmul chain
    at "none" nothing has asked for TF32 on matmuls and torch runs them in IEEE fp32: answer False.
    Only read here; the user's flags are never changed to make the getter answer.
    """
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return False


def tf32_state() -> dict[str, bool]:
    """Whether fp32 convolutions (cuDNN) and matmuls (cuBLAS) may use TF32, as configured now.

    Read without the legacy ``allow_tf32`` getters, which raise once the legacy and the newer
    API have both been used; ``torch.get_float32_matmul_precision()`` (which raises then too) is
    consulted only when no ``fp32_precision`` flag decides for matmuls.
    """
    if _new_api():
        matmul = _decided(("cuda.matmul.fp32_precision", "fp32_precision"))
        return {"cudnn_conv": _effective(("cudnn.conv.fp32_precision", "cudnn.fp32_precision", "fp32_precision"),
                                         False),
                "cuda_matmul": _legacy_matmul_tf32() if matmul is None else matmul}
    return {"cudnn_conv": bool(_get("cudnn.allow_tf32")), "cuda_matmul": bool(_get("cuda.matmul.allow_tf32"))}


def numerics_of(precision: str, *, tf32: bool) -> str:
    """The policy name for a computation in ``precision`` where fp32 math may use TF32 (``tf32``)."""
    if precision != "fp32":
        return precision
    return "tf32" if tf32 else "fp32"


def eager_uses_tf32(device: torch.device | str | None) -> bool:
    """Whether an fp32 eager call on ``device`` may run in TF32 under the current flags."""
    if device is None or torch.device(device).type != "cuda":
        return False
    state = tf32_state()
    return state["cudnn_conv"] or state["cuda_matmul"]
