"""Cache keys (torch_trt_module._cache.keys): the stable hash, what changes the content key and what does not,
GPU identity and backend versions, and keys identical in every process. Through compile(), on real
TensorRT-RTX builds and ONNX Runtime, with ``_compile.STATS`` counting exports and builds."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module._pipeline import compile as _compile
from torch_trt_module._cache import keys as _keys
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module._cache.files import DeferredBlob
from torch_trt_module._core.io import sha256_bytes
from torch_trt_module._cache.keys import stable_hash
from torch_trt_module._core.settings import Settings
from torch_trt_module.backends import BackendChoice

from harness import faults
from harness.faults import EXPORTER, Child, TinyNet, compile_tiny, example, outputs_ok

from .._support import (IS_ROOT, REPO, assert_matches, counting, fingerprints, keys, last_json, python, require_rtx,
                        run_py)


def test_stable_hash_is_canonical_and_process_independent() -> None:
    obj = {"b": [1, 2.5, None, True], "a": "x\u00e9", "w": b"\x00\x01"}
    text = ('{"a":"x\\u00e9","b":[1,2.5,null,true],"w":{"__bytes_sha256__":"%s"}}'
            % hashlib.sha256(b"\x00\x01").hexdigest())
    assert stable_hash(obj) == hashlib.sha256(text.encode()).hexdigest()
    assert stable_hash({"w": b"\x00\x01", "a": "x\u00e9", "b": (1, 2.5, None, True)}) == stable_hash(obj)
    assert stable_hash({"a": 1}) != stable_hash({"a": 1.5}) != stable_hash({"a": "1"})
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()
    code = """
        from torch_trt_module._cache.keys import stable_hash
        names = {"conv%d.weight" % i for i in range(50)}
        print(stable_hash({"params": {n: [len(n), n.encode()] for n in names}, "order": sorted(names)}))
    """
    outs = {run_py(code, env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "random")}
    assert len(outs) == 1 and len(outs.pop()) == 64


@pytest.mark.parametrize("bad", [{1: "x"}, {"s": {1, 2}}, object(), float("nan"), [float("inf")]])
def test_stable_hash_rejects_unstable_values(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        stable_hash(bad)


# --------------------------------------------------------------------------- what changes the key

class WithBuffer(TinyNet):
    def __init__(self, seed: int = 0, persistent: bool = True) -> None:
        super().__init__(seed)
        self.register_buffer("shift", torch.zeros(4), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shift


class Relu(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Tanh(TinyNet):  # the same weights, another forward body
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Casts(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.float())


def _bumped(model: torch.nn.Module, edit: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        edit(other)
    return other


@contextlib.contextmanager
def other_backend_version() -> Iterator[None]:
    real = _keys.backend_version
    with faults.patched(_keys, "backend_version", lambda name: real(name) + ".post1"):
        yield


X = example()
INTS = torch.randint(0, 5, (3, 8))
Variant = tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]

# name -> (base, changed, a context the changed compile runs in)
VARIANTS: dict[str, Callable[[], tuple[Variant, Variant, Any]]] = {
    "one weight": lambda: ((m := TinyNet(0), (X,), {}),
                           (_bumped(m, lambda o: o.fc1.weight[0, 0].add_(0.5)), (X,), {}), None),
    "one buffer": lambda: ((m := WithBuffer(0), (X,), {}),
                           (_bumped(m, lambda o: o.shift[1].fill_(0.25)), (X,), {}), None),
    "one non-persistent buffer": lambda: ((m := WithBuffer(0, persistent=False), (X,), {}),
                                          (_bumped(m, lambda o: o.shift[1].fill_(0.25)), (X,), {}), None),
    "the module's code": lambda: ((Relu(0), (X,), {}), (Tanh(0), (X,), {}), None),
    "an input's max batch": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"max_batch": 64}), None),
    "an input's opt batch": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (example(5),), {}), None),
    "an input's dim range": lambda: ((TinyNet(0), (X,), {"dynamic": {"x": {0: (1, 3, 16)}}}),
                                     (TinyNet(0), (X,), {"dynamic": {"x": {0: (2, 3, 16)}}}), None),
    "static shapes": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"dynamic": None}), None),
    "an input dtype": lambda: ((m := Casts().eval(), (INTS,), {}), (m, (INTS.int(),), {}), None),
    "the precision": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"precision": "fp16"}), None),
    "the optimization level": lambda: ((TinyNet(0), (X,), {}),
                                       (TinyNet(0), (X,), {"optimization_level": 1}), None),
    "the workspace": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"workspace": 1 << 24}), None),
    "tf32": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"tf32": False}), None),
    "the backend version": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {}), other_backend_version()),
    "the RTX targets": lambda: ((TinyNet(0), (X,), {}), (TinyNet(0), (X,), {"targets": ["sm86"]}), None),
    "one more RTX target": lambda: ((TinyNet(0), (X,), {"targets": ["sm86"]}),
                                    (TinyNet(0), (X,), {"targets": ["sm86", "sm89"]}), None),
}


@pytest.mark.parametrize("what", list(VARIANTS))
def test_key_changes_with(what: str, tmp_path: Path) -> None:
    if "RTX" in what:
        require_rtx()  # without it compile() builds for ONNX Runtime, where targets mean nothing
    (model, inputs, opts), (model2, inputs2, opts2), context = VARIANTS[what]()
    model.eval()
    model2.eval()
    root = tmp_path / "cache"

    def compile_(m: torch.nn.Module, i: tuple[torch.Tensor, ...], o: dict[str, Any]) -> ttm.TRTModule:
        return ttm.compile(m, i, cache_dir=root, exporter=EXPORTER, **o)

    with counting() as n:
        base = compile_(model, inputs, opts)
    assert n["builds"] == 1
    keys0, fps0 = keys(root), fingerprints(root)
    with counting() as n, context or contextlib.nullcontext():
        changed = compile_(model2, inputs2, opts2)
    # Both levels miss: the fingerprint (else a warm compile would serve the old engine without
    # exporting) and the content key (a second entry, built for the change).
    assert n == {"exports": 1, "builds": 1, "cache_hits": 0}
    assert fingerprints(root) - fps0 and keys(root) - keys0 and keys0 <= keys(root)
    assert_matches(changed, model2, inputs2)
    # The first entry is still served to the first model, and to it only.
    with counting() as n:
        again = compile_(model, inputs, opts)
    assert n == {"exports": 0, "builds": 0, "cache_hits": 1}
    assert_matches(again, model, inputs)
    assert (again.engine.backend, again.engine.plan, again.engine.onnx) == \
        (base.engine.backend, base.engine.plan, base.engine.onnx)


def test_what_does_not_change_the_engine_shares_the_entry(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first = compile_tiny(0, root)
    for opts in ({"verify": False}, {"rtol": 0.1, "atol": 0.1}, {"cast_inputs": True}, {"max_rebuilds": 0},
                 {"progress": False}, {"cache_max_size": 10**9}, {"allow_host_code": True}):
        with counting() as n:
            module = compile_tiny(0, root, **opts)  # a new instance of the same model, too
        assert n == {"exports": 0, "builds": 0, "cache_hits": 1}, opts
        assert (module.engine.plan, module.engine.onnx) == (first.engine.plan, first.engine.onnx)
        assert outputs_ok(module, 0)
    assert len(keys(root)) == 1


def test_gpu_identity_and_backend_version_are_in_tensorrt_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = ttm.export_onnx(TinyNet(0), X, exporter=EXPORTER)
    settings = Settings.from_options()
    trt = BackendChoice("tensorrt", "tensorrt", "test")
    rtx = BackendChoice("tensorrt_rtx", "onnxruntime", "test")
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132, "total_memory": 85 << 30}
    gpus = {0: h100, 1: h100, 2: {**h100, "name": "NVIDIA H100 PCIe"}, 3: {**h100, "compute_capability": "9.1"},
            4: {**h100, "sm_count": 114}, 5: {**h100, "total_memory": 80 << 30}}
    versions = {"tensorrt": "10.13.0.35"}
    # Test doubles: tensorrt and a GPU are not available here; the key must take what they report
    # (the GPU's identity, which select_backend resolves once and the choice carries down).
    monkeypatch.setattr(_keys, "backend_version", lambda name: versions.get(name, "1.7.1.116"))

    def on(choice: BackendChoice, gpu: int) -> BackendChoice:
        return dataclasses.replace(choice, gpu=gpus[gpu] if choice.build == "tensorrt" else None)

    def key(choice: BackendChoice, gpu: int, s: Settings = settings) -> str:
        return _keys.content_key(exported.onnx, exported.to_meta(), s, on(choice, gpu), torch.device("cuda", gpu))

    trt_keys = [key(trt, g) for g in gpus]
    assert trt_keys[0] == trt_keys[1]  # the same GPU model on another index: never the index
    assert len(set(trt_keys[1:])) == 5  # name, compute capability, SM count and memory each count
    versions["tensorrt"] = "10.13.1.2"
    assert key(trt, 0) != trt_keys[0]
    # RTX engines are portable across GPUs: their key takes the targets, not the GPU.
    assert key(rtx, 0) == key(rtx, 2)
    assert key(rtx, 0) != key(rtx, 0, settings.replace(targets=("sm86",)))
    fp = [_keys.fingerprint(TinyNet(0), (X,), {}, settings, on(trt, g), torch.device("cuda", g)) for g in (0, 1, 2)]
    assert fp[0] == fp[1] != fp[2]  # the warm-path index follows the same rule


def test_key_is_identical_in_processes_with_different_hash_seeds(tmp_path: Path) -> None:
    # The default exporter (dynamo), as users get it; each process has its own cache.
    code = """
        import json, os, sys
        import torch_trt_module as ttm
        from torch_trt_module._cache.cache import EngineCache
        from harness.faults import TinyNet, example
        root = sys.argv[1] if len(sys.argv) > 1 else os.environ["ROOT"]
        ttm.compile(TinyNet(0), example(), cache_dir=root)
        print(json.dumps({"keys": [e.key for e in EngineCache(root).entries()],
                          "fps": sorted(os.listdir(os.path.join(root, "index"))), "hash": hash("abc")}))
    """
    procs = [python(code, env={"PYTHONHASHSEED": seed, "ROOT": str(tmp_path / seed)}) for seed in ("1", "2")]
    a, b = (last_json(p) for p in procs)
    assert a["hash"] != b["hash"]  # the seeds did change str hashing
    assert len(a["keys"]) == 1 and len(a["fps"]) == 1
    assert (a["keys"], a["fps"]) == (b["keys"], b["fps"])


def test_graph_modules_with_the_same_weights_and_other_code_never_share_a_fingerprint() -> None:
    # torch.compile hands the backend GraphModules: same classes, same weights, different graphs.
    import torch.fx

    class Act(torch.nn.Module):
        def __init__(self, fn: str) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.fn = fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.lin(x)) if self.fn == "relu" else torch.sigmoid(self.lin(x))

    torch.manual_seed(0)
    a = torch.fx.symbolic_trace(Act("relu"))
    b = torch.fx.symbolic_trace(Act("sigmoid"))
    b.load_state_dict(a.state_dict())
    vars(b).pop("fn", None), vars(a).pop("fn", None)  # only the graphs differ now
    assert _keys.module_fingerprint(a) != _keys.module_fingerprint(b)
    assert _keys.module_fingerprint(a) == _keys.module_fingerprint(a)


# --------------------------------------------------------------------------- values forward reads (issue 20, 3)

_SCALED = '''
import os, torch

SCALE = float(os.environ["SCALE"])


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * SCALE
'''


def test_a_global_read_by_forward_set_from_the_environment_misses_in_a_second_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    (tmp_path / "scaled_model.py").write_text(_SCALED)
    root = tmp_path / "cache"
    monkeypatch.setenv("SCALE", "1")
    monkeypatch.syspath_prepend(str(tmp_path))
    scaled = importlib.import_module("scaled_model")
    with counting() as first:
        ttm.compile(scaled.Scaled().eval(), torch.randn(2, 4), backend="onnxruntime", cache_dir=root)
    assert first["exports"] == 1
    code = """
        import json, sys, torch
        sys.path.insert(0, sys.argv[1])
        import torch_trt_module as ttm
        from torch_trt_module._pipeline import compile as _compile
        from scaled_model import Scaled
        model = Scaled().eval()
        fast = ttm.compile(model, torch.randn(2, 4), backend="onnxruntime", cache_dir=sys.argv[2])
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x)
            err = (fast(x) - ref).abs().max().item()
        print(json.dumps({"stats": _compile.STATS, "err": err, "scale": ref.abs().max().item()}))
    """
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
                           + textwrap.dedent(code), str(tmp_path), str(root)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SCALE": "5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["stats"]["exports"] == 1 and got["stats"]["cache_hits"] == 0  # SCALE=5: a miss, not the SCALE=1 engine
    # The SCALE=1 engine would be off by four fifths of the output; rounding is relative to it.
    assert got["err"] <= 1e-5 * max(1.0, got["scale"])


class _Reads(torch.nn.Module):
    """A forward whose result depends on a dict, a config object, a partial and a module global."""

    def __init__(self, cfg: Any, act: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.cfg, self.act = cfg, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.cfg["scale"] if isinstance(self.cfg, dict) else self.cfg.scale
        return self.act(self.lin(x) * scale) * _OFFSET["value"]


_OFFSET = {"value": 1.0}


class _Config:
    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.name = "cfg"


def _leaky(slope: float) -> Any:
    import functools

    return functools.partial(torch.nn.functional.leaky_relu, negative_slope=slope)


def _hf_config(scale: float) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PretrainedConfig(scale=scale)


@pytest.mark.parametrize("what, make, change", [
    ("a dict attribute", lambda: _Reads({"scale": 2.0}, _leaky(0.1)), lambda m: m.cfg.update(scale=3.0)),
    ("a config object", lambda: _Reads(_Config(2.0), _leaky(0.1)), lambda m: setattr(m.cfg, "scale", 3.0)),
    ("a Hugging Face config", lambda: _Reads(_hf_config(2.0), _leaky(0.1)), lambda m: setattr(m.cfg, "scale", 3.0)),
    ("a functools.partial", lambda: _Reads({"scale": 2.0}, _leaky(0.1)), lambda m: setattr(m, "act", _leaky(0.3))),
    ("a module global", lambda: _Reads({"scale": 2.0}, _leaky(0.1)), lambda m: _OFFSET.update(value=-2.0)),
])
def test_a_value_forward_reads_changes_the_fingerprint(what: str, make: Callable[[], Any],
                                                       change: Callable[[Any], None], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_OFFSET, "value", 1.0)
    model = make().eval()
    x = torch.randn(3, 4) - 1  # negative values: leaky_relu's slope shows
    ttm.compile(model, x, backend="onnxruntime", cache_dir=tmp_path)
    with counting() as again:
        ttm.compile(model, x, backend="onnxruntime", cache_dir=tmp_path)
    assert again["cache_hits"] == 1 and again["exports"] == 0  # unchanged: a hit, as before
    change(model)
    with counting() as changed:
        fast = ttm.compile(model, x, backend="onnxruntime", cache_dir=tmp_path)
    assert changed["exports"] == 1 and changed["cache_hits"] == 0, what  # before: a hit, serving the old engine
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


class _Opaque(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import itertools

        self.lin = torch.nn.Linear(4, 4)
        self.counter = itertools.count()  # no __dict__, no slots: its state cannot be read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_a_value_that_cannot_be_fingerprinted_is_always_a_miss(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="torch_trt_module")
    model = _Opaque().eval()
    x = torch.randn(2, 4)
    settings = Settings.from_options(backend="onnxruntime")
    choice = BackendChoice("onnxruntime", "onnxruntime", "test")
    assert _keys.fingerprint(model, (x,), {}, settings, choice, torch.device("cpu")) is None
    with counting() as done:
        for _ in range(2):
            fast = ttm.compile(model, x, backend="onnxruntime", cache_dir=tmp_path)
    # each a miss (an export), never a hit on a guess; the content key still finds the built engine
    assert done["exports"] == 2 and done["builds"] == 1 and done["cache_hits"] == 0
    assert fingerprints(tmp_path) == set()  # nothing recorded under a fingerprint
    assert any("no fingerprint for _Opaque: _Opaque.counter: a itertools.count, whose contents cannot be read"
               in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_the_values_read_are_bounded_and_cycles_end() -> None:
    from torch_trt_module._cache.values import MAX_DEPTH, Tokens, Unfingerprintable

    tokens = Tokens(code_id=lambda obj: "code")
    loop: dict[str, Any] = {"scale": 2.0}
    loop["self"] = loop
    assert tokens.token(loop) == "dict{str:'scale'=float:2.0,str:'self'=cycle:dict}"
    deep: Any = 1.0
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(Unfingerprintable, match=r"value\[0\](\[0\])*: values nested deeper than 8"):
        Tokens(code_id=lambda obj: "code").token(deep)
