"""Keys: what the engine cache is indexed by.

- The **content key** (:func:`content_key`) is a sha256 over everything that changes the
  engine and nothing else: the ONNX graph with its weights, the input and output specs and
  profiles, the call and output structure, every :class:`Settings` field marked as changing
  the engine, the backend and its full version, the builder flags, and the GPU identity
  (TensorRT) or the target set (TensorRT-RTX). It can only be computed after an export.
- The **fingerprint** (:func:`fingerprint`) lets a warm compile() skip the export: it
  indexes into the content key, and covers what can change what the model computes:
  - every parameter and buffer (names, dtypes, shapes and bytes);
  - the code: for classes from an installed distribution (torch, torchvision,
    transformers, ...) the distribution's name and version; for any other class
    the whole source file it is defined in, so a change to a helper function next
    to the class also misses, and the source files of the code under development
    that file imports (transitively), so a helper in another file misses too;
  - the attributes of every submodule (``stride``, ``eps``, a ``scale`` float, a dict, a
    config object, a ``functools.partial``, ...) and its hooks, by value (:mod:`torch_trt_module._cache.values`);
  - the values the code under development reads that are in no file: the globals its
    methods name (``SCALE = float(os.environ["SCALE"])``), recursively through the helpers
    they call, and its classes' attributes;
  - the call's structure, shapes and dtypes, the settings and the backend.

Any doubt is resolved towards a miss: a miss costs an export, a wrong hit serves a wrong engine.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import sys
import types
from functools import lru_cache
from typing import Any, Mapping

import torch

from .._build.build import engine_flags, engine_targets
from .._core.io import canonical_json, sha256_bytes
from .._core.settings import Settings
from .._core.signature import bind_call, params_of
from .._core.tree import flatten
from .._formats.onnx import load
from ..backends import BackendChoice, backend_version
from .files import CACHE_FORMAT_VERSION
from .values import NN_INTERNALS, Tokens, Unfingerprintable, in_stdlib, user_code

__all__ = ["content_key", "fingerprint", "keyed_by_value", "module_fingerprint", "stable_hash",
           "target_part", "timing_cache_name"]

log = logging.getLogger(__name__)

def _canonical(obj: object, where: str) -> object:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes_sha256__": sha256_bytes(bytes(obj))}
    if isinstance(obj, Mapping):
        for k in obj:
            if not isinstance(k, str):  # json would make 1 and "1" the same key
                raise TypeError(f"stable_hash: key {k!r} in {where} is a {type(k).__name__}; only str keys hash stably")
        return {k: _canonical(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"stable_hash: {where} is a {type(obj).__name__}; expected JSON data (dict with str keys, "
                    "list, tuple, str, int, float, bool, None) or bytes")


def stable_hash(obj: object) -> str:
    """sha256 hex of the canonical JSON of ``obj``, identical in every process and on every machine.

    ``bytes`` enter as ``{"__bytes_sha256__": <their sha256>}``.

    Example:
        >>> stable_hash({"w": b"weights", "shape": [1, 3]}) == stable_hash({"shape": (1, 3), "w": b"weights"})
        True
    """
    try:
        return sha256_bytes(canonical_json(_canonical(obj, "obj")))
    except ValueError as e:
        raise ValueError(f"stable_hash: {e}; NaN and infinity have no stable form") from e


def timing_cache_name(choice: BackendChoice, device: torch.device) -> str | None:
    if choice.build != "tensorrt":
        return None
    return "timing-" + stable_hash({"gpu": choice.gpu, "trt": backend_version("tensorrt")})[:32]


def target_part(choice: BackendChoice, settings: Settings, device: torch.device) -> dict[str, Any]:
    part: dict[str, Any] = {"backend": choice.build, "backend_version": backend_version(choice.build)}
    if choice.build != "onnxruntime":
        part["builder_flags"] = engine_flags(choice, settings)
    if choice.build == "tensorrt":
        part["gpu"] = choice.gpu  # resolved once, by select_backend
    elif choice.build == "tensorrt_rtx":
        targets = engine_targets(choice, settings)
        part["targets"] = list(targets) if targets else "rtx-default"
    return part


def content_key(onnx: bytes, model_meta: dict[str, Any], settings: Settings, choice: BackendChoice,
                device: torch.device) -> str:
    """The cache key: a sha256 over everything that changes the engine and nothing else. With
    ``weights="follow"`` or ``"exact"`` the weights' values are left out (an entry of the same structure
    is refit to the source's weights at the hit; the two share entries: they differ only in how a call
    looks for a change); with ``"snapshot"`` they are in (inside the graph)."""
    follow = settings.follows_weights and bool(model_meta.get("weights"))
    return stable_hash({
        "cache_format": CACHE_FORMAT_VERSION,
        "graph": structure_hash(onnx, set(model_meta["weights"])) if follow else sha256_bytes(onnx),
        "weights": "follow" if follow else "in the graph",
        "inputs": model_meta["inputs"],
        "outputs": model_meta["outputs"],
        "structure": [model_meta["call_tree"], model_meta["output_tree"], model_meta["user_input_dtypes"],
                      model_meta["user_output_dtypes"]],
        "settings": settings.engine_fields(),
        **target_part(choice, settings, device),
    })


def keyed_by_value(settings: Settings) -> bool:
    """Whether the fingerprint holds the weights' values: unless ``weights="follow"`` (or ``"exact"``), and
    always for the TorchScript exporter, whose graphs fold their weights (so its engines cannot be refit)."""
    return not settings.follows_weights or settings.exporter == "torchscript"


def structure_hash(onnx: bytes, weights: set[str]) -> str:
    """sha256 of the graph with the values of the initializers ``weights`` left out (names, dtypes and
    shapes stay in)."""

    model = load(onnx)
    for init in model.graph.initializer:
        if init.name in weights:
            name, dims, dtype = init.name, list(init.dims), init.data_type
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
    return sha256_bytes(model.SerializeToString(deterministic=True))


def fingerprint(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings,
                choice: BackendChoice, device: torch.device) -> str | None:
    """The warm-path index: module content + call structure + shapes + settings + backend. With
    ``weights="follow"`` or ``"exact"`` the weights' values are left out, as in :func:`content_key`. None where a
    value the model's code reads cannot be fingerprinted: compile() then looks nothing up (a miss)."""
    bound = bind_call(params_of(model.forward), args, kwargs)
    leaves, tree = flatten(bound, what="input")
    try:
        module = module_fingerprint(model, values=keyed_by_value(settings))
    except Unfingerprintable as e:
        log.info("no fingerprint for %s: %s. compile() exports it again (any doubt is a miss); the content key "
                 "still finds its built engine", type(model).__name__, e)
        return None
    return stable_hash({
        "cache_format": CACHE_FORMAT_VERSION,
        "kind": "fingerprint",
        "module": module,
        # "exact" finds what "follow" recorded, and the reverse: the same engine serves both
        "weights": "follow" if settings.follows_weights else settings.weights,
        "call": tree.to_json(),
        "shapes": [[list(t.shape), str(t.dtype)] for t in leaves],
        "settings": settings.engine_fields(),
        "torch": torch.__version__,
        **target_part(choice, settings, device),
    })


