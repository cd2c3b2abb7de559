"""torch_trt_module._formats.program_safety (issue 24): a stored torch.export program is read only after every
string in it passed its grammar. torch.export's deserializer sympifies shape expressions (eval),
exec's guards, resolves node targets by getattr and writes node names into generated code, so each
of those is tried here with a payload, and each real program torch writes (dynamic batch with tied
dims, derived dims, guards, a transformer layer) must still pass.

Also issue 20's regression: a forward that computes its padding with ``math.ceil`` of a dynamic size
(TF-style "SAME" padding) compiles, and its program is stored (the node is lowered to integer ops)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export

import torch_trt_module as ttm
from torch_trt_module import EngineLoadError
from torch_trt_module._formats import program as _program
from torch_trt_module._core.io import pack, unpack
from torch_trt_module._formats.program import load_program, save_program, store_program
from torch_trt_module._formats.program_safety import check_expr, check_guard, check_program_json, check_target


def _refused(fn: Any, text: str) -> bool:
    try:
        fn(text)
    except Exception as e:  # noqa: BLE001 - the private _Refused
        return type(e).__name__ == "_Refused"
    return False


# --------------------------------------------------------------------------- the grammars

@pytest.mark.parametrize("text", [
    "Symbol('s17', positive=True, integer=True)",
    "Mul(Integer(4), Symbol('s17', positive=True, integer=True))",
    "Add(Symbol('s0', integer=True), Integer(-1))",
    "Max(Integer(1), FloorDiv(Symbol('s0'), Integer(2)))",
    "CeilToInt(IntTrueDiv(Symbol('s53', positive=True, integer=True), Integer(2)))",
    "Pow(Symbol('s0'), Integer(2))", "Float('2.5', precision=53)", "Rational(1, 2)",
    "s0 + 2*s1 - s2 // 3 % 4", "-s0", "2*s17", "oo", "-int_oo",
])
def test_expressions_torch_writes_pass(text: str) -> None:
    check_expr(text)


@pytest.mark.parametrize("text", [
    "sympify.__globals__['__builtins__']['__import__']('os').system('touch PWNED')",
    "__import__('os').system('x')",
    "Symbol('s0').__class__",
    "Symbol('__import__')",
    "Symbol('s0', evaluate=exec('1'))",
    "lambda: 0",
    "Integer(1) if True else Integer(2)",
    "[Symbol('s0')]",
    "Pow(Integer(10), Integer(1000000000))",  # computing it would hang the load
    "Float('1e1000000000000', precision=53)",
    "eval('1')",
    "s0 ^ 2",
    "1" * 50,
])
def test_anything_else_in_an_expression_is_refused(text: str) -> None:
    assert _refused(check_expr, text)


@pytest.mark.parametrize("text", [
    "L['x'].size()[0] == L['y'].size()[0]",
    "(L['x'].size()[0] % 2) == 0",
    "(3*L['x'].size()[0]) == (2*(L['x'].size()[0] // 2)*((3*L['x'].size()[0]) // (2*(L['x'].size()[0] // 2))))",
    "L['x'].size()[1] <= 64 and not L['x'].stride()[0] != 1", "math.floor(L['x'].size()[0] / 2) >= 1",
])
def test_guards_torch_writes_pass(text: str) -> None:
    check_guard(text)


@pytest.mark.parametrize("text", [
    "__import__('os').system('x') == 0",
    "L['x'].size()[0] == 1 or open('x', 'w')",
    "L['x'].__class__",
    "L['x'].numpy()[0] == 1",
    "L['x'] == '' or exec('1')",
    "torch.save(L['x'], 'f') == 0",
    "L[__import__('os').system('x')]",
])
def test_anything_else_in_a_guard_is_refused(text: str) -> None:
    assert _refused(check_guard, text)


@pytest.mark.parametrize("target", ["torch.ops.aten.add.Tensor", "torch.ops.aten.sym_size.int",
                                    "torch.ops.aten.__and__.Tensor", "torch.ops.torchvision.nms.default",
                                    "_operator.getitem", "_operator.floordiv", "math.ceil", "torch.sym_max",
                                    "torch.ops.higher_order.wrap_with_set_grad_enabled"])
def test_operators_pass(target: str) -> None:
    check_target(target)


@pytest.mark.parametrize("target", ["torch.os.system", "torch.load", "torch.hub.load", "_operator.call",
                                    "_operator.methodcaller", "math.__loader__.load_module",
                                    "torch.ops.load_library", "torch.ops.aten.__class__.__init__",
                                    "torch.ops.aten.add.__call__", "builtins.eval", "#ext:op",
                                    "torch.ops.higher_order.triton_kernel_wrapper_mutation"])
def test_any_other_target_is_refused(target: str) -> None:
    assert _refused(check_target, target)


# --------------------------------------------------------------------------- real programs

class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x) + y, x.reshape(-1) * x.shape[0]


class Derived(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: y.shape[0] * 2] + 1, y * 2


class Checked(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[0] % 2 == 0)
        return x.view(x.shape[0] // 2, 2, -1).sum(1).clamp(min=-math.inf)


class Same(torch.nn.Module):
    """TF-style "SAME" padding, as timm's tf_* models compute it: math.ceil of a dynamic size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        oh, ow = math.ceil(ih / 2), math.floor((iw + 1) / 2)
        ph, pw = max((oh - 1) * 2 + 3 - ih, 0), max((ow - 1) * 2 + 3 - iw, 0)
        return self.conv(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


def _programs() -> dict[str, Any]:
    torch.manual_seed(0)
    b, n = Dim("b", min=1, max=32), Dim("n", min=2, max=32)
    enc = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    return {
        "tied": export(Tied().eval(), (torch.randn(3, 8), torch.randn(3, 4)), dynamic_shapes=({0: b}, {0: b})),
        "derived": export(Derived(), (torch.randn(8), torch.randn(4)), dynamic_shapes=({0: 2 * n}, {0: n})),
        "guards": export(Checked(), (torch.randn(8, 3),), dynamic_shapes=({0: Dim.AUTO},)),
        "encoder": export(enc, (torch.randn(2, 5, 16),),
                          dynamic_shapes=({0: Dim("b", max=16), 1: Dim("t", max=64)},)).run_decompositions(),
    }


@pytest.fixture(scope="module")
def programs() -> dict[str, Any]:
    return _programs()


def test_real_programs_pass_and_round_trip(programs: dict[str, Any]) -> None:
    seen = {"expr": 0, "guards": 0, "derived": 0}
    for name, program in programs.items():
        data = save_program(program)
        doc = json.loads(unpack(data, kind="torch-program")[1]["program"])
        seen["guards"] += bool(doc["guards_code"])
        seen["derived"] += any(not k.isidentifier() for k in doc["range_constraints"])
        seen["expr"] += json.dumps(doc).count("expr_str")
        loaded = load_program(data, source=name)  # passes the check, and torch reads it
        assert loaded.range_constraints.keys() == program.range_constraints.keys() or name == "derived"
        loaded.module()  # builds (and exec's) the guard function from the checked guards
    assert seen["guards"] >= 1 and seen["derived"] >= 1 and seen["expr"] > 20


def _with(data: bytes, edit: Any) -> bytes:
    """The stored program with its JSON edited as an attacker would, checksums recomputed."""
    header, blobs = unpack(data, kind="torch-program")
    doc = json.loads(blobs["program"])
    edit(doc)
    return pack("torch-program", header, {**blobs, "program": json.dumps(doc).encode()})


def _first(doc: Any, key: str) -> dict[str, Any]:
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if key in node:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError(f"no {key!r}")


def _payloads(marker: Path) -> dict[str, Any]:
    run = f"__import__('os').system('touch {marker}')"

    def expr(doc: Any) -> None:
        _first(doc, "expr_str")["expr_str"] = (f"sympify.__globals__['__builtins__']['__import__']('os')"
                                               f".system('touch {marker}')")

    def guard(doc: Any) -> None:
        doc["graph_module"]["guards_code"] = [f"L['x'].size()[0] == 3 or {run}"]

    def target(doc: Any) -> None:
        _first(doc, "target")["target"] = "torch.os.system"

    def name(doc: Any) -> None:  # a placeholder name FX writes into forward's signature
        _first(doc["graph_module"]["graph"]["inputs"][-1], "name")["name"] = f"x={run}"

    def string_input(doc: Any) -> None:  # a string placeholder torch pastes into guard code
        doc["graph_module"]["graph"]["inputs"][-1] = {"as_string": f"' or {run} or '"}

    def spec(doc: Any) -> None:
        entry = doc["graph_module"]["module_call_graph"][0]["signature"]
        entry["in_spec"] = entry["in_spec"].replace("builtins.tuple", "os.system", 1)

    def constraint(doc: Any) -> None:
        doc["range_constraints"][run] = {"min_val": 1, "max_val": 4}

    def attribute(doc: Any) -> None:
        _first(doc, "parameter_name")["parameter_name"] = "lin.__class__.weight"

    def quoted(doc: Any) -> None:  # FX writes an odd attribute name as getattr(self, "...")
        _first(doc, "parameter_name")["parameter_name"] = f'lin.w"), {run}, getattr(self, "x'

    return {f.__name__: f for f in (expr, guard, target, name, string_input, spec, constraint, attribute, quoted)}


@pytest.mark.parametrize("kind", ["expr", "guard", "target", "name", "string_input", "spec", "constraint",
                                  "attribute", "quoted"])
def test_a_crafted_program_is_refused_before_torch_reads_it(programs: dict[str, Any], tmp_path: Path,
                                                            kind: str) -> None:
    marker = tmp_path / "PWNED"
    data = _with(save_program(programs["tied"]), _payloads(marker)[kind])
    with pytest.raises(EngineLoadError, match="refused to read the stored PyTorch program"):
        load_program(data, source="crafted.pt")
    assert not marker.exists()


def test_without_the_check_the_expression_payload_runs(programs: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Positive control: the payload above is real. With the check switched off (a test double),
    torch's deserializer runs it while it parses the shapes."""
    marker = tmp_path / "PWNED"
    data = _with(save_program(programs["tied"]), _payloads(marker)["expr"])
    monkeypatch.setattr(_program, "check_program_json", lambda raw, source: None)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch makes of the payload's result
        load_program(data)
    assert marker.exists()


def test_check_program_json_names_the_source_and_the_fix() -> None:
    with pytest.raises(EngineLoadError) as info:
        check_program_json(b'{"graph_module": {"guards_code": ["exec(1)"]}}', source="model.pt")
    assert str(info.value).startswith("model.pt: refused to read the stored PyTorch program: guard 'exec(1)' ")
    assert str(info.value).endswith("Do not use it: compile the model again")
    with pytest.raises(EngineLoadError, match="not JSON"):
        check_program_json(b"{", source="model.pt")


# --------------------------------------------------------------------------- math.ceil (issue 20)

def test_math_ceil_of_a_dynamic_size_is_stored_and_runs_on_the_pytorch_runtime(tmp_path: Path) -> None:
    model = Same().eval()
    dims = {0: (1, 2, 8), 2: (8, 15, 32), 3: (8, 17, 32)}
    fast = ttm.compile(model, torch.randn(2, 3, 15, 17), cache_dir=tmp_path, dynamic={"x": dims})
    assert isinstance(fast, ttm.TRTModule) and fast.engine.has_program
    on_torch = ttm.TRTModule(fast.engine, runtime="torch")
    for shape in [(1, 3, 8, 8), (3, 3, 15, 17), (8, 3, 32, 31), (2, 3, 9, 30)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(on_torch(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)


def test_a_program_that_cannot_be_stored_never_fails_compile(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    program = export(Same().eval(), (torch.randn(2, 3, 15, 17),),
                     dynamic_shapes=({2: Dim("h", min=8, max=32)},))

    def refuse(_: Any) -> Any:  # test double: torch's serializer refusing some other node
        raise AssertionError("op <built-in function gcd> is not in _SYM_OPS")

    monkeypatch.setattr("torch._export.serde.serialize.serialize", refuse)
    with caplog.at_level(logging.WARNING, logger="torch_trt_module"):
        assert store_program(program) is None
        assert store_program(program) is None
    said = [r.getMessage() for r in caplog.records if r.name.startswith("torch_trt_module")]
    assert len(said) == 1 and said[0].startswith(
        "torch.export's serializer cannot store the PyTorch program: AssertionError: op <built-in function gcd> "
        "is not in _SYM_OPS; the compiled module has no PyTorch runtime")
    with pytest.raises(ttm.ExportError, match="cannot store the PyTorch program"):
        save_program(program)
