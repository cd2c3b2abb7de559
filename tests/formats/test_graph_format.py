"""torch_trt_module._formats.graph (issue 21): the captured program's compact graph, which the PyTorch
runtime loads instead of running torch.export's deserializer (1.5 s of a 2.4 s warm hit on resnet50).

The loaded graph computes bit for bit what the ExportedProgram does (and FX writes the same code for
it); a crafted graph naming anything but an allowed operator, a table function or plain data is
refused with EngineLoadError before anything runs; a program the format cannot express (torch.cond)
gets no compact graph and runs as before; a warm cache hit never calls torch's deserializer."""

from __future__ import annotations

import builtins
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export
from torch.utils._pytree import tree_leaves

import torch_trt_module as ttm
from torch_trt_module import Engine, EngineLoadError
from torch_trt_module._cache.cache import EngineCache
from torch_trt_module._core.io import pack, unpack
from torch_trt_module._formats import graph as _graph
from torch_trt_module._formats.graph import check_graph, dump_graph, load_graph
from torch_trt_module._formats.program import check_program, load_program, load_runtime_graph, save_program
from torch_trt_module._pipeline.compile import STATS
from torch_trt_module.backends import _torch
from torch_trt_module.backends._torch import TorchRunner

from .._support import cache_entry
from tests.formats.test_program_safety import Same


class ConvBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        with torch.no_grad():  # statistics that show if a buffer is lost or swapped
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Block(torch.nn.Module):
    """LayerNorm, a Linear and attention over heads split from the (dynamic) batch and length."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = torch.nn.LayerNorm(16), torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (h.view(b, t, 2, d // 2).transpose(1, 2) for h in self.qkv(self.norm(x)).chunk(3, -1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)) + x


class Sizes(torch.nn.Module):
    """Arithmetic on a dynamic size (sym_size, operator.mul/floordiv), dtype and device arguments,
    slices, -inf, and two outputs."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        ramp = torch.arange(x.shape[1], dtype=torch.float64, device=x.device).to(torch.float32)
        y = x.reshape(n * 2, -1)[:, 1:].clamp(min=-math.inf) * (n // 2 + 1)
        return y, (x + ramp).sum(0, keepdim=True)


class Counter(torch.nn.Module):
    """A buffer the forward mutates: its program returns the new buffer before the user's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("n", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n.add_(1.0)
        return self.lin(x) + self.n


def _exported(name: str) -> tuple[torch.nn.Module, Any, list[torch.Tensor]]:
    """The model, its ExportedProgram (dynamic batch, or more) and inputs of two batch sizes."""
    torch.manual_seed(0)
    b = Dim("b", min=1, max=16)
    if name == "conv_bn":
        model, shapes, dims = ConvBN(), [(2, 3, 8, 8), (5, 3, 8, 8)], {0: b}
    elif name == "block":
        model, shapes, dims = Block(), [(2, 7, 16), (3, 11, 16)], {0: b, 1: Dim("t", min=2, max=32)}
    elif name == "sizes":
        model, shapes, dims = Sizes(), [(2, 6), (7, 6)], {0: b}
    elif name == "same":  # math.ceil of a dynamic size: save_program lowers it to integer ops
        model, shapes, dims = Same(), [(2, 3, 15, 17), (4, 3, 9, 30)], {0: b, 2: Dim("h", min=8, max=32),
                                                                        3: Dim("w", min=8, max=32)}
    else:
        model, shapes, dims = Counter(), [(2, 4), (3, 4)], {0: b}
    model.eval()
    inputs = [torch.randn(s) for s in shapes]
    program = export(model, (inputs[0],), dynamic_shapes=(dims,))
    # Functional: the new buffer is an output (the training IR captured compile() stores mutates it in place)
    return model, program.run_decompositions() if name == "counter" else program, inputs


def _edited(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The stored program with its compact graph edited as an attacker would, checksums recomputed."""
    header, blobs = unpack(data, kind="torch-program")
    doc = json.loads(blobs["graph"])
    edit(doc)
    return pack("torch-program", header, {**blobs, "graph": json.dumps(doc).encode()})


def _without_graph(data: bytes) -> bytes:
    """The stored program as an earlier version wrote it: torch.export's JSON only."""
    header, blobs = unpack(data, kind="torch-program")
    return pack("torch-program", header, {k: v for k, v in blobs.items() if k != "graph"})


def _node(doc: dict[str, Any], target: str) -> list[Any]:
    return next(n for n in doc["nodes"] if n[2] == target)


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("name", ["conv_bn", "block", "sizes", "same"])
def test_the_loaded_graph_computes_what_the_exported_program_does_bit_for_bit(name: str) -> None:
    model, program, inputs = _exported(name)
    data = save_program(program)
    loaded = load_runtime_graph(data)
    assert loaded is not None
    graph, state = loaded
    graph.module.graph.lint()
    # FX writes the same forward() as for torch.export's own deserialized graph module
    assert graph.module.code == load_program(data).graph_module.code
    sig = program.graph_signature
    assert graph.weights == tuple((s.kind.name, s.target) for s in sig.input_specs if s.kind.name != "USER_INPUT")
    assert graph.n_user_inputs == 1 and graph.n_outputs == len(sig.output_specs)
    assert graph.user_outputs == tuple(i for i, s in enumerate(sig.output_specs) if s.kind.name == "USER_OUTPUT")
    weights = [state[n] for _, n in graph.weights]
    for x in inputs:
        got = graph.module(*(w.clone() for w in weights), x)
        want = tree_leaves(program.module()(x))
        assert len(want) == len(graph.user_outputs)
        for i, w in zip(graph.user_outputs, want):
            assert torch.equal(got[i], w)


def test_the_compact_graph_is_deterministic_and_much_smaller_than_the_json() -> None:
    _, program, _ = _exported("block")
    data = save_program(program)
    assert save_program(program) == data  # the engine cache's content key hashes these bytes
    blobs = unpack(data, kind="torch-program")[1]
    assert list(blobs) == ["program", "graph", "state_dict", "constants", "example_inputs"]
    assert len(blobs["graph"]) * 4 < len(blobs["program"])


# --------------------------------------------------------------------------- crafted graphs

SENTINEL_CALLS: list[str] = []


@torch.library.custom_op("ttm_sentinel::record", mutates_args=())
def _record(x: torch.Tensor) -> torch.Tensor:
    SENTINEL_CALLS.append("record")
    return x.clone()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Calls of os.system or the sentinel operator while a test runs."""
    SENTINEL_CALLS.clear()
    monkeypatch.setattr(os, "system", lambda *a, **k: SENTINEL_CALLS.append("os.system"))
    return SENTINEL_CALLS


@pytest.fixture
def sentinels(calls: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """:func:`calls`, and eval's and exec's (only around loading: FX and sympy use them themselves)."""
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, lambda *a, _n=name, **k: SENTINEL_CALLS.append(_n))
    return SENTINEL_CALLS


@pytest.fixture(scope="module")
def small() -> bytes:
    return save_program(_exported("conv_bn")[1])


@pytest.mark.parametrize("target", ["builtins.eval", "os.system", "builtins.exec", "torch.load", "torch.ops.aten.relu.default",
                                    "operator.attrgetter", "math.__loader__", "ttm_sentinel::record.default",
                                    "torch::relu.default", "aten::relu.__call__", "aten::__class__.default",
                                    "aten::relu.default.extra", "aten::relu", "aten.relu.default", "::relu.default"])
def test_a_target_outside_the_allowlist_is_refused_and_nothing_runs(small: bytes, sentinels: list[str],
                                                                    target: str) -> None:
    crafted = _edited(small, lambda doc: _node(doc, "aten::relu.default").__setitem__(2, target))
    for load in (load_runtime_graph, lambda d: check_program(d, graph_only=True)):
        with pytest.raises(EngineLoadError, match=r"refused the stored PyTorch graph: node \d+ \(relu\) calls "
                                                  + re.escape(repr(target))):
            load(crafted)
    assert sentinels == []


def test_the_sentinel_operator_would_have_run(small: bytes, calls: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Positive control for the test above: were its namespace allowed, the crafted graph would load
    and call the sentinel when run."""
    monkeypatch.setattr(_graph, "NAMESPACES", _graph.NAMESPACES | {"ttm_sentinel"})
    crafted = _edited(small, lambda doc: _node(doc, "aten::relu.default").__setitem__(2, "ttm_sentinel::record.default"))
    graph, state = load_runtime_graph(crafted)
    graph.module(*(state[n] for _, n in graph.weights), torch.randn(1, 3, 8, 8))
    assert calls == ["record"]


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        where = doc
        for key in path[:-1]:
            where = _node(where, key) if isinstance(key, str) and key.startswith("aten::") else where[key]
        where[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit,said", [
    (_set(("nodes", 0, 0), "x; __import__('os')"), r"node 0 is named \"x; __import__\('os'\)\""),
    (_set(("nodes", 0, 2), "__class__"), "is a placeholder for '__class__'"),
    (_set(("aten::relu.default", 4), {"a=1)": 1}), r"keyword argument 'a=1\)'"),
    (_set(("aten::relu.default", 3), [{"n": 999}]), r"the argument \"\{'n': 999\}\""),
    (_set(("aten::relu.default", 3), [{"dtype": "float32; import os"}]), "float32; import os"),
    (_set(("aten::relu.default", 3), [{"device": ["cuda')", 0]}]), r"has the argument .*device.*cuda"),
    (_set(("aten::relu.default", 3), [{"f": "1e999"}]), r"the argument \"\{'f': '1e999'\}\""),
    (_set(("aten::relu.default", 3), [{"call": "os.system"}]), "os.system"),
    (_set(("aten::relu.default", 1), "call_module"), "is a 'call_module' node"),
    (_set(("inputs", 0), ["CUSTOM_OBJ", "x"]), r"input 0 is \"\['CUSTOM_OBJ', 'x'\]\""),
    (_set(("inputs",), []), "describes 0 inputs"),
    (_set(("user_outputs",), [5]), r"the outputs '\[5\]' of 1"),
    (_set(("format",), 2), "its format is 2, expected 1"),
])
def test_a_malformed_graph_is_refused_naming_the_part(small: bytes, sentinels: list[str],
                                                      edit: Callable[[dict[str, Any]], None], said: str) -> None:
    crafted = _edited(small, edit)
    with pytest.raises(EngineLoadError, match=said):
        load_runtime_graph(crafted, source="crafted.pt")
    with pytest.raises(EngineLoadError, match=r"^crafted.pt: refused the stored PyTorch graph: .*Compile the model"):
        load_runtime_graph(crafted, source="crafted.pt")
    assert sentinels == []