# --------------------------------------------------------------------------- module fingerprint

def module_fingerprint(model: torch.nn.Module, *, values: bool = True) -> str:
    """sha256 over the module's tensors, code and attributes, and the values its code reads (see the
    module docstring). ``values=False``: the parameters' and buffers' names, dtypes and shapes, not
    their values (``weights="follow"``: an engine of the same structure is refit to them). Raises
    :class:`~torch_trt_module._cache.values.Unfingerprintable` for a value it cannot identify.

    Example:
        >>> a = module_fingerprint(torch.nn.Linear(2, 2))
        >>> len(a)
        64
    """
    h = hashlib.sha256()
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        _hash_tensor(h, name, t, values=values)
    named = list(model.named_modules(remove_duplicate=False))
    # A reference to a module of the tree (a bound method, a module in a dict) is its name, not its
    # contents again; tensors and values are read once per fingerprint (a shared config object).
    tokens = Tokens(code_id=_code_id, modules={id(m): n or "<root>" for n, m in reversed(named)})
    root = type(model).__name__
    seen_classes: set[type] = set()
    for mod_name, mod in named:
        cls = type(mod)
        h.update(f"\0module {mod_name} {cls.__module__}:{cls.__qualname__} {mod.training}".encode())
        h.update(f"\0non-persistent {sorted(mod._non_persistent_buffers_set)}".encode())
        graph = isinstance(mod, torch.fx.GraphModule)
        attrs = vars(mod)
        for key in sorted(attrs):
            # A GraphModule's code is hashed below; its graph object and meta are not read by that code,
            # but its tensor constants (``_tensor_constant0``, plain attributes) are.
            if key in NN_INTERNALS or graph and not isinstance(attrs[key], torch.Tensor):
                continue
            h.update(f"\0attr {key}={tokens.token(attrs[key], f'{mod_name or root}.{key}')}".encode())
        if graph:
            # Its class is generated per instance and its code lives in the graph: two GraphModules
            # with the same weights and classes may compute different things (torch.compile graphs).
            h.update(f"\0graph {mod.code}".encode())
        for hooks in (mod._forward_hooks, mod._forward_pre_hooks):
            for hook in hooks.values():
                h.update(f"\0hook {tokens.token(hook, f'a hook of {mod_name or root}')}".encode())
        for klass in cls.__mro__:
            if klass not in seen_classes and klass is not object:
                seen_classes.add(klass)
                h.update(f"\0code {klass.__module__}:{klass.__qualname__} {_code_id(klass)}".encode())
                if user_code(klass):  # what forward reaches: methods, their globals, class attributes
                    h.update(f"\0reads {tokens.klass(klass, klass.__qualname__, 0, roots=_ROOTS)}".encode())
    return h.hexdigest()


