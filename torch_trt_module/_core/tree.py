"""Pytrees: the structure of a call's arguments and of a model's outputs, with tensor leaves.

Everything here is JSON-able (:meth:`TreeSpec.to_json`) so that engine metadata, cache
entries and saved modules carry it without pickle.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Iterator, Sequence

import torch
import torch.utils._pytree as pytree

__all__ = ["PathStep", "TreeSpec", "flatten", "leaf_paths", "unflatten"]

#: One step from a container to a child: ("key", dict key), ("index", i) or ("field", (i, name)).
PathStep = tuple[str, Any]

_CONST_TYPES = (bool, int, float, str)


class TreeSpec:
    """The structure of a nest of tuples, lists and dicts with tensor leaves.

    ``kind`` is one of ``tensor``, ``none``, ``const``, ``tuple``, ``list``, ``dict``, ``node``.
    ``cls`` keeps the exact container class (a namedtuple, an ``OrderedDict``, a
    ``transformers`` ``ModelOutput``) so that outputs come back as eager returns
    them. In JSON only the class's name is kept; loading resolves it from
    modules that are already imported and never imports anything, so a saved
    module cannot make us run code. Unresolved classes fall back to the builtin.

    ``node`` is another class registered with ``torch.utils._pytree`` (a dataclass
    registered with ``register_dataclass``): its children come from its registered
    flatten function, ``keys`` holds their field names where it has them and ``value``
    its pytree context, which must be JSON data. It is rebuilt with the registered
    unflatten function; unresolved, it falls back to a dict of its fields (a tuple
    without names).
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
        if self.kind == "dict" or (self.kind == "node" and self.keys):
            d["keys"] = self.keys
        if self.cls_name:
            d["cls"] = self.cls_name
        if self.kind == "const":
            d["value"] = self.value
        if self.kind == "node":
            d["value"] = _json_data(self.value)
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
    # subclass, ...), or for a node a class registered with torch's pytree: unflatten calls it with
    # values from metadata, which may come from disk, so an arbitrary class (subprocess.Popen with
    # args= and shell= keys) would run code.
    base = _CONTAINER_BASES.get(kind)
    if not name or (base is None and kind != "node"):
        return None
    mod_name, _, qual = name.partition(":")
    obj: Any = sys.modules.get(mod_name)  # never import: see TreeSpec's docstring
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        return None
    if kind == "node":
        return obj if _registered_node(obj) else None
    return obj if issubclass(obj, base) else None


def _registered_node(cls: type) -> bool:
    """A class with its own registration in torch's pytree (not one of the containers flattened here)."""
    return cls in pytree.SUPPORTED_NODES and not issubclass(cls, (tuple, list, dict))


def _is_cache(obj: Any) -> bool:
    # Hugging Face's caches (DynamicCache, EncoderDecoderCache, StaticCache, ...) derive from
    # transformers' ``Cache``; names are read so that transformers need not be imported.
    return any(c.__name__ == "Cache" or (c.__name__.endswith("Cache") and c.__module__.startswith("transformers"))
               for c in type(obj).__mro__)


def _json_data(value: Any) -> Any:
    """``value`` as JSON data (tuples become lists); ValueError if it is not JSON data."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_data(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_data(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not JSON data")


def _key_name(entry: Any) -> Any:
    """The field name (or key) of a pytree key entry, or None for a positional one."""
    for attr in ("name", "key"):
        label = getattr(entry, attr, None)
        if isinstance(label, (str, int)) and not isinstance(label, bool):
            return label
    return None


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def flatten(obj: Any, *, what: str = "value", allow_const: bool = True, nodes: bool = True,
            error: type[TypeError] = TypeError) -> tuple[list[torch.Tensor], TreeSpec]:
    """Split a nest into its tensor leaves (depth-first) and its structure.

    ``nodes``: also split classes registered with ``torch.utils._pytree`` (``node``, see TreeSpec).
    Cache objects are refused either way: they hold state that grows from call to call. ``error``
    is the TypeError subclass raised for what cannot be split (the export raises UnsupportedOutput).
    """
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
                    raise TypeError(f"{_where(what, path)}: dict key {k!r} is not a str or int")
            cls = None if type(o) is dict else type(o)
            return TreeSpec("dict", [rec(o[k], f"{path}[{k!r}]") for k in keys], keys, cls=cls)
        if isinstance(o, (tuple, list)):
            kind = "tuple" if isinstance(o, tuple) else "list"
            cls = None if type(o) in (tuple, list) else type(o)
            return TreeSpec(kind, [rec(v, f"{path}[{i}]") for i, v in enumerate(o)], cls=cls)
        if allow_const and isinstance(o, _CONST_TYPES):
            return TreeSpec("const", value=o)
        if _is_cache(o):
            held = type(o)
            raise error(
                f"{_where(what, path)} is a {held.__name__} ({held.__module__}.{held.__qualname__}), "
                "a cache object: it holds state that grows from call to call, and an engine takes and returns a "
                "fixed set of tensors; expected tensors nested in tuples, lists and dicts (or None). Fix: call the "
                "model with use_cache=False (Hugging Face: compile(model, ((input_ids,), {'use_cache': False})) "
                "or model.config.use_cache = False), or wrap it to return only the tensors you need.")
        if nodes and _registered_node(type(o)):
            return node(o, path)
        fix = ""
        if dataclasses.is_dataclass(o):
            fix = (f". Fix: register it with torch.utils._pytree.register_dataclass({type(o).__name__}), or return "
                   "its tensors in a tuple or dict")
        raise error(
            f"{_where(what, path)} is a {type(o).__name__}; expected tensors nested in tuples, lists and dicts"
            + (" (or None, bool, int, float, str constants)" if allow_const else " (or None)") + fix
        )

    def node(o: Any, path: str) -> TreeSpec:
        entry = pytree.SUPPORTED_NODES[type(o)]
        children, context = entry.flatten_fn(o)
        try:
            _json_data(context)
        except ValueError as e:
            raise error(
                f"{_where(what, path)} is a {type(o).__name__}, registered with torch's pytree, "
                f"but its pytree context is not JSON data ({e}); compiled modules keep their structure as JSON "
                "(never pickled). Fix: return its tensors in a tuple, list, dict or dataclass.") from None
        keys: list[Any] = []
        if entry.flatten_with_keys_fn is not None:
            names = [_key_name(k) for k, _ in entry.flatten_with_keys_fn(o)[0]]
            keys = names if len(names) == len(children) and None not in names else []
        labels = [f".{k}" for k in keys] if keys else [f"[{i}]" for i in range(len(children))]
        return TreeSpec("node", [rec(c, f"{path}{label}") for c, label in zip(children, labels)], keys,
                        cls=type(o), value=context)

    spec = rec(obj, "")
    return leaves, spec


def _where(what: str, path: str) -> str:
    """``output [1].a`` for a part of a value, ``output (the whole value)`` for the whole of it."""
    return f"{what} {path or '(the whole value)'}"


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
        if k == "node":
            if s.cls is None:  # not resolvable where it was loaded (see TreeSpec)
                return dict(zip(s.keys, children)) if s.keys else tuple(children)
            return pytree.SUPPORTED_NODES[s.cls].unflatten_fn(children, s.value)
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
            if s.kind == "dict" or (s.kind == "node" and s.keys):
                step: PathStep = ("key", s.keys[i])
            elif fields is not None:
                step = ("field", (i, fields[i]))
            else:
                step = ("index", i)
            rec(child, path + (step,))

    rec(spec, ())
    return out
