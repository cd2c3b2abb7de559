"""The command line, run in-process through ``cli.main`` and, where the process boundary
matters (PYTHONPATH, exit status, stderr), as ``python -m torch_trt_module``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_trt_module as ttm
from torch_trt_module import cli
from torch_trt_module._errors import UsageError
from torch_trt_module.cli._inputs import parse_shapes

MODELS = textwrap.dedent('''
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, x):
            return torch.relu(self.fc(x))

    def factory():
        return Tiny()

    def wide():
        # 4096-term dot products: ONNX Runtime and eager round differently, so exact equality fails.
        return torch.nn.Sequential(torch.nn.Linear(4096, 16))

    def not_a_module():
        return 42
''')
SHAPES = "x:1x16,4x16,8x16"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("models")
    (d / "ttm_cli_models.py").write_text(MODELS)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop("ttm_cli_models", None)


@pytest.fixture(scope="module")
def engine_file(models_dir: Path) -> Path:
    path = models_dir / "tiny.ttm"
    code, out, err = run("build", "ttm_cli_models:factory", "--shapes", SHAPES, "-o", str(path), "--no-progress")
    assert code == 0, err
    assert f"-> {path}" in out and "build" in out and "engine" in out
    assert path.is_file() and path.stat().st_size > 0
    return path


@pytest.fixture(scope="module")
def onnx_file(models_dir: Path) -> Path:
    import ttm_cli_models  # type: ignore[import-not-found]

    path = models_dir / "tiny.onnx"
    torch.onnx.export(ttm_cli_models.factory().eval(), (torch.randn(2, 16),), str(path), dynamo=False,
                      input_names=["inp"], output_names=["out"],
                      dynamic_axes={"inp": {0: "batch"}, "out": {0: "batch"}})
    return path


# ---------------------------------------------------------------- build and inspect

def test_build_from_factory_then_inspect_shows_io_profiles(engine_file: Path) -> None:
    code, out, _ = run("inspect", str(engine_file), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["kind"] == "engine file"
    (spec,) = info["meta"]["model"]["inputs"]
    assert (spec["name"], spec["dtype"]) == ("x", "float32")
    assert (spec["min"], spec["opt"], spec["max"]) == ([1, 16], [4, 16], [8, 16])
    assert [o["name"] for o in info["meta"]["model"]["outputs"]] == ["output"]
    assert info["backend"] in ("tensorrt_rtx", "tensorrt", "onnxruntime")
    assert "Gemm" in info["ops"]
    code, text, _ = run("inspect", str(engine_file))
    assert code == 0
    assert "(1, 16)  (4, 16)  (8, 16)" in text and "float32" in text
    if info["backend"] != "onnxruntime" and not torch.cuda.is_available():
        assert "layer information needs a GPU runtime" in text


@pytest.mark.usefixtures("rtx_required")
def test_build_with_rtx_targets_records_them(models_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.ttm"
    code, out, err = run("build", "ttm_cli_models:factory", "--shapes", SHAPES, "-o", str(path),
                         "--target", "sm89,sm86", "--no-progress", "-q")
    assert code == 0, err
    assert "for targets sm86, sm89" in out
    assert ttm.Engine.load(path).meta["targets"] == ["sm86", "sm89"]


def test_build_from_onnx_file_then_inspect(onnx_file: Path, tmp_path: Path) -> None:
    code, out, _ = run("inspect", str(onnx_file), "--json")
    assert code == 0
    graph = json.loads(out)["model"]
    assert graph["inputs"] == [{"name": "inp", "dtype": "float32", "dims": ["batch", 16]}]
    path = tmp_path / "from_onnx.ttm"
    code, out, err = run("build", str(onnx_file), "--shapes", "inp:1x16,2x16,4x16", "-o", str(path), "-q")
    assert code == 0, err
    meta = ttm.Engine.load(path).meta
    assert meta["model"]["exporter"] == "onnx-file"
    (spec,) = meta["model"]["inputs"]
    assert (spec["name"], spec["min"], spec["opt"], spec["max"]) == ("inp", [1, 16], [2, 16], [4, 16])
    module = ttm.TRTModule(ttm.Engine.load(path))  # the engine file is usable, called by input name
    assert module(inp=torch.randn(3, 16))["out"].shape == (3, 8)


# ---------------------------------------------------------------- verify

def test_verify_passes_on_a_good_model(models_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    code, out, err = run("verify", "ttm_cli_models:factory", "--shapes", SHAPES, "--json", str(report))
    assert code == 0, out + err
    assert "onnxruntime (CPU) vs eager: PASS" in out
    assert out.count("inputs x=") == 3  # min, opt and max of the profile
    assert out.rstrip().splitlines()[-1].startswith("verify: PASS")
    assert json.loads(report.read_text())["passed"] is True


def test_verify_fails_with_exit_1_under_zero_tolerance(models_dir: Path) -> None:
    code, out, _ = run("verify", "ttm_cli_models:wide", "--shapes", "2x4096", "--atol", "0", "--rtol", "0", "-q")
    assert code == 1
    assert "exceed both atol=0 and rtol=0" in out
    assert out.rstrip().splitlines()[-1].startswith("verify: FAIL")


def test_verify_onnx_file_against_onnxruntime(onnx_file: Path) -> None:
    code, out, err = run("verify", str(onnx_file), "--shapes", "inp:1x16,2x16,4x16", "-q")
    assert code == 0, out + err
    assert "vs onnxruntime (CPU): PASS" in out


# ---------------------------------------------------------------- usage errors and --verbose

@pytest.mark.parametrize("argv, message", [
    (["build", "no_such_module_xyz:factory", "-o", "x.ttm", "--shapes", SHAPES], "cannot import"),
    (["build", "ttm_cli_models:nope", "-o", "x.ttm", "--shapes", SHAPES], "has no attribute 'nope'"),
    (["build", "ttm_cli_models:not_a_module", "-o", "x.ttm", "--shapes", SHAPES], "expected a torch.nn.Module"),
    (["build", "resnet", "-o", "x.ttm"], "neither an .onnx file nor 'package.module:factory'"),
    (["build", "missing.onnx", "-o", "x.ttm"], "does not exist"),
    (["build", "ttm_cli_models:factory", "-o", "x.ttm"], "needs --shapes"),
    (["build", "ttm_cli_models:factory", "-o", "x.ttm", "--shapes", "y:1x16"], "unknown input(s) ['y']"),
    (["build", "ttm_cli_models:factory", "-o", "x.ttm", "--shapes", "x:1x16,2x16"], "give one (static) or three"),
    (["build", "ttm_cli_models:factory", "-o", "x.ttm", "--shapes", "x:4x16,2x16,1x16"], "min <= opt <= max"),
    (["build", "ttm_cli_models:factory", "-o", "x.ttm", "--shapes", SHAPES, "--target", "sm86",
      "--backend", "onnxruntime"], "--target needs --backend tensorrt_rtx"),
    (["inspect", "no/such/file.ttm"], "does not exist"),
    (["cache", "prune", "--max-size", "lots"], "--max-size"),
    (["cache", "info", "ffffffffffff"], "no cache entry"),
    (["build"], "the following arguments are required"),
    (["frobnicate"], "invalid choice"),
    (["build", "ttm_cli_models:factory", "--precision", "fp64", "-o", "x.ttm"], "invalid choice"),
])
def test_usage_errors_exit_2_with_one_line_and_no_traceback(models_dir: Path, argv: list[str], message: str) -> None:
    code, out, err = run(*argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("torch-trt-module") and "error:" in lines[0] and message in lines[0]
    assert "Traceback" not in err and out == ""


def test_onnx_file_needs_shapes_for_dynamic_dims_and_keeps_its_precision(onnx_file: Path) -> None:
    code, _, err = run("build", str(onnx_file), "-o", "x.ttm")
    assert code == 2 and "--shapes inp:MIN,OPT,MAX" in err
    code, _, err = run("build", str(onnx_file), "--shapes", "inp:2x16", "--precision", "fp16", "-o", "x.ttm")
    assert code == 2 and "is a fp32 graph" in err


def test_verbose_adds_the_traceback(models_dir: Path) -> None:
    code, _, err = run("build", "no_such_module_xyz:factory", "-o", "x.ttm", "--shapes", SHAPES, "--verbose")
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ModuleNotFoundError" in err
    code, _, err = run("--verbose", "inspect", "no/such/file.ttm")  # also accepted before the subcommand
    assert code == 2 and "Traceback" in err


def test_main_leaves_logging_and_environment_as_it_found_them(models_dir: Path) -> None:
    logger = logging.getLogger("torch_trt_module")
    before = (list(logger.handlers), logger.level, logger.propagate, os.environ.get(cli.VERBOSE_ENV))
    run("--verbose", "inspect", "no/such/file.ttm")
    assert (list(logger.handlers), logger.level, logger.propagate, os.environ.get(cli.VERBOSE_ENV)) == before


def test_python_dash_m_entry_point(models_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(models_dir), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch_trt_module"]
    done = subprocess.run(cmd + ["build", "ttm_cli_models:factory", "--shapes", "x:1x16,2x16,4x16", "-o",
                                 str(tmp_path / "sub.ttm"), "--backend", "onnxruntime", "-q"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "built ttm_cli_models:factory" in done.stdout and (tmp_path / "sub.ttm").is_file()
    done = subprocess.run(cmd + ["inspect", str(tmp_path / "missing.ttm")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"torch-trt-module inspect: error: {tmp_path / 'missing.ttm'} "
                                                "does not exist"]


# ---------------------------------------------------------------- bench

def test_bench_prints_a_table_and_says_why_a_backend_cannot_run(models_dir: Path, tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    code, out, err = run("bench", "ttm_cli_models:factory", "--shapes", SHAPES, "--batch-sizes", "1,2",
                         "--backends", "eager,onnxruntime,trtmodule", "--iters", "5", "--warmup", "1",
                         "--json", str(out_json), "-q")
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    timed = {(r["backend"], r["batch"]) for r in rows if "median_ms" in r}
    assert {("eager", 1), ("eager", 2), ("onnxruntime", 1), ("trtmodule-onnxruntime", 2)} <= timed
    assert all(r["median_ms"] > 0 and r["iters"] == 5 for r in rows if "median_ms" in r)
    for backend in ("trtmodule-tensorrt", "trtmodule-tensorrt_rtx"):  # timed where a runtime exists, else a reason
        mine = [r for r in rows if r["backend"] == backend]
        assert mine and all("median_ms" in r or "not runnable on this machine" in r["reason"] for r in mine)
    assert "| eager " in out and "median ms" in out


# ---------------------------------------------------------------- cache

def _fill_cache(cache_dir: Any) -> None:
    for width in (4, 8):  # two models, two entries; the second is the most recently used
        ttm.compile(torch.nn.Linear(width, 2).eval(), torch.randn(2, width), cache_dir=cache_dir)


def test_cache_list_info_prune_clear(tmp_path: Path) -> None:
    d = str(tmp_path / "engines")
    _fill_cache(d)
    code, out, _ = run("cache", "list", "--cache-dir", d, "--json")
    assert code == 0
    entries = json.loads(out)
    assert len(entries) == 2
    older, newer = entries  # least recently used first
    code, text, _ = run("cache", "list", "--cache-dir", d)
    assert code == 0 and "2 entries" in text and older["key"][:16] in text and "input:1..32x8" in text
    code, text, _ = run("cache", "info", newer["key"][:10], "--cache-dir", d)
    assert code == 0 and f"key        {newer['key']}" in text and "(1, 8)  (2, 8)  (32, 8)" in text
    code, text, _ = run("cache", "prune", "--max-size", str(newer["size"]), "--cache-dir", d)
    assert code == 0 and "evicted 1 entries" in text and older["key"] in text
    assert [e.key for e in ttm._cache.cache.EngineCache(d).entries()] == [newer["key"]]
    code, text, _ = run("cache", "clear", "--cache-dir", d)
    assert code == 0 and text.startswith("removed 1 entries")
    code, text, _ = run("cache", "list", "--cache-dir", d)
    assert "0 entries" in text


def test_cache_commands_follow_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE", str(tmp_path / "from_env"))
    _fill_cache(None)
    code, out, _ = run("cache", "list")
    assert code == 0 and out.startswith(f"{tmp_path / 'from_env'}: 2 entries")


# ---------------------------------------------------------------- export-triton

def test_export_triton_writes_the_engine_with_the_options(engine_file: Path, tmp_path: Path) -> None:
    # The real export_triton: the repository it writes is what the options asked for.
    code, out, err = run("export-triton", str(engine_file), str(tmp_path / "repo"), "--name", "tiny",
                         "--max-batch-size", "8", "--no-dynamic-batching", "--instance-count", "2")
    assert code == 0, err
    model_dir = tmp_path / "repo" / "tiny"
    config = (model_dir / "config.pbtxt").read_text()
    assert 'name: "tiny"' in config and "max_batch_size: 8" in config and "count: 2" in config
    assert "dynamic_batching" not in config
    engine = ttm.Engine.load(engine_file)
    stored = model_dir / "1" / ("model.plan" if engine.has_plan else "model.onnx")
    assert stored.read_bytes() == (engine.plan if engine.has_plan else engine.onnx)
    assert "wrote Triton model 'tiny'" in out


def test_export_triton_takes_the_readme_s_positional_name_and_its_fixes_are_flags(tmp_path: Path) -> None:
    """issue 24: the README's (now docs/triton.md's) `export-triton model.pt model_repository resnet18`
    failed with "unrecognized arguments: resnet18", and a re-run suggested overwrite=True and version=2,
    which the CLI lacked."""
    saved = tmp_path / "model.pt"
    ttm.save(ttm.compile(torch.nn.Linear(16, 4).eval(), torch.randn(2, 16), cache=False, backend="onnxruntime"), saved)
    repo = tmp_path / "model_repository"
    code, out, err = run("export-triton", str(saved), str(repo), "resnet18")
    assert code == 0, err
    assert out == f"wrote Triton model 'resnet18' (onnxruntime) to {repo / 'resnet18'}\n"
    code, out, err = run("export-triton", str(saved), str(repo), "resnet18")
    assert code == 1
    assert err == (f"torch-trt-module export-triton: error: {repo / 'resnet18' / '1'} already exists and is not "
                   "empty (model.onnx). Fix: pass --overwrite to replace it, or --version 2 to add a version. "
                   "(run with --verbose for details)\n")
    code, _, err = run("export-triton", str(saved), str(repo), "resnet18", "--version", "2")
    assert code == 0, err
    assert (repo / "resnet18" / "2" / "model.onnx").is_file()
    code, _, err = run("export-triton", str(saved), str(repo), "resnet18", "--version", "3", "--max-batch-size", "0")
    assert code == 1 and "Fix: pass --overwrite to replace it, or use another NAME." in err
    code, _, err = run("export-triton", str(saved), str(repo), "resnet18", "--max-batch-size", "0", "--overwrite")
    assert code == 0, err
    assert "max_batch_size: 0" in (repo / "resnet18" / "config.pbtxt").read_text()
    code, _, err = run("export-triton", str(saved), str(repo), "a", "--name", "b")
    assert code == 2 and "export-triton got two model names, 'a' (NAME) and 'b' (--name); give one" in err


# ---------------------------------------------------------------- shapes

def test_parse_shapes_forms() -> None:
    assert parse_shapes(["x:1x3,2x3,4x3"]) == {"x": ((1, 3), (2, 3), (4, 3))}
    assert parse_shapes(["x:8x3"]) == {"x": ((8, 3),) * 3}
    assert parse_shapes(["a:1x4,2x4,8x4,b:1x2,2x2,8x2"]) == {"a": ((1, 4), (2, 4), (8, 4)),
                                                             "b": ((1, 2), (2, 2), (8, 2))}
    assert parse_shapes(["1x3,2x3,4x3"]) == {None: ((1, 3), (2, 3), (4, 3))}
    with pytest.raises(UsageError, match="rank"):
        parse_shapes(["x:1x3,2x3x1,4x3"])
    with pytest.raises(UsageError, match="twice"):
        parse_shapes(["x:1x3", "x:2x3"])


def test_inspect_of_a_file_that_is_no_engine_is_a_usage_error(models_dir: Path) -> None:
    code, _, err = run("inspect", str(models_dir / "ttm_cli_models.py"))
    assert code == 2 and "is not an engine file, a saved TRTModule or an .onnx file" in err


def test_verify_on_a_cuda_device_this_machine_lacks_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 24: `verify --device cuda` with no GPU raised torch's raw "Found no NVIDIA driver"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run("verify", "torchvision.models:resnet18", "--device", "cuda")
    assert (code, out) == (2, "")
    assert err == ("torch-trt-module verify: error: --device 'cuda' asks for a CUDA GPU, but torch can use none on "
                   "this machine (torch.cuda.is_available() is False: no NVIDIA driver or GPU, or a CPU-only torch). "
                   "Fix: pass --device cpu, or leave --device out\n")


def test_build_checks_the_output_directory_before_exporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 24: `build -o /missing/dir/x` failed only after the whole export, naming a .tmp file."""
    from torch_trt_module.cli import _inputs

    monkeypatch.setattr(_inputs, "load", lambda *a, **k: pytest.fail("exported before checking -o"))
    missing = tmp_path / "missing" / "dir"
    code, out, err = run("build", "torchvision.models:resnet18", "-o", str(missing / "x.ttm"))
    assert (code, out) == (2, "")
    assert err == (f"torch-trt-module build: error: -o {missing / 'x.ttm'}: the directory {missing} does not exist. "
                   f"Fix: create it (mkdir -p {missing}) or write elsewhere\n")
    code, _, err = run("build", "torchvision.models:resnet18", "-o", str(tmp_path))
    assert code == 2 and f"-o {tmp_path} is a directory; give a file name" in err