@pytest.mark.parametrize("raw", [b"{", b'{"format": NaN}', b"[]", b'{"format": 1}'])
def test_a_graph_that_is_not_one_is_refused(raw: bytes) -> None:
    with pytest.raises(EngineLoadError, match="refused the stored PyTorch graph"):
        check_graph(raw)
    with pytest.raises(EngineLoadError, match="refused the stored PyTorch graph"):
        load_graph(raw)


def test_a_graph_whose_weights_are_missing_is_refused(small: bytes) -> None:
    crafted = _edited(small, _set(("inputs", 0), ["PARAMETER", "no.such.weight"]))
    with pytest.raises(EngineLoadError, match="takes the parameter 'no.such.weight', which its weights lack"):
        load_runtime_graph(crafted)


def test_with_a_compact_graph_the_json_is_checked_where_it_is_read(tmp_path: Path) -> None:
    """graph_only (a cache hit) checks the compact graph, all the runtime reads; torch.export's JSON
    is still checked whole before torch's deserializer reads it, and wherever there is no graph."""
    marker = tmp_path / "PWNED"
    header, blobs = unpack(save_program(_exported("sizes")[1]), kind="torch-program")
    doc = json.loads(blobs["program"])
    stack = [doc]
    while not any(isinstance(n, dict) and "expr_str" in n for n in stack[-1:]):
        node = stack.pop()
        stack.extend(node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
    stack[-1]["expr_str"] = f"__import__('os').system('touch {marker}')"
    crafted = pack("torch-program", header, {**blobs, "program": json.dumps(doc).encode()})
    check_program(crafted, graph_only=True)  # the graph is intact
    assert load_runtime_graph(crafted) is not None
    for read in (check_program, load_program, lambda d: check_program(_without_graph(d), graph_only=True)):
        with pytest.raises(EngineLoadError, match="refused to read the stored PyTorch program: symbolic expression"):
            read(crafted)
    assert not marker.exists()


# --------------------------------------------------------------------------- what the format leaves out

class Branch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda v: self.lin(v) * 2, lambda v: self.lin(v) - 1, (x,))


