"""The public API of ``torch_trt_module``: ``__all__`` is exactly the public namespace (no public
name missing, no private or missing name listed), sorted; and every exception class defined
anywhere in the package is defined in ``_errors.py`` and exported, so ``except TorchTRTError``
and ``from torch_trt_module import XError`` reach all of them."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import torch_trt_module as ttm
from torch_trt_module import _errors

# Exceptions that never leave the code that raises them: control flow, not errors a user sees.
INTERNAL_EXCEPTIONS = {
    # Raised by the cache's file layer for a bad entry and caught by the store (_cache/cache.py), whose
    # API turns it into a miss (get/lookup) or a CacheError (explicit operations). Defined in _errors
    # with every other exception, but internal: not in _errors.__all__, not exported.
    "torch_trt_module._errors.Corrupt",
    # Raised by TRTModule._prepare for an out-of-profile shape and caught by TRTModule._forward,
    # which widens the profile (lazy mode) or raises InputError with the same message.
    "torch_trt_module._runtime.module._OutOfProfile",
    # Raised by the fingerprint's value reader (_values.Tokens) for a value it cannot identify, and
    # caught by _keys.fingerprint, which then gives no fingerprint (compile() misses).
    "torch_trt_module._cache.values.Unfingerprintable",
    # Raised by the cache's safe opener for a symlink, FIFO, directory or device (an OSError, so
    # every caller's existing handling of unreadable files applies), and never read.
    "torch_trt_module._cache.safety.NotRegular",
    # Raised inside the ONNX and program checks and caught there, which raise EngineLoadError
    # naming where in the stored blob the refused field is.
    "torch_trt_module._formats.onnx_safety._NamesAFile",
    "torch_trt_module._formats.program_safety._Refused",
}


def package_modules() -> list[ModuleType]:
    """Every module of the package, imported (``__main__`` runs the command line, so not that one)."""
    names = [m.name for m in pkgutil.walk_packages(ttm.__path__, f"{ttm.__name__}.")
             if not m.name.endswith(".__main__")]
    return [ttm] + [importlib.import_module(n) for n in sorted(names)]


def exception_classes() -> dict[str, type]:
    """Every exception class defined in the package: at module level, nested in a class, or
    anywhere else that has run (BaseException's subclass tree), by ``module.qualname``."""
    found: dict[str, type] = {}

    def add(cls: type) -> None:
        if cls.__module__.startswith(f"{ttm.__name__}.") or cls.__module__ == ttm.__name__:
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls

    for module in package_modules():
        for value in vars(module).values():
            if inspect.isclass(value):
                for cls in (value, *(v for v in vars(value).values() if inspect.isclass(v))):
                    if issubclass(cls, BaseException):
                        add(cls)
    stack = [BaseException]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        add(cls)
    return found


def public_names() -> set[str]:
    return {name for name, value in vars(ttm).items()
            if not name.startswith("_") and not inspect.ismodule(value)}


def test_every_public_name_is_in_all() -> None:
    missing = public_names() - set(ttm.__all__)
    assert not missing, f"public names of torch_trt_module missing from __all__: {sorted(missing)}"


def test_all_holds_only_public_names_that_exist() -> None:
    private = [n for n in ttm.__all__ if n.startswith("_")]
    absent = [n for n in ttm.__all__ if not hasattr(ttm, n)]
    modules = [n for n in ttm.__all__ if inspect.ismodule(getattr(ttm, n, None))]
    assert not private and not absent and not modules, (private, absent, modules)
    assert len(set(ttm.__all__)) == len(ttm.__all__), "__all__ lists a name twice"


def test_all_is_sorted() -> None:
    assert ttm.__all__ == sorted(ttm.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from torch_trt_module import *", namespace)  # noqa: S102 - what `import *` users get
    assert set(namespace) - {"__builtins__"} == set(ttm.__all__)


def test_every_exception_is_defined_in_errors_and_exported() -> None:
    found = exception_classes()
    assert "torch_trt_module._errors.TorchTRTError" in found  # the search does find classes
    stray = sorted(name for name, cls in found.items()
                   if cls.__module__ != _errors.__name__ and name not in INTERNAL_EXCEPTIONS)
    assert not stray, f"exception classes defined outside _errors.py: {stray}"
    ours = {cls.__name__ for name, cls in found.items()
            if cls.__module__ == _errors.__name__ and name not in INTERNAL_EXCEPTIONS}
    assert ours == set(_errors.__all__), "_errors.__all__ is not exactly the classes _errors.py defines"
    unexported = sorted(n for n in ours if n not in ttm.__all__ or getattr(ttm, n) is not getattr(_errors, n))
    assert not unexported, f"exceptions not exported by torch_trt_module: {unexported}"


def test_the_internal_exceptions_listed_still_exist() -> None:
    # An entry left here after its class was removed (or made public) would hide a new class of that name.
    found = exception_classes()
    for name in INTERNAL_EXCEPTIONS:
        assert name in found, f"{name} is listed as internal but no longer exists"
        assert not issubclass(found[name], ttm.TorchTRTError), f"{name} is a TorchTRTError: define it in _errors.py"


@pytest.mark.parametrize("name", sorted(_errors.__all__))
def test_every_exception_is_a_torch_trt_error(name: str) -> None:
    assert issubclass(getattr(ttm, name), ttm.TorchTRTError)
