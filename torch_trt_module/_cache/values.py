"""What a module's code reads, as the fingerprint sees it: tokens for values, the way torch.compile's
guards see them.

A warm compile() trusts the fingerprint (:mod:`torch_trt_module._cache.keys`) to change whenever what ``forward`` computes
changes. Code is identified by its file or its distribution's version, but code also reads values
that are not in any file: a module-level global set from the environment (``SCALE =
float(os.environ["SCALE"])``), a dict or a config object held by a module (Hugging Face's
``config``), a ``functools.partial`` (``leaky_relu``'s slope). :class:`Tokens` turns each into a
deterministic string:

- plain data (numbers, strings, containers, tensors, dtypes, enums) by value;
- objects by their class's code and their attributes (``vars()``, recursively);
- ``functools.partial`` by its function, arguments and keywords;
- functions of the code under development by their code, defaults, closure cells and the globals
  their code names (``co_names``, nested code included), recursively: the globals ``forward``
  reads, and those of the helpers it calls. Installed code (torch, transformers) is identified by
  its distribution's version and is not walked.

Depth and the number of values visited are bounded. A value with no token (an open file, a
native handle, a structure too deep or too large) raises :class:`Unfingerprintable`: the caller
then gives up on the fingerprint, and compile() misses (it exports again), never serving an
engine on a guess.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import os
import re
import sys
import sysconfig
import threading
import types
import weakref
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch

__all__ = ["MAX_DEPTH", "MAX_VALUES", "NN_INTERNALS", "Tokens", "Unfingerprintable", "in_stdlib", "user_code"]

#: How deep values nest (a config inside a config inside a dict ...), and how many are visited in all.
MAX_DEPTH = 8
MAX_VALUES = 50_000

_SCALARS = (bool, int, float, complex, str, type(None))
#: Objects that hold no part of what a forward computes: their type is their token.
_INERT: tuple[type, ...] = (logging.Logger, type(threading.Lock()), type(threading.RLock()), threading.Event,
                            threading.Condition)
_TORCH_PLAIN = (torch.dtype, torch.device, torch.layout, torch.memory_format)


class Unfingerprintable(Exception):
    """A value the fingerprint cannot identify (the message says where): the key must be a miss."""


@lru_cache(maxsize=1024)
def in_stdlib(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(p) + os.sep) for p in _stdlib_dirs())


@lru_cache(maxsize=None)
def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({paths["stdlib"], paths["platstdlib"]})


@lru_cache(maxsize=4096)
def _module_is_user_code(name: str) -> bool:
    """Whether the Python module ``name`` is code under development: neither the standard library,
    nor an installed distribution (site-packages), nor built in, nor this package (whose globals
    are its own constants)."""
    module = sys.modules.get(name)
    if module is None or name.split(".")[0] == __name__.split(".")[0]:
        return False
    path = getattr(module, "__file__", None)
    if not isinstance(path, str):
        return name == "__main__"  # an interactive session's classes and functions
    if "site-packages" in path or "dist-packages" in path:
        return False
    return not in_stdlib(path)


def user_code(obj: Any) -> bool:
    """Whether ``obj`` (a function or a class) is defined in code under development."""
    name = getattr(obj, "__module__", None)
    return isinstance(name, str) and _module_is_user_code(name)


@lru_cache(maxsize=4096)
def _names(code: types.CodeType) -> frozenset[str]:
    """Every name the code object reads as a global or an attribute, nested code (lambdas,
    comprehensions, inner functions) included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return frozenset(names)


