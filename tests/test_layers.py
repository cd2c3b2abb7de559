"""The package's layering: the pipeline's stages as folders, each importing only what lies below it.

Packages, bottom to top (``LAYERS``). A module may import its own package's modules (as an acyclic
graph) or any package below its own; never one above. Every import counts: module level, inside a
function, under ``if TYPE_CHECKING``. Imports of the package's own modules sit at module level: a
function-level import is left only for optional third-party packages (tensorrt, onnxruntime, onnx,
redis, ...), which must not load with the package. An AST walk, like test_public_api.py; the rule
is checked on source text, so the tests below also show it catches what it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torch_trt_module as ttm

PACKAGE = ttm.__name__
ROOT = Path(ttm.__file__).parent

# Bottom to top. Units on one row are peers: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    ("_errors",),
    ("_core",),       # settings, dtypes, specs, trees and signatures, numerics, modes, io and signing
    ("_formats",),    # ONNX and torch.export programs, and the checks stored blobs pass
    ("backends",),    # the runtime chain and each runtime
    ("_export",),     # stage 1: model -> ExportedModel
    ("_build",),      # stage 2: ExportedModel -> Engine
    ("_cache",),      # stage 3: engines by content key, local and remote stores, fleets
    ("_runtime",),    # stage 4: TRTModule and the weights it follows
    ("_verify",),     # checks and comparisons against eager
    ("_partition",),  # split graphs and torch.compile's graphs: partitions, never compiles
    ("_pipeline",),   # compile(): sequences the stages, compiles each part; save/load
    ("_tools",),      # explain, doctor, bench, triton
    ("cli", "_dynamo"),  # the entry points: the command line and the torch.compile backend
    ("__main__",),
    ("__init__",),    # the public API
]
RANK = {unit: i for i, row in enumerate(LAYERS) for unit in row}


def unit_of(module: str) -> str:
    """The layer unit of ``torch_trt_module.x.y``: ``x`` (``__init__`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_sources() -> dict[str, tuple[str, bool]]:
    """``{module name: (source text, is a package __init__)}`` for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("").parts
        is_init = rel[-1] == "__init__"
        out[".".join(rel[:-1] if is_init else rel)] = (path.read_text(encoding="utf-8"), is_init)
    return out


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, bool]]:
    """Every import statement, and whether it is nested (in a function, a class or an ``if TYPE_CHECKING``)."""
    found: list[tuple[ast.stmt, bool]] = []

    def walk(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, nested))
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = True
            walk(child, inner)

    walk(tree, False)
    return found


def internal_targets(module: str, is_init: bool, node: ast.stmt, known: set[str]) -> list[str]:
    """The package modules an import statement reaches (``from . import x`` reaches module ``x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_init else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return []
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return subs or [target]


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every breach of the layering rule in ``sources`` (see the module docstring), as readable lines."""
    known = set(sources)
    found: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, (text, is_init) in sources.items():
        src_unit = unit_of(module)
        if src_unit not in RANK:
            found.append(f"{module}: its package {src_unit!r} is not placed in LAYERS")
            continue
        for node, nested in _imports(ast.parse(text)):
            for target in internal_targets(module, is_init, node, known):
                where = f"{module} line {node.lineno} imports {target}"
                dst_unit = unit_of(target)
                if nested:
                    found.append(f"{where} inside a function, class or TYPE_CHECKING block: import it at module level")
                if dst_unit == src_unit:
                    if target != module and target in known and src_unit != "__init__":
                        # a subpackage's __init__ re-exporting nothing: importing it from inside is not an edge
                        if not (sources[target][1] and target == f"{PACKAGE}.{src_unit}"):
                            graph[module].add(target)
                    continue
                if dst_unit not in RANK:
                    found.append(f"{where}: {dst_unit!r} is not placed in LAYERS")
                elif RANK[dst_unit] >= RANK[src_unit]:
                    found.append(f"{where}: {dst_unit} is not below {src_unit} (layers, bottom to top: "
                                 f"{' < '.join('/'.join(r) for r in LAYERS)})")
    found.extend(_cycles(graph))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per import cycle among the modules of one package (depth-first search)."""
    state: dict[str, int] = {}
    out: list[str] = []
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                out.append("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return out


# --------------------------------------------------------------------------- the package itself


def test_the_package_keeps_its_layers() -> None:
    found = violations(package_sources())
    assert not found, "layering broken:\n" + "\n".join(found)


def test_every_package_is_placed() -> None:
    units = {unit_of(m) for m in package_sources()}
    assert units <= set(RANK), f"packages not in LAYERS: {sorted(units - set(RANK))}"
    assert len([u for u in units if (ROOT / u).is_dir()]) >= 5, "fewer than 5 subpackages"


def test_at_most_twelve_modules_flat_at_the_top() -> None:
    flat = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(flat) <= 12, f"{len(flat)} modules at the top of the package: {flat}"


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


# --------------------------------------------------------------------------- the rule can fail


def _with(module: str, text: str, *, is_init: bool = False) -> list[str]:
    sources = package_sources()
    sources[module] = (text, is_init)
    return [v for v in violations(sources) if v.startswith(module) or module in v]


def test_an_upward_import_is_flagged() -> None:
    found = _with(f"{PACKAGE}._core.upward", "from .._pipeline.compile import compile\n")
    assert any("_pipeline is not below _core" in v for v in found), found


def test_an_upward_import_inside_a_function_is_flagged() -> None:
    text = "def f():\n    from .._runtime.module import TRTModule\n    return TRTModule\n"
    found = _with(f"{PACKAGE}._export.upward", text)
    assert any("_runtime is not below _export" in v for v in found), found
    assert any("inside a function" in v for v in found), found


def test_a_type_checking_import_counts() -> None:
    text = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import main\n"
    found = _with(f"{PACKAGE}._tools.upward", text)
    assert any("cli is not below _tools" in v for v in found), found


def test_a_peer_import_is_flagged() -> None:
    found = _with(f"{PACKAGE}.cli.peer", "from .._dynamo import backend\n")
    assert any("_dynamo is not below cli" in v for v in found), found


def test_an_absolute_upward_import_is_flagged() -> None:
    found = _with(f"{PACKAGE}._core.upward", "import torch_trt_module\nfrom torch_trt_module._cache import keys\n")
    assert any("__init__ is not below _core" in v for v in found), found
    assert any("_cache is not below _core" in v for v in found), found


def test_a_cycle_inside_a_package_is_flagged() -> None:
    sources = package_sources()
    sources[f"{PACKAGE}._core.ping"] = ("from .pong import x\n", False)
    sources[f"{PACKAGE}._core.pong"] = ("from . import ping\nx = 1\n", False)
    found = violations(sources)
    assert any(v.startswith("import cycle:") and "_core.ping" in v and "_core.pong" in v for v in found), found


def test_a_downward_and_third_party_import_pass() -> None:
    text = ("import json\nfrom .._core.settings import Settings\nfrom ..backends import select_backend\n"
            "def f():\n    import tensorrt\n    return tensorrt\n")
    assert _with(f"{PACKAGE}._build.fine", text) == []


@pytest.mark.parametrize("unit", sorted(RANK))
def test_layers_lists_each_unit_once(unit: str) -> None:
    assert sum(unit in row for row in LAYERS) == 1
