"""Pytrees: the structure of a call's arguments and of a model's outputs, with tensor leaves.

Everything here is JSON-able (:meth:`TreeSpec.to_json`) so that engine metadata, cache
entries and saved modules carry it without pickle.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Sequence

import torch

__all__ = ["PathStep", "TreeSpec", "flatten", "leaf_paths", "unflatten"]

#: One step from a container to a child: ("key", dict key), ("index", i) or ("field", (i, name)).
PathStep = tuple[str, Any]

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


def leaf_paths(spec: TreeSpec) -> list[tuple[PathStep, ...]]:
    """The path to each tensor leaf, depth-first (the order of :func:`flatten`).

    Callers render paths their own way: input and output names join the labels with ``_``
    (``x_0``), parity reports write ``['a'][0]`` or a namedtuple's ``.field``.

    Example:
        >>> _, spec = flatten({"a": torch.ones(1), "b": (torch.ones(1),)})
        >>> leaf_paths(spec)
        [(('key', 'a'),), (('key', 'b'), ('index', 0))]
    """
    out: list[tuple[PathStep, ...]] = []

    def rec(s: TreeSpec, path: tuple[PathStep, ...]) -> None:
        if s.kind == "tensor":
            out.append(path)
            return
        fields = getattr(s.cls, "_fields", None) if s.kind == "tuple" else None
        for i, child in enumerate(s.children):
            if s.kind == "dict":
                step: PathStep = ("key", s.keys[i])
            elif fields is not None:
                step = ("field", (i, fields[i]))
            else:
                step = ("index", i)
            rec(child, path + (step,))

    rec(spec, ())
    return out
