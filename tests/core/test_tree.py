"""torch_trt_module._core.tree: flatten/unflatten round trips (namedtuples, dict subclasses, keyword-only
dict classes, list subclasses, constants and None), leaf_paths in flatten's order, TreeSpec's JSON,
and class names read back from JSON never resolve to anything but a container of the recorded kind."""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import pytest
import torch

from torch_trt_module._core.tree import TreeSpec, flatten, leaf_paths, unflatten

Pair = collections.namedtuple("Pair", "first second")


class Record(dict):  # a dict subclass, as transformers' ModelOutput is
    pass


class KeywordsOnly(dict):
    """A dict class that takes only keywords (dataclass-like ModelOutput subclasses)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class Bag(list):
    pass


def t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def same(a: Any, b: Any) -> bool:
    """Equal structure, container types and leaves (tensors by identity)."""
    if isinstance(a, torch.Tensor):
        return a is b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


NESTS = {
    "tensor": lambda: t(2),
    "tuple": lambda: (t(1), t(2)),
    "nested": lambda: {"a": t(1), "b": (t(2), [t(3), None, 4, "s", 2.5, True])},
    "namedtuple": lambda: Pair(t(1), [t(2)]),
    "ordered dict": lambda: collections.OrderedDict([("z", t(1)), ("a", t(2))]),
    "dict subclass": lambda: Record(x=t(1), y=(t(2),)),
    "keywords-only dict": lambda: KeywordsOnly(logits=t(1), hidden=None),
    "list subclass": lambda: Bag([t(1), t(2)]),
    "int keys": lambda: {0: t(1), 1: {"k": t(2)}},
    "empty": lambda: ((), [], {}),
}


@pytest.mark.parametrize("name", list(NESTS))
def test_flatten_then_unflatten_gives_the_nest_back(name: str) -> None:
    nest = NESTS[name]()
    leaves, spec = flatten(nest)
    assert all(isinstance(x, torch.Tensor) for x in leaves) and spec.num_leaves == len(leaves)
    assert same(unflatten(spec, leaves), nest)


@pytest.mark.parametrize("name", list(NESTS))
def test_the_spec_round_trips_through_json(name: str) -> None:
    nest = NESTS[name]()
    leaves, spec = flatten(nest)
    back = TreeSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and back.num_leaves == spec.num_leaves
    assert same(unflatten(back, leaves), nest)  # the classes resolve again: this module is imported


def test_unflatten_takes_new_leaves_in_flatten_s_order() -> None:
    nest = {"a": t(1), "b": (t(2), [t(3)])}
    _, spec = flatten(nest)
    new = [torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)]
    out = unflatten(spec, new)
    assert out["a"] is new[0] and out["b"][0] is new[1] and out["b"][1][0] is new[2]


def test_constants_are_kept_and_can_be_refused() -> None:
    leaves, spec = flatten((t(1), 3, "x", None))
    assert len(leaves) == 1 and [c.kind for c in spec.children] == ["tensor", "const", "const", "none"]
    assert spec.children[1].value == 3 and spec.children[2].value == "x"
    with pytest.raises(TypeError) as info:
        flatten((t(1), 3), what="output", allow_const=False)
    assert str(info.value) == "output [1] is a int; expected tensors nested in tuples, lists and dicts (or None)"


def test_what_cannot_be_flattened_is_named_by_its_path() -> None:
    with pytest.raises(TypeError) as info:
        flatten({"a": [t(1), object()]}, what="output")
    assert str(info.value) == ("output ['a'][1] is a object; expected tensors nested in tuples, lists and dicts "
                               "(or None, bool, int, float, str constants)")
    with pytest.raises(TypeError, match=r"dict key \(1, 2\) is not a str or int$"):
        flatten({"a": {(1, 2): t(1)}})
    with pytest.raises(TypeError, match=r"^input \['a'\]: dict key"):
        flatten({"a": {1.5: t(1)}}, what="input")


@dataclasses.dataclass
class DC:
    a: torch.Tensor


def test_an_unregistered_dataclass_is_named_with_the_fix() -> None:
    # Issue 20: "output  is a DC" (an empty name) for a dataclass returned whole.
    with pytest.raises(TypeError) as info:
        flatten(DC(t(1)), what="output", allow_const=False)
    assert str(info.value) == ("output (the whole value) is a DC; expected tensors nested in tuples, lists and dicts "
                               "(or None). Fix: register it with torch.utils._pytree.register_dataclass(DC), or "
                               "return its tensors in a tuple or dict")
    with pytest.raises(TypeError, match=r"^output \[1\] is a DC; "):
        flatten((t(1), DC(t(2))), what="output", allow_const=False)
    with pytest.raises(TypeError, match=r"^value \(the whole value\): dict key 1.5 is not a str or int$"):
        flatten({1.5: t(1)})


# --------------------------------------------------------------------------- leaf paths

def test_leaf_paths_follow_flatten_s_order_with_keys_indices_and_fields() -> None:
    nest = {"x": Pair(t(1), [t(2), None, 3]), "y": collections.OrderedDict(b=t(1), a=t(1)), 1: Record(k=t(1))}
    leaves, spec = flatten(nest)
    paths = leaf_paths(spec)
    assert paths == [
        (("key", "x"), ("field", (0, "first"))),
        (("key", "x"), ("field", (1, "second")), ("index", 0)),
        (("key", "y"), ("key", "b")),
        (("key", "y"), ("key", "a")),
        (("key", 1), ("key", "k")),
    ]

    def walk(obj: Any, path: tuple[Any, ...]) -> Any:
        for kind, step in path:
            obj = obj[step[0]] if kind == "field" else obj[step]
        return obj

    assert all(walk(nest, p) is leaf for p, leaf in zip(paths, leaves))


def test_a_single_tensor_has_the_empty_path() -> None:
    _, spec = flatten(t(1))
    assert leaf_paths(spec) == [()]
    assert leaf_paths(flatten(None)[1]) == []


# --------------------------------------------------------------------------- classes from JSON

def test_classes_resolve_only_from_modules_already_imported() -> None:
    spec = TreeSpec.from_json({"kind": "tuple", "cls": "not_imported_anywhere:Thing",
                               "children": [{"kind": "tensor"}]})
    assert spec.cls is None and spec.cls_name == "not_imported_anywhere:Thing"
    x = t(1)
    assert same(unflatten(spec, [x]), (x,))  # falls back to the builtin of its kind
    assert spec.to_json()["cls"] == "not_imported_anywhere:Thing"  # the name is kept for the next reader


@pytest.mark.parametrize("kind,cls", [
    ("dict", "subprocess:Popen"),          # would run args= with shell= if called with metadata's values
    ("dict", "builtins:list"),             # another container than the recorded kind
    ("tuple", "collections:OrderedDict"),
    ("list", "builtins:tuple"),
    ("dict", "os:system"),                 # not a class at all
    ("tensor", "collections:OrderedDict"),  # leaves have no class
])
def test_a_class_name_from_json_never_resolves_to_anything_else(kind: str, cls: str) -> None:
    import subprocess  # noqa: F401 - imported, so only the kind check stands between it and a call

    spec = TreeSpec.from_json({"kind": kind, "cls": cls, "keys": ["args", "shell"],
                               "children": [{"kind": "const", "value": "touch x"}, {"kind": "const", "value": True}]})
    assert spec.cls is None


def test_a_dict_subclass_from_json_resolves() -> None:
    spec = TreeSpec.from_json({"kind": "dict", "cls": "collections:OrderedDict", "keys": ["a"],
                               "children": [{"kind": "tensor"}]})
    assert spec.cls is collections.OrderedDict
    assert type(unflatten(spec, [t(1)])) is collections.OrderedDict


def test_equality_is_structural() -> None:
    assert flatten((t(1), t(2)))[1] == flatten((t(5), t(6)))[1]
    assert flatten((t(1), t(2)))[1] != flatten([t(1), t(2)])[1]
    assert flatten(Pair(t(1), t(1)))[1] != flatten((t(1), t(1)))[1]
    assert flatten({"a": t(1)})[1] != flatten({"b": t(1)})[1]
    assert flatten((1,))[1] != flatten((2,))[1]
    assert flatten((t(1),))[1] != "not a spec"
