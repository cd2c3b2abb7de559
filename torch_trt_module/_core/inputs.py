"""Checking a call against what a module was compiled for: its structure (``match_inputs``),
dtype casts that lose nothing (``safe_cast``) and the advice for an out-of-profile shape."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .._errors import InputError
from .spec import TensorSpec
from .tree import TreeSpec

__all__ = ["match_inputs", "safe_cast", "widen_hint"]


def widen_hint(spec: TensorSpec, shape: Sequence[int], *, lazy: bool = False) -> str:
    """The advice after ``shape`` fell outside ``spec``'s profile. A dynamic dim can be widened;
    a static dim is the example's size, and the advice never makes one dynamic: most static dims
    are sizes the weights fix (a Conv's channels, a Linear's features), which no profile can vary.
    ``lazy``: the module is already lazy, so lazy mode is not suggested."""
    if spec.min is None or spec.max is None or len(shape) != spec.rank:
        return "Pass a tensor of the compiled rank."
    lo, hi = spec.min, spec.max
    static = [d for d, s in enumerate(shape) if lo[d] == hi[d] != s]
    wide = [d for d, s in enumerate(shape) if lo[d] != hi[d] and not lo[d] <= s <= hi[d]]
    parts = []
    if static:
        one = len(static) == 1
        dims = ", ".join(str(d) for d in static)
        sizes = ", ".join(str(lo[d]) for d in static)
        parts.append(f"{'Dim' if one else 'Dims'} {dims} {'is' if one else 'are'} static: the module was compiled for "
                     f"{'size' if one else 'sizes'} {sizes} there, the example's (not a dynamic dim; a size the "
                     f"weights fix, such as a Conv's channels, cannot be one). Pass a tensor of "
                     f"{'size' if one else 'sizes'} {sizes} in {'dim' if one else 'dims'} {dims}.")
    if wide:
        ranges = {d: (min(lo[d], s), spec.opt[d] if spec.opt else s, max(hi[d], s))
                  for d, s in enumerate(shape) if lo[d] != hi[d]}
        parts.append(f"Recompile with dynamic={{{spec.name!r}: {ranges}}}"
                     + ("." if lazy else " (or without example_inputs for lazy mode)."))
    return " ".join(parts)


def match_inputs(tree: TreeSpec, obj: Any, path: str) -> list[torch.Tensor]:
    """Collect the tensor leaves of ``obj`` checking it has the compiled structure."""
    leaves: list[torch.Tensor] = []

    def rec(s: TreeSpec, o: Any, p: str) -> None:
        where = p or "the call"
        if s.kind == "tensor":
            if not isinstance(o, torch.Tensor):
                got = "None" if o is None else type(o).__name__
                raise InputError(f"input {where} is {got} but the module was compiled with a tensor there; "
                                 "pass a tensor")
            leaves.append(o)
        elif s.kind == "none":
            if o is not None:
                raise InputError(f"input {where} was None when the module was compiled, so it is not an "
                                 f"engine input; got {type(o).__name__}. Recompile with it in example_inputs.")
        elif s.kind == "const":
            if o != s.value or type(o) is not type(s.value):
                raise InputError(f"input {where} was the constant {s.value!r} at compile time (it is baked into "
                                 f"the engine); got {o!r}. Recompile with that value.")
        elif s.kind == "dict":
            if not isinstance(o, dict):
                raise InputError(f"input {where} should be a dict with keys {s.keys}; got {type(o).__name__}")
            missing = [k for k in s.keys if k not in o]
            extra = [k for k in o if k not in s.keys]
            if missing or extra:
                what = "argument" if not p else "key"
                parts = []
                if missing:
                    parts.append(f"missing {what}(s) {missing}")
                if extra:
                    parts.append(f"unexpected {what}(s) {extra} (not given at compile time, so not engine inputs)")
                raise InputError(f"{where}: " + "; ".join(parts) + f"; the module was compiled with {s.keys}: "
                                 f"pass exactly those {what}s")
            for k, c in zip(s.keys, s.children):
                rec(c, o[k], f"{p}[{k!r}]" if p else repr(k))
        else:
            if not isinstance(o, (tuple, list)) or len(o) != len(s.children):
                n = len(o) if isinstance(o, (tuple, list)) else type(o).__name__
                raise InputError(f"input {where} should be a {s.kind} of {len(s.children)} items; got {n}")
            for i, (c, v) in enumerate(zip(s.children, o)):
                rec(c, v, f"{p}[{i}]")

    rec(tree, obj, path)
    return leaves


def safe_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether ``cast_inputs`` may convert a ``src`` tensor to the engine's ``dst`` dtype.

    Floats may change width (a float engine input is meant to take any float). An integer (or bool)
    destination must hold every ``src`` value: ``torch.can_cast`` only checks the kind and allows
    int64 -> int32, which would wrap values >= 2**31 silently, so the destination must be what the
    two promote to.
    """
    if not torch.can_cast(src, dst):
        return src.is_floating_point and dst.is_floating_point
    if not dst.is_floating_point and not dst.is_complex:
        return torch.promote_types(src, dst) == dst
    return True
