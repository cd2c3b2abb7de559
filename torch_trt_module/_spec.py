"""Tensor specs, dtype tables and pytree structure, shared by export, cache and runtime.

Everything here is JSON-able so that engine metadata, cache entries and saved
modules carry it without pickle.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ._dtypes import dtype_from_name, dtype_name

__all__ = ["TensorSpec", "TreeSpec", "dtype_from_name", "dtype_name", "flatten", "unflatten"]

@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output.

    ``min``/``opt``/``max`` are the optimization profile of an input; for an
    output they are ``None`` and ``dims`` holds the (possibly symbolic) shape.

    Example:
        >>> s = TensorSpec("x", "float32", dims=("batch", 3), min=(1, 3), opt=(4, 3), max=(8, 3))
        >>> s.check_shape((9, 3)) is not None
        True
    """

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    min: tuple[int, ...] | None = None
    opt: tuple[int, ...] | None = None
    max: tuple[int, ...] | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)

    def profile_str(self) -> str:
        """``1..8 x 3 x 224 x 224`` style description of the allowed shapes."""
        if self.min is None or self.max is None:
            return " x ".join(str(d) for d in self.dims)
        parts = [str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in zip(self.min, self.max)]
        return "(" + ", ".join(parts) + ")"

    def check_shape(self, shape: Sequence[int]) -> str | None:
        """Return why ``shape`` is outside this input's profile, or None if it fits."""
        if len(shape) != self.rank:
            return f"has rank {len(shape)} (shape {tuple(shape)}) but the engine expects rank {self.rank}"
        if self.min is None or self.max is None:
            return None
        bad = [i for i, (s, lo, hi) in enumerate(zip(shape, self.min, self.max)) if not lo <= s <= hi]
        if not bad:
            return None
        dims = ", ".join(f"dim {i} = {shape[i]} not in {self.min[i]}..{self.max[i]}" for i in bad)
        return f"has shape {tuple(shape)} outside the engine's profile {self.profile_str()} ({dims})"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims),
                "min": _opt_list(self.min), "opt": _opt_list(self.opt), "max": _opt_list(self.max)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], dims=tuple(d["dims"]),
                   min=_opt_tuple(d.get("min")), opt=_opt_tuple(d.get("opt")), max=_opt_tuple(d.get("max")))


def _opt_list(t: tuple[int, ...] | None) -> list[int] | None:
    return None if t is None else list(t)


def _opt_tuple(t: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(int(v) for v in t)


# ---------------------------------------------------------------- pytrees

_CONST_TYPES = (bool, int, float, str)


class TreeSpec:
    """The structure of a nest of tuples, lists and dicts with tensor leaves.

    ``kind`` is one of ``tensor``, ``none``, ``const``, ``tuple``, ``list``, ``dict``.
    ``cls`` keeps the exact container class (a namedtuple, an ``OrderedDict``, a
    ``transformers`` ``ModelOutput``) so that outputs come back as eager returns
    them. In JSON only the class's name is kept; loading resolves it from
    modules that are already imported and never imports anything, so a saved
    module cannot make us run code. Unresolved classes fall back to the builtin.
    """

    __slots__ = ("kind", "children", "keys", "cls", "cls_name", "value")

    def __init__(self, kind: str, children: Sequence["TreeSpec"] = (), keys: Sequence[Any] = (),
                 cls: type | None = None, cls_name: str | None = None, value: Any = None) -> None:
        self.kind = kind
        self.children = list(children)
        self.keys = list(keys)
        self.cls = cls
        self.cls_name = cls_name if cls_name is not None else (_qualname(cls) if cls is not None else None)
        self.value = value

    @property
    def num_leaves(self) -> int:
        if self.kind == "tensor":
            return 1
        return sum(c.num_leaves for c in self.children)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.children:
            d["children"] = [c.to_json() for c in self.children]
        if self.kind == "dict":
            d["keys"] = self.keys
        if self.cls_name:
            d["cls"] = self.cls_name
        if self.kind == "const":
            d["value"] = self.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TreeSpec":
        name = d.get("cls")
        return cls(d["kind"], [cls.from_json(c) for c in d.get("children", [])], d.get("keys", []),
                   cls=_resolve_loaded_class(name, d["kind"]), cls_name=name, value=d.get("value"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeSpec) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"TreeSpec({self.to_json()})"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


_CONTAINER_BASES: dict[str, type] = {"dict": dict, "tuple": tuple, "list": list}


def _resolve_loaded_class(name: str | None, kind: str) -> type | None:
    # Only a container class of the recorded kind (a namedtuple, an OrderedDict or ModelOutput
    # subclass, ...): unflatten calls it with values from metadata, which may come from disk, so an
    # arbitrary class (subprocess.Popen with args= and shell= keys) would run code.
    base = _CONTAINER_BASES.get(kind)
    if not name or base is None:
        return None
    mod_name, _, qual = name.partition(":")
    obj: Any = sys.modules.get(mod_name)  # never import: see TreeSpec's docstring
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, base) else None


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def flatten(obj: Any, *, what: str = "value", allow_const: bool = True) -> tuple[list[torch.Tensor], TreeSpec]:
    """Split a nest into its tensor leaves (depth-first) and its structure."""
    leaves: list[torch.Tensor] = []

    def rec(o: Any, path: str) -> TreeSpec:
        if isinstance(o, torch.Tensor):
            leaves.append(o)
            return TreeSpec("tensor")
        if o is None:
            return TreeSpec("none")
        if isinstance(o, dict):
            keys = list(o.keys())
            for k in keys:
                if not isinstance(k, (str, int)):
                    raise TypeError(f"{what} {path}: dict key {k!r} is not a str or int")
            cls = None if type(o) is dict else type(o)
            return TreeSpec("dict", [rec(o[k], f"{path}[{k!r}]") for k in keys], keys, cls=cls)
        if isinstance(o, (tuple, list)):
            kind = "tuple" if isinstance(o, tuple) else "list"
            cls = None if type(o) in (tuple, list) else type(o)
            return TreeSpec(kind, [rec(v, f"{path}[{i}]") for i, v in enumerate(o)], cls=cls)
        if allow_const and isinstance(o, _CONST_TYPES):
            return TreeSpec("const", value=o)
        raise TypeError(
            f"{what} {path} is a {type(o).__name__}; expected tensors nested in tuples, lists and dicts"
            + (" (or None, bool, int, float, str constants)" if allow_const else " (or None)")
        )

    spec = rec(obj, "")
    return leaves, spec


def unflatten(spec: TreeSpec, leaves: Sequence[Any]) -> Any:
    """Rebuild the nest that :func:`flatten` split, with new leaves."""
    it: Iterator[Any] = iter(leaves)

    def rec(s: TreeSpec) -> Any:
        k = s.kind
        if k == "tensor":
            return next(it)
        if k == "none":
            return None
        if k == "const":
            return s.value
        children = [rec(c) for c in s.children]
        if k == "dict":
            items = list(zip(s.keys, children))
            if s.cls is None:
                return dict(items)
            try:
                return s.cls(items)
            except Exception:
                # Some dict subclasses (dataclass-like ModelOutput) only take keywords.
                return s.cls(**{str(key): v for key, v in items})
        if s.cls is not None and issubclass(s.cls, tuple) and hasattr(s.cls, "_fields"):
            return s.cls(*children)
        if s.cls is not None:
            return s.cls(children)
        return tuple(children) if k == "tuple" else children

    return rec(spec)