#: Where a module's computation starts: what its call runs (nn.Module.__call__ is torch's own code).
_ROOTS = ("forward", "_call_impl", "__call__")


def _hash_tensor(h: Any, name: str, t: torch.Tensor, *, values: bool = True) -> None:
    t = t.detach()
    h.update(f"\0tensor {name} {t.dtype} {tuple(t.shape)}".encode())
    if t.numel() == 0 or not values:
        return
    data = t.contiguous().cpu()
    h.update(memoryview(data.view(-1).view(torch.uint8).numpy()))


def _code_id(obj: Any) -> str:
    """Identify code: installed distributions by version, anything else by its source file."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    top = (getattr(obj, "__module__", None) or "").split(".")[0]
    version = _dist_version(top)
    if version is not None:
        return f"{top}=={version}:{getattr(obj, '__qualname__', '?')}"
    try:
        path = inspect.getsourcefile(obj) or (module and inspect.getsourcefile(module))
    except TypeError:
        path = None
    if path and os.path.exists(path):
        st = os.stat(path)
        return (f"file:{_file_sha(path, st.st_mtime_ns, st.st_size)}:{_imports_id(module)}:"
                f"{getattr(obj, '__qualname__', '?')}")
    code = getattr(obj, "__code__", None) or getattr(getattr(obj, "forward", None), "__code__", None)
    if code is not None:
        return "bytecode:" + hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()
    return f"unknown:{type(obj).__qualname__}"


def _imports_id(module: Any) -> str:
    """The code ``module`` reaches through its globals (``import helpers``, ``from helpers import act``),
    transitively: source files of code under development by content, installed distributions by
    version, the standard library not at all. A helper that forward calls can live in another file."""
    if not isinstance(module, types.ModuleType):
        return ""
    h = hashlib.sha256()
    seen = {module.__name__}
    todo = [module]
    while todo:
        scanned = todo.pop()
        # A package gains its submodules as attributes whenever anyone imports them, so they are
        # skipped there (the result must not change with what was imported since); its functions
        # and classes are followed like any module's.
        is_package = hasattr(scanned, "__path__")
        for value in list(vars(scanned).values()):
            if isinstance(value, types.ModuleType):
                if is_package:
                    continue
                target = value
            else:
                try:
                    name = getattr(value, "__module__", None) if callable(value) else None
                except Exception:  # noqa: BLE001 - a proxy object whose attributes raise
                    name = None
                target = sys.modules.get(name) if isinstance(name, str) else None
            if target is None or target.__name__ in seen:
                continue
            seen.add(target.__name__)
            version = _dist_version(target.__name__.split(".")[0])
            if version is not None:
                h.update(f"\0dist {version}".encode())
                continue
            path = getattr(target, "__file__", None)
            if not isinstance(path, str) or not path.endswith(".py") or in_stdlib(path) or not os.path.exists(path):
                continue
            st = os.stat(path)
            h.update(f"\0file {target.__name__} {_file_sha(path, st.st_mtime_ns, st.st_size)}".encode())
            todo.append(target)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _dist_version(top: str) -> str | None:
    if not top or top == "__main__":
        return None
    mod = sys.modules.get(top)
    path = getattr(mod, "__file__", None) or ""
    if "site-packages" not in path and "dist-packages" not in path:
        return None  # code under development: hash its source instead
    from importlib.metadata import version

    try:  # the usual case, the import name is the distribution's: one lookup on the path
        return f"{top}-{version(top)}"
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or broken metadata
        pass
    try:
        dists = _packages_distributions().get(top) or [top]
        return f"{dists[0]}-{version(dists[0])}"
    except Exception:  # noqa: BLE001
        v = getattr(mod, "__version__", None)
        return str(v) if v else None


@lru_cache(maxsize=None)
def _packages_distributions() -> Mapping[str, list[str]]:
    # Reads the metadata of every installed distribution (0.1-1 s): once per process, and only
    # for a module whose import name is not its distribution's (yaml -> PyYAML).
    from importlib.metadata import packages_distributions

    return packages_distributions()


@lru_cache(maxsize=256)
def _file_sha(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
