"""torch_trt_module._errors: the tree drawn in the module docstring is the class hierarchy (parents,
the built-in each derives from, and nothing left out), every class is a TorchTRTError, and each
can be caught as the built-in it names."""

from __future__ import annotations

import inspect
import re
import textwrap

import pytest

from torch_trt_module import _errors

# One tree line: the drawing, a class name, an optional "(BuiltinError)", then a description.
_LINE = re.compile(r"^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+)(?: \((?P<builtin>\w+)\))?(?:\s+\S.*)?$")


def documented_tree(which: int = 0) -> dict[str, tuple[str | None, str | None]]:
    """``{class: (parent, builtin)}`` read from a ``::`` block of the module docstring: the first
    draws the exported classes, the second (``which=1``) the internal ones."""
    doc = inspect.getdoc(_errors) or ""
    block = textwrap.dedent(doc.split("::")[which + 1].strip("\n").split("\n\n")[0])
    tree: dict[str, tuple[str | None, str | None]] = {}
    stack: list[tuple[int, str]] = []  # (depth, name) of the open ancestors
    for line in block.splitlines():
        m = _LINE.match(line)
        assert m, f"cannot read this line of the _errors docstring tree: {line!r}"
        depth = len(m["indent"]) // 4
        while stack and stack[-1][0] >= depth:
            stack.pop()
        tree[m["name"]] = (stack[-1][1] if stack else None, m["builtin"])
        stack.append((depth, m["name"]))
    return tree


def classes() -> dict[str, type]:
    return {name: cls for name, cls in vars(_errors).items()
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == _errors.__name__}


def test_the_docstring_tree_is_read() -> None:
    tree = documented_tree()
    assert tree["TorchTRTError"] == (None, None)
    assert tree["CacheLockTimeout"] == ("CacheError", "TimeoutError")  # a nested line, with its built-in


def test_the_docstring_tree_names_every_class_and_nothing_else() -> None:
    assert set(documented_tree()) == set(_errors.__all__)
    internal = documented_tree(1)
    assert set(documented_tree()) | (set(internal) - {"Exception"}) == set(classes())


def test_the_internal_classes_are_drawn_apart_and_are_not_torch_trt_errors() -> None:
    # Internal: caught inside the package (Corrupt: by the cache), never exported, so not TorchTRTErrors.
    internal = {n for n in documented_tree(1) if n != "Exception"}
    assert internal and not internal & set(_errors.__all__)
    for name in internal:
        assert not issubclass(classes()[name], _errors.TorchTRTError), name


@pytest.mark.parametrize("name", sorted(_errors.__all__))
def test_each_class_has_the_documented_parent_and_builtin(name: str) -> None:
    parent, builtin = documented_tree()[name]
    cls = classes()[name]
    ours = [b for b in cls.__bases__ if b.__module__ == _errors.__name__]
    others = [b for b in cls.__bases__ if b.__module__ != _errors.__name__]
    if parent is None:
        assert cls.__bases__ == (Exception,)
    else:
        assert ours == [classes()[parent]], f"{name} derives from {ours}, the docstring says {parent}"
    assert [b.__name__ for b in others if b is not Exception] == ([builtin] if builtin else [])
    if builtin:
        assert issubclass(cls, getattr(__import__("builtins"), builtin))


def test_builtins_are_inherited_down_the_tree() -> None:
    # The docstring names a built-in once, where it is added; the subclasses keep it.
    assert issubclass(_errors.PrecisionError, ValueError)
    assert issubclass(_errors.TritonRepoExists, ValueError) and issubclass(_errors.TritonRepoExists, FileExistsError)
    assert not issubclass(_errors.CacheError, TimeoutError)


@pytest.mark.parametrize("name", sorted(_errors.__all__))
def test_every_error_is_caught_by_the_root(name: str) -> None:
    cls = classes()[name]
    err = cls("message") if cls is not _errors.VerificationError else cls("message", report=None)
    with pytest.raises(_errors.TorchTRTError, match="^message$"):
        raise err


def test_verification_error_carries_its_report() -> None:
    report = object()
    err = _errors.VerificationError("outputs differ", report)
    assert err.report is report and str(err) == "outputs differ"
    assert _errors.VerificationError("no report").report is None
