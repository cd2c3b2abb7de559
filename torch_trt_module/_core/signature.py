"""Binding a call's args and kwargs to the forward signature, the same way at
export and at every forward, so inputs are named by parameter names."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .._errors import InputError

__all__ = ["Param", "bind_call", "copy_call", "params_of", "split_inputs", "to_call"]

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}
_POSITIONAL = ("positional_only", "positional_or_keyword")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str

    def to_json(self) -> list[str]:
        return [self.name, self.kind]

    @classmethod
    def from_json(cls, d: Sequence[str]) -> "Param":
        return cls(str(d[0]), str(d[1]))


def params_of(fn: Callable[..., Any]) -> tuple[Param, ...]:
    """The parameters of ``fn`` (a bound ``forward``), in order."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return (Param("args", "var_positional"), Param("kwargs", "var_keyword"))
    return tuple(Param(p.name, _KINDS[p.kind]) for p in sig.parameters.values())


def bind_call(params: Sequence[Param], args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map a call onto parameter names: ``{name: value}`` in signature order.

    Extra positional arguments go under the ``*args`` name as a tuple; extra
    keywords (for a ``**kwargs`` signature) under their own names, after the
    named parameters.
    """
    positional = [p for p in params if p.kind in _POSITIONAL]
    var_pos = next((p for p in params if p.kind == "var_positional"), None)
    var_kw = next((p for p in params if p.kind == "var_keyword"), None)
    names = [p.name for p in params if p.kind not in ("var_positional", "var_keyword")]
    bound: dict[str, Any] = {}
    if len(args) > len(positional) and var_pos is None:
        raise InputError(
            f"got {len(args)} positional arguments but forward takes at most {len(positional)} "
            f"({', '.join(p.name for p in positional) or 'none'}); pass the others by keyword"
        )
    for p, a in zip(positional, args):
        bound[p.name] = a
    if var_pos is not None and len(args) > len(positional):
        bound[var_pos.name] = tuple(args[len(positional):])
    for k, v in kwargs.items():
        if k in bound:
            raise InputError(f"got multiple values for argument {k!r}; pass it either by position or by keyword")
        named = next((p for p in params if p.name == k), None)
        if named is not None and named.kind == "positional_only":
            raise InputError(f"argument {k!r} is positional-only; pass it by position")
        if named is None and var_kw is None:
            raise InputError(f"got an unexpected keyword argument {k!r}; forward accepts: {', '.join(names)}")
        bound[k] = v
    order = {p.name: i for i, p in enumerate(params)}
    return dict(sorted(bound.items(), key=lambda kv: order.get(kv[0], len(order))))


def to_call(params: Sequence[Param], bound: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of :func:`bind_call`: the ``(args, kwargs)`` that reproduce ``bound``."""
    by_name = {p.name: p for p in params}
    var_pos = next((p for p in params if p.kind == "var_positional"), None)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    needs_positional = var_pos is not None and var_pos.name in bound
    for p in params:
        if p.name not in bound:
            if p.kind == "positional_only":
                break
            continue
        if p.kind == "positional_only" or (p.kind == "positional_or_keyword" and needs_positional):
            args.append(bound[p.name])
        elif p.kind == "var_positional":
            args.extend(bound[p.name])
        elif p.kind != "var_keyword":
            kwargs[p.name] = bound[p.name]
    for k, v in bound.items():
        if k not in by_name:
            kwargs[k] = v
    return tuple(args), kwargs


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise ``inputs`` to ``(args, kwargs)``.

    A tuple or a list is the positional arguments (a list as Torch-TensorRT takes them,
    ``compile(model, [x])``), except that a 2-tuple whose second item is a dict is
    ``(args, kwargs)``; anything else is one positional argument. To pass one list as the
    only argument, write ``([a, b],)``; to pass a dict as the last of two positional
    arguments, write ``((x, d), {})``.

    Example:
        >>> x = torch.ones(2)
        >>> split_inputs(x) == ((x,), {}), split_inputs(((x,), {"mask": None}))[1]
        (True, {'mask': None})
        >>> split_inputs([x])[0][0] is x
        True
    """
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict):
        args, kwargs = inputs
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"keyword argument names must be str; got {bad!r}")
        return (tuple(args) if isinstance(args, (tuple, list)) else (args,)), dict(kwargs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def copy_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with a copy of every tensor in it (nested ones too), for an eager run that must
    leave the caller's example as it was: a ``forward`` may write to its inputs (``x.div_(255)``)."""
    import torch.utils._pytree as pytree

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone()

    new_args, new_kwargs = pytree.tree_map_only(torch.Tensor, copy, (tuple(args), dict(kwargs)))
    return tuple(new_args), dict(new_kwargs)