def test_a_higher_order_operator_gets_no_compact_graph_and_runs_through_torch_export(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = Branch().eval()
    program = export(model, (torch.randn(2, 4),))
    assert dump_graph(program) is None
    assert "graph" not in unpack(save_program(program), kind="torch-program")[1]
    reads = []
    monkeypatch.setattr(_torch, "load_program", lambda data: reads.append(1) or load_program(data))
    module = ttm.compile(model, torch.randn(2, 4), runtime="torch", cache=False)
    assert module.backend == "torch" and reads  # the runtime read torch.export's program
    for x in (torch.randn(3, 4).abs(), -torch.randn(5, 4).abs()):  # both branches
        assert torch.equal(module(x), model(x).detach())


def test_what_the_loader_would_refuse_is_never_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    program = _exported("sizes")[1]  # has device(type='cpu') arguments
    assert dump_graph(program) is not None
    monkeypatch.setattr(_graph, "_DEVICE_TYPES", frozenset({"cuda"}))
    assert dump_graph(program) is None


# --------------------------------------------------------------------------- the PyTorch runtime

@pytest.mark.parametrize("optimize", ["none", "passes"])
def test_the_runtime_is_the_same_with_and_without_the_compact_graph(optimize: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = ConvBN().eval()
    module = ttm.compile(model, torch.randn(2, 3, 8, 8), runtime="torch", cache=False, optimize=optimize)
    engine = module.engine
    old = Engine(engine.backend, engine.plan, engine.onnx, engine.meta, program=_without_graph(engine.program))
    reads = []
    monkeypatch.setattr(_torch, "load_program", lambda data: reads.append(1) or load_program(data))
    fast, slow = TorchRunner(engine, "cpu", optimize=optimize), TorchRunner(old, "cpu", optimize=optimize)
    assert reads == [1]  # only the engine without the compact graph went through torch.export
    assert (fast.program_format, slow.program_format) == ("compact graph", "torch.export")
    assert fast.weight_names == slow.weight_names and fast.optimized == slow.optimized
    assert (fast._user_out, fast._all_out) == (slow._user_out, slow._all_out)
    for a, b in zip(fast._weights, slow._weights):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.stride() == b.stride()
    for batch in (1, 6):
        x = torch.randn(batch, 3, 8, 8)
        (a,), (b,) = fast.run([x]), slow.run([x])
        assert torch.equal(a, b)


def test_the_runtime_returns_only_the_user_outputs_of_a_mutating_program() -> None:
    _, program, inputs = _exported("counter")
    data = save_program(program)
    engine = SimpleNamespace(program=data, exported=SimpleNamespace(inputs=["x"], outputs=["y"]), meta={})
    fast = TorchRunner(engine, "cpu", optimize="none")
    slow = TorchRunner(SimpleNamespace(**{**vars(engine), "program": _without_graph(data)}), "cpu", optimize="none")
    assert [s.kind.name for s in program.graph_signature.output_specs] == ["BUFFER_MUTATION", "USER_OUTPUT"]
    assert fast._user_out == slow._user_out == [1] and not fast._all_out
    for x in inputs:
        (a,), (b,) = fast.run([x]), slow.run([x])
        assert torch.equal(a, b)


def test_device_arguments_are_pointed_at_the_runtime_device() -> None:
    data = save_program(_exported("sizes")[1])
    cpu_code = _torch._load_compact(data, torch.device("cpu"))[0].code
    gpu_code = _torch._load_compact(data, torch.device("cuda", 1))[0].code  # rewrites arguments: no GPU needed
    assert "device(type='cpu')" in cpu_code and "device(type='cpu')" not in gpu_code
    assert "device(type='cuda', index=1)" in gpu_code


# --------------------------------------------------------------------------- the cache

def test_a_warm_hit_never_calls_torch_exports_deserializer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._export.serde import serialize

    model, x = ConvBN().eval(), torch.randn(2, 3, 8, 8)
    ttm.compile(model, x, cache_dir=tmp_path, runtime="torch", optimize="none")
    calls = []
    real = serialize.deserialize
    monkeypatch.setattr(serialize, "deserialize", lambda *a, **k: calls.append(1) or real(*a, **k))
    hits = STATS["cache_hits"]
    warm = ttm.compile(model, x, cache_dir=tmp_path, runtime="torch", optimize="none")
    assert STATS["cache_hits"] == hits + 1 and warm.backend == "torch"
    assert calls == []
    assert torch.equal(warm(x), model(x).detach())
    load_program(warm.engine.program)  # positive control: the counter sees torch's deserializer
    assert calls == [1]


def test_a_cache_hit_with_a_crafted_graph_is_evicted_and_rebuilt(tmp_path: Path, calls: list[str]) -> None:
    model, x = ConvBN().eval(), torch.randn(2, 3, 8, 8)
    ttm.compile(model, x, cache_dir=tmp_path, runtime="torch", optimize="none")
    cache, key, entry = cache_entry(tmp_path)
    program = _edited(entry.blobs["program"], lambda d: _node(d, "aten::relu.default").__setitem__(2, "os.system"))
    meta = {k: v for k, v in entry.meta.items() if k in ("engine_meta", "backend")}
    assert cache.put(key, {**entry.blobs, "program": program}, meta)  # a cache writer's entry: checksums match
    warm = ttm.compile(model, x, cache_dir=tmp_path, runtime="torch", optimize="none")
    assert calls == [] and torch.equal(warm(x), model(x).detach())
    stored = EngineCache(tmp_path).get(key)
    assert stored is not None and b"os.system" not in stored.blobs["program"]  # rebuilt, clean


def test_a_file_with_a_crafted_graph_is_refused_at_load(tmp_path: Path) -> None:
    module = ttm.compile(ConvBN().eval(), torch.randn(2, 3, 8, 8), runtime="torch", cache=False)
    engine = module.engine
    crafted = _edited(engine.program, lambda d: _node(d, "aten::relu.default").__setitem__(2, "builtins.eval"))
    Engine(engine.backend, engine.plan, engine.onnx, engine.meta, program=crafted).save(tmp_path / "crafted.ttm")
    with pytest.raises(EngineLoadError, match=r"crafted.ttm: refused the stored PyTorch graph: .*'builtins.eval'"):
        Engine.load(tmp_path / "crafted.ttm")