class Tokens:
    """Deterministic tokens for the values one fingerprint reads (one instance per fingerprint: it
    keeps a memo of the objects seen, and their count).

    ``code_id`` identifies code (a file's hash, a distribution's version); ``modules`` maps the
    modules of the model's tree to their names, so a reference to one (a bound method, a module in
    a dict) is its name, not its contents again.

    Example:
        >>> t = Tokens(code_id=lambda f: getattr(f, "__qualname__", "?"))
        >>> t.token({"scale": 2.0}) == Tokens(code_id=lambda f: "?").token({"scale": 2.0})
        True
        >>> t.token({"scale": 2.0}) == t.token({"scale": 3.0})
        False
    """

    def __init__(self, *, code_id: Callable[[Any], str], modules: Mapping[int, str] | None = None) -> None:
        self._code_id = code_id
        self._code_ids: dict[int, str] = {}
        self.modules = dict(modules or {})
        self.memo: dict[int, str] = {}
        self.keep: list[Any] = []  # what the memo's ids belong to, alive until the fingerprint is done
        self.active: set[int] = set()
        self.count = 0

    def token(self, value: Any, where: str = "value", depth: int = 0) -> str:
        self.count += 1
        if self.count > MAX_VALUES:
            raise Unfingerprintable(f"{where}: more than {MAX_VALUES} values to read")
        if isinstance(value, _SCALARS):
            return f"{type(value).__name__}:{value!r}"
        if isinstance(value, torch.Tensor):
            return self._memo(value, where, depth, self._tensor)
        if isinstance(value, _TORCH_PLAIN):
            return f"{type(value).__name__}:{value}"
        if isinstance(value, (bytes, bytearray)):
            return "bytes:" + hashlib.sha256(value).hexdigest()
        if isinstance(value, enum.Enum):
            return f"enum:{type(value).__module__}.{type(value).__qualname__}.{value.name}"
        if isinstance(value, _INERT):
            return f"inert:{type(value).__qualname__}"
        if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)):
            return f"descriptor:{value.__qualname__}"  # a slot or a C attribute: its value is read on the instance
        if isinstance(value, types.ModuleType):
            return f"module:{value.__name__}"
        if isinstance(value, re.Pattern):
            return f"re:{value.flags}:{value.pattern!r}"
        if type(value).__module__ == "numpy":
            return self._numpy(value, where)
        if depth >= MAX_DEPTH:
            raise Unfingerprintable(f"{where}: values nested deeper than {MAX_DEPTH}")
        if isinstance(value, torch.nn.Module) and id(value) in self.modules:
            return f"submodule:{self.modules[id(value)]}"
        return self._memo(value, where, depth, self._compound)

    def code_id(self, obj: Any) -> str:
        key = id(obj)
        got = self._code_ids.get(key)
        if got is None:
            got = self._code_ids[key] = self._code_id(obj)
            self.keep.append(obj)
        return got

    # ------------------------------------------------------------------ the kinds

    def _memo(self, value: Any, where: str, depth: int, how: Callable[[Any, str, int], str]) -> str:
        key = id(value)
        got = self.memo.get(key)
        if got is not None:
            return got
        if key in self.active:  # a cycle (an object that refers back to itself): its place is its token
            return f"cycle:{type(value).__qualname__}"
        self.active.add(key)
        try:
            got = how(value, where, depth)
        finally:
            self.active.discard(key)
        self.memo[key] = got
        self.keep.append(value)
        return got

    @staticmethod
    def _numpy(value: Any, where: str) -> str:
        import numpy as np

        if isinstance(value, np.generic):
            return f"numpy:{value.dtype}:{value!r}"
        if isinstance(value, np.ndarray) and value.dtype != object:
            data = np.ascontiguousarray(value)
            return f"ndarray:{data.dtype}:{data.shape}:" + hashlib.sha256(data.view(np.uint8).reshape(-1)).hexdigest()
        if isinstance(value, np.dtype):
            return f"numpy-dtype:{value}"
        raise Unfingerprintable(f"{where}: a numpy {type(value).__qualname__}")

    @staticmethod
    def _tensor(t: torch.Tensor, where: str, depth: int) -> str:
        t = t.detach()
        if t.is_meta or t.layout != torch.strided:
            raise Unfingerprintable(f"{where}: a {t.layout} tensor on {t.device}")
        h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.contiguous().cpu().view(-1).view(torch.uint8).numpy()))
        return "tensor:" + h.hexdigest()

    def _compound(self, value: Any, where: str, depth: int) -> str:
        d = depth + 1
        if isinstance(value, (tuple, list)):
            kind = type(value).__qualname__
            return f"{kind}[" + ",".join(self.token(v, f"{where}[{i}]", d) for i, v in enumerate(value)) + "]"
        if isinstance(value, (set, frozenset)):
            return "set{" + ",".join(sorted(self.token(v, f"{where}{{}}", d) for v in value)) + "}"
        if isinstance(value, Mapping):
            items = sorted(f"{self.token(k, f'{where} key', d)}={self.token(v, f'{where}[{k!r}]', d)}"
                           for k, v in list(value.items()))
            return f"{type(value).__qualname__}{{" + ",".join(items) + "}"
        if isinstance(value, functools.partial):
            return ("partial(" + self.token(value.func, f"{where}.func", d) + ";"
                    + self.token(value.args, f"{where}.args", d) + ";"
                    + self.token(value.keywords, f"{where}.keywords", d) + ")")
        if isinstance(value, types.MethodType):
            owner = self.token(value.__self__, where + ".__self__", d)
            return f"method({self.token(value.__func__, where, d)};{owner})"
        if isinstance(value, types.FunctionType):
            return self.function(value, where, d)
        if isinstance(value, (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType,
                              types.MethodDescriptorType, types.ClassMethodDescriptorType)):
            owner = getattr(value, "__self__", None)
            bound = "" if owner is None or isinstance(owner, (types.ModuleType, type)) else \
                ";" + self.token(owner, where + ".__self__", d)
            return f"builtin:{getattr(value, '__module__', None)}.{getattr(value, '__qualname__', '?')}{bound}"
        if isinstance(value, type):
            return self.klass(value, where, d)
        if isinstance(value, (staticmethod, classmethod)):
            return f"{type(value).__name__}({self.token(value.__func__, where, d)})"
        if isinstance(value, property):
            return "property(" + ";".join(self.token(f, where, d) for f in (value.fget, value.fset)) + ")"
        if isinstance(value, weakref.ref):
            target = value()
            return "weakref:" + ("dead" if target is None else self.token(target, where + "()", d))
        if isinstance(value, torch.nn.Module):  # not in the model's tree: its own contents
            return f"module:{self.code_id(type(value))}:{self._attributes(value, where, d, tensors=True)}"
        if hasattr(value, "__dict__") or hasattr(type(value), "__slots__"):
            return f"object:{self.code_id(type(value))}:{self._attributes(value, where, d)}"
        raise Unfingerprintable(f"{where}: a {type(value).__module__}.{type(value).__qualname__}, whose "
                                "contents cannot be read")

    def _attributes(self, obj: Any, where: str, depth: int, *, tensors: bool = False) -> str:
        attrs = dict(getattr(obj, "__dict__", None) or {})
        for klass in type(obj).__mro__:
            slots = vars(klass).get("__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    attrs.setdefault(slot, getattr(obj, slot))
        if isinstance(obj, torch.nn.Module) and tensors:
            attrs.update({f"param {n}": p for n, p in obj.named_parameters()})
            attrs.update({f"buffer {n}": b for n, b in obj.named_buffers()})
        parts = []
        for name in sorted(attrs):
            if isinstance(obj, torch.nn.Module) and name in NN_INTERNALS:
                continue
            parts.append(f"{name}={self.token(attrs[name], f'{where}.{name}', depth)}")
        return "(" + ",".join(parts) + ")"

    def function(self, fn: types.FunctionType, where: str, depth: int) -> str:
        """Its code's identity; for code under development also its defaults, closure cells and the
        globals its code names (recursively: the helpers it calls)."""
        head = f"function:{self.code_id(fn)}"
        if not user_code(fn):
            return head
        parts = [head]
        if fn.__defaults__:
            parts.append("defaults=" + self.token(fn.__defaults__, f"{where} defaults", depth))
        if fn.__kwdefaults__:
            parts.append("kwdefaults=" + self.token(fn.__kwdefaults__, f"{where} defaults", depth))
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell: not assigned yet
                continue
            parts.append(f"cell {name}={self.token(content, f'{where} closure {name}', depth)}")
        parts.append(self.globals_read(fn.__code__, fn.__globals__, f"{getattr(fn, '__qualname__', where)}", depth))
        return "[" + ";".join(parts) + "]"

    def globals_read(self, code: types.CodeType, scope: Mapping[str, Any], where: str, depth: int) -> str:
        """The values of the globals ``code`` names: a module global by its attributes the code names
        too (``cfg.SCALE``: ``cfg`` and ``SCALE`` are both in ``co_names``)."""
        names = _names(code)
        parts = []
        for name in sorted(names):
            if name not in scope:
                continue  # an attribute name, or a builtin
            value = scope[name]
            if isinstance(value, types.ModuleType):
                if _module_is_user_code(value.__name__):
                    read = {n: vars(value)[n] for n in sorted(names) if n in vars(value)}
                    parts.append(f"{name}=module {value.__name__}:" + ",".join(
                        f"{n}={self.token(v, f'{value.__name__}.{n}', depth)}" for n, v in read.items()
                        if not isinstance(v, types.ModuleType)))
                else:
                    parts.append(f"{name}=module:{value.__name__}")
                continue
            parts.append(f"{name}={self.token(value, f'global {name!r} read by {where}', depth)}")
        return "globals{" + ",".join(parts) + "}"

    def klass(self, cls: type, where: str, depth: int, *, roots: tuple[str, ...] | None = None) -> str:
        """A class: its code's identity; for code under development also its class attributes (set at
        run time as well as in the file) and the code of its methods, with the globals they read.
        ``roots``: only the methods reachable from these (a module's ``forward``: the names its code
        uses, transitively, looked up along the class's MRO); None: every method (a class the code
        names as a global, which it may construct or call in any way)."""
        head = f"class:{self.code_id(cls)}"
        if not user_code(cls):
            return head
        parts = [head]
        mro = [k for k in cls.__mro__ if user_code(k)]
        methods: dict[str, Any] = {}
        for k in reversed(mro):  # the first class in the MRO that defines a name wins
            for name, value in vars(k).items():
                if _code_of(value):
                    methods[name] = value
                elif not (name.startswith("__") and name.endswith("__") or name.startswith("_abc_")):
                    parts.append(f"{k.__qualname__}.{name}={self.token(value, f'{k.__qualname__}.{name}', depth)}")
        todo = list(methods if roots is None else roots)
        walked: set[str] = set()
        while todo:
            name = todo.pop()
            if name in walked or name not in methods:
                continue
            walked.add(name)
            value = methods[name]
            parts.append(f"def {name}={self.token(value, f'{cls.__qualname__}.{name}', depth)}")
            for fn in _code_of(value):
                todo.extend(_names(fn.__code__))
        return "[" + ";".join(parts) + "]"


def _code_of(value: Any) -> list[types.FunctionType]:
    """The Python functions behind a class attribute (a method, a static or class method, a property)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset) if isinstance(f, types.FunctionType)]
    return [value] if isinstance(value, types.FunctionType) else []


#: nn.Module's own bookkeeping (hooks, the parameter and child tables): read through the module's own
#: methods, or hashed apart by the fingerprint, never as plain attributes.
NN_INTERNALS = frozenset(vars(torch.nn.Module())) | {"_compiled_call_impl", "training"}
