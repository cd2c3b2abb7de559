"""The children of zoo_report.py: one zoo case, the must-fail cases, one coverage model; and what
they need (timm conditioning, the library's state, the package's warnings).

Each runs in its own subprocess (zoo_report.child_main); split out of zoo_report.py (issue 22),
which re-exports every name."""

from __future__ import annotations

import subprocess
import tempfile
import time
from typing import Any

from zoo_common import COVERAGE_BATCHES, COVERAGE_EXAMPLE_BATCH, COVERAGE_MAX_BATCH, POINTS, ROOT
from zoo_graphs import _graph_split, _graph_states, _how_it_runs, _watch_dynamo_graphs


# --------------------------------------------------------------------------- child: one zoo case

def run_case(label: str) -> dict[str, Any]:
    """Steps (a)-(d) of the zoo for one case, recording figures instead of asserting."""
    import torch

    import torch_trt_module as ttm
    from harness.cases import by_label, class_failures, worst

    case = by_label(label)
    tol = case.tolerance
    rec: dict[str, Any] = {"case": label, "id": case.id, "name": case.name, "tol": case.tol,
                           "slow": case.slow, "status": "fail", "failure": None}
    step = "export"
    try:
        model = case.model()
        args, kwargs = case.inputs("example")
        t0 = time.perf_counter()
        exported = ttm.export_onnx(model, (args, kwargs), dynamic=case.dynamic, precision=case.precision)
        rec["export_s"] = round(time.perf_counter() - t0, 2)
        rec["exporter"] = exported.exporter
        rec["export_check"] = worst(exported.extra["export_report"])
        step = "tensorrt_rtx build"
        try:
            engine = ttm.build_engine(exported, backend="tensorrt_rtx")
            rec["rtx"] = {"ok": bool(engine.plan), "engine_mb": round(len(engine.plan or b"") / 1e6, 2),
                          "build_s": engine.meta.get("build_time_s")}
        except ttm.TorchTRTError as e:
            rec["rtx"] = {"ok": False, "error": _first_line(e)}
        step = "compile"
        with tempfile.TemporaryDirectory() as cache:
            compiled = ttm.compile(model, (args, kwargs), dynamic=case.dynamic, precision=case.precision,
                                   backend="auto", cache_dir=cache)
        rec["runs_on"] = compiled.backend
        problems = [] if rec["rtx"]["ok"] else [f"TensorRT-RTX build: {rec['rtx']['error']}"]
        rec["points"] = {}
        for point in POINTS:
            step = f"parity at {point}"
            p_args, p_kwargs = case.inputs(point)
            with torch.inference_mode():
                expected = model(*p_args, **p_kwargs)
                reference = compiled.run_reference(*p_args, **p_kwargs)
            from torch_trt_module._verify.compare import compare_outputs

            ort = compare_outputs(reference, expected, rtol=tol.rtol, atol=tol.atol, what="onnxruntime")
            comp = ttm.verify(model, compiled, (p_args, p_kwargs), rtol=tol.rtol, atol=tol.atol)
            fails = class_failures(ort, tol) + class_failures(comp, tol)
            rec["points"][point] = {"onnxruntime": worst(ort), "compiled": worst(comp), "passed": not fails,
                                    "shapes": _shapes(p_args, p_kwargs)}
            problems += [f"{point}: {f.splitlines()[0]}" for f in fails]
        rec["status"] = "pass" if not problems else "fail"
        rec["failure"] = "; ".join(problems) or None
    except Exception as e:  # noqa: BLE001 - record and go on
        rec["failure"] = f"{step}: {type(e).__name__}: {_first_line(e)}"
    return rec


def run_must_fail() -> list[dict[str, Any]]:
    """#18 and #19: what actually happens, in words for the table."""
    import torch

    import torch_trt_module as ttm
    from harness.models import ItemBranch, MaskedSelect

    out = []
    rec: dict[str, Any] = {"case": "19-data_dependent_branch", "id": 19, "tol": "-"}
    try:
        ttm.compile(ItemBranch().eval(), torch.randn(2, 8), cache=False)
        rec.update(status="fail", failure="compile() succeeded: the branch was baked in silently")
    except ttm.ExportError as e:
        ok = "data-dependent control flow" in str(e) and "Fix:" in str(e)
        rec.update(status="pass" if ok else "fail",
                   outcome="ExportError: 'the model has data-dependent control flow ...', suggesting torch.where "
                           "/ torch.cond" if ok else f"ExportError: {_first_line(e, 160)}",
                   failure=None if ok else "the message does not name the cause or a fix")
    out.append(rec)

    rec = {"case": "18-masked_select", "id": 18, "tol": "E"}
    notes = []
    with tempfile.TemporaryDirectory() as cache:
        module = ttm.compile(MaskedSelect().eval(), torch.randn(2, 8), backend="onnxruntime", cache_dir=cache)
        inputs = [torch.randn(3, 8), -torch.ones(2, 8), torch.ones(4, 8), torch.randn(1, 8)]
        right = all(torch.equal(module(x), x[x > 0]) for x in inputs)
    notes.append(f"ONNX Runtime: {'exact' if right else 'WRONG'} on {len(inputs)} inputs with 0..all positives")
    exported = ttm.export_onnx(MaskedSelect().eval(), torch.randn(2, 8))
    try:
        engine = ttm.build_engine(exported, backend="tensorrt_rtx")
        notes.append(f"TensorRT-RTX builds ({len(engine.plan or b'') / 1e6:.2f} MB; output via IOutputAllocator)")
        named = True
    except ttm.BuildError as e:
        named = "NonZero" in str(e)
        notes.append("TensorRT-RTX: BuildError naming op NonZero (its parser has no NonZero plugin), so "
                     "compile(backend='auto') raises it; backend='onnxruntime' runs"
                     if named else f"TensorRT-RTX: BuildError not naming the op: {_first_line(e, 160)}")
    rec.update(status="pass" if right and named else "fail", outcome="; ".join(notes),
               failure=None if right and named else "; ".join(notes))
    out.append(rec)
    return out


# --------------------------------------------------------------------------- child: one coverage model

def run_coverage(kind: str, name: str) -> dict[str, Any]:
    """Compile one model of a coverage set the way a user does, and say how it ran and whether it is right.

    ``ttm.compile(model, example, max_batch=4)``: verify=True and partition='auto' are the defaults.
    The result is one of: ``full graph`` (one TensorRT-RTX engine), ``partitioned`` (a
    PartitionedModule: dynamo's graphs, each on an engine or in PyTorch; a SegmentedModule, where the
    library has it: one graph in engine parts and PyTorch ops; or the whole graph without an engine,
    on the next runtime, because the builder refused it) or ``failed`` (compile() or the first call
    raised). Parity with eager (class M, and a spread check so a constant output cannot pass) at
    batch 1 and 3 decides whether it runs correctly.
    """
    import logging
    import warnings

    import torch

    import torch_trt_module as ttm
    import zoo_models
    from harness.cases import TOLERANCES, class_failures, input_spread, randomize_zero_weights, worst
    from torch_trt_module._verify.compare import compare_outputs
    from torch_trt_module._core.tree import flatten

    spec = zoo_models.spec(kind, name)
    rec: dict[str, Any] = {"model": name, "group": spec.group, "note": spec.note, "result": "failed",
                           "correct": False, "failure": None, "library": library_state()}
    warned = _capture_warnings(logging.getLogger("torch_trt_module"))
    step = "building the model"
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = spec.build().eval()
        rec["params"] = sum(p.numel() for p in model.parameters())
        call = spec.call
        if kind == "timm":
            import timm

            size = zoo_models.timm_input_size(model)
            call = zoo_models.timm_image(size)
            rec["input"] = f"{size}x{size}"
            rec["module"] = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        rec["randomized"] = randomize_zero_weights(model)  # a zero head would make every output equal
        if kind == "timm":
            rec["conditioning"] = condition_timm(model, size)
        graphs = _watch_dynamo_graphs()
        args, kwargs = call(COVERAGE_EXAMPLE_BATCH, torch.Generator().manual_seed(0))
        rec["example"] = _shapes(args, kwargs)
        step = "compile"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = ttm.compile(model, (args, kwargs), max_batch=COVERAGE_MAX_BATCH)
            rec["compile_s"] = round(time.perf_counter() - t0, 2)
            step = "the first call"  # a PartitionedModule builds its graphs' engines here
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(*args, **kwargs)
            rec["first_call_s"] = round(time.perf_counter() - t0, 2)
        step = "reading how it runs (the benchmark's own code)"
        rec.update(_how_it_runs(compiled, graphs))
        first_graphs = len(graphs)
        tol = TOLERANCES["M"]
        rec["points"] = {}
        problems: list[str] = []
        for batch in COVERAGE_BATCHES:
            step = f"parity at batch {batch}"
            p_args, p_kwargs = call(batch, torch.Generator().manual_seed(batch))
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                actual = compiled(*p_args, **p_kwargs)
                expected = model(*p_args, **p_kwargs)
            report = compare_outputs(actual, expected, rtol=tol.rtol, atol=tol.atol)
            fails = class_failures(report, tol)
            if not report.passed:  # the report's first line only counts outputs: name each one and why
                fails[0] = "; ".join(
                    [report.structure_error] if report.structure_error else
                    [f"output {o.name}: {o.reason}; max abs err {o.max_abs:.3g} at output rms "
                     f"{o.reference_rms:.3g}, cosine 1 - {1.0 - o.cosine:.1e}" for o in report.outputs
                     if not o.passed][:3])
            floats = [t for t in flatten(expected)[0] if t.is_floating_point() and t.dim() and t.shape[0] == batch]
            spread = input_spread(floats[0].float()) if floats and batch > 1 else None
            if spread is not None and spread < 1e-3:
                fails.append(f"the eager output does not depend on the input (relative spread {spread:.1e}), so "
                             "parity cannot be judged")
            rms = float(floats[0].double().pow(2).mean().sqrt()) if floats else None
            rec["points"][str(batch)] = {**worst(report), "passed": not fails, "input_spread": spread,
                                         "output_rms": rms, "shapes": _shapes(p_args, p_kwargs)}
            if not report.passed and not report.structure_error:
                step = f"eager in float64 at batch {batch}"
                own = _eager_fp32_error(model, p_args, p_kwargs, expected, tol)
                rec["points"][str(batch)]["eager_fp32_vs_fp64"] = own
                fails[0] += (f" (eager's own float32 error against float64: max abs {own['max_abs']:.3g}, "
                             f"{own['failing']} elements outside class M)")
            problems += [f"batch {batch}: {f.strip().splitlines()[0][:300]}" for f in fails]
        rec["max_abs"] = max(p["max_abs"] for p in rec["points"].values())
        rec["min_cosine"] = min(p["min_cosine"] for p in rec["points"].values())
        rms_values = [p["output_rms"] for p in rec["points"].values() if p["output_rms"] is not None]
        rec["output_rms"] = min(rms_values) if rms_values else None
        if graphs and len(graphs) > first_graphs:  # dynamo recompiled for the new batch sizes
            rec["graphs_all_calls"] = _graph_split(_graph_states(graphs))
        rec["correct"] = not problems
        rec["failure"] = "; ".join(problems) or None
        if problems:
            rec["failure_step"] = "parity"
    except Exception as e:  # noqa: BLE001 - record and go on
        rec["result"] = "failed"
        rec["failure"] = f"{step}: {type(e).__name__}: {_first_line(e)}"
        rec["failure_step"] = step
    rec["warnings"] = warned[:8]
    return rec


def _eager_fp32_error(model: Any, args: Any, kwargs: Any, expected: Any, tol: Any) -> dict[str, Any]:
    """How far eager float32 itself is from float64, at the elementwise bar of ``tol``: where the compiled
    module misses class M by about as much, the miss is float32 rounding, not a wrong graph."""
    import copy

    import torch

    from torch_trt_module._verify.compare import compare_outputs

    def up(v: Any) -> Any:
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        truth = wide(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
    report = compare_outputs(expected, truth, rtol=tol.rtol, atol=tol.atol)
    return {"max_abs": max((o.max_abs for o in report.outputs), default=0.0),
            "failing": sum(o.num_failed for o in report.outputs), "passed": report.passed}


#: As harness.cases.MIN_INPUT_SPREAD: below this relative spread of the eager outputs over a batch of
#: different inputs, the outputs do not depend on the input and a parity check compares constants.
MIN_INPUT_SPREAD = 1e-3


def condition_timm(model: Any, size: int) -> list[str]:
    """Make a random-weight timm model's output depend on its input, where it does not: the steps taken.

    Some random initialisations give features that float32 cannot tell apart between inputs (the
    torchvision sweep has the same problem: harness.cases.condition_head). Each step runs only while
    the outputs of three random images still agree to ``MIN_INPUT_SPREAD``: (1) BatchNorm running
    statistics measured on random images (at init they are mean 0, variance 1, and deep ReLU stacks
    collapse); (2) LayerScale factors initialised to a tiny constant (CaiT's 1e-5) set to 1; (3) the
    Linear biases zeroed (as the sweep). Runs under no_grad, not inference_mode: a model that caches a
    tensor at its first call must not keep an inference tensor (convit does).
    """
    import torch

    from harness.cases import input_spread

    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))

    def flat() -> bool:
        with torch.no_grad():
            y = model(x)
        return isinstance(y, torch.Tensor) and input_spread(y) < MIN_INPUT_SPREAD

    steps: list[str] = []
    if not flat():
        return steps
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        gen = torch.Generator().manual_seed(11)
        for m in norms:
            m.reset_running_stats()
            m.momentum, m.training = None, True  # a cumulative average over the batches below
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(4, 3, size, size, generator=gen))
        for m in norms:
            m.momentum, m.training = 0.1, False
        steps.append(f"BatchNorm statistics measured on random images ({len(norms)} layers)")
        if not flat():
            return steps
    with torch.no_grad():
        scales = [p for p in model.parameters() if p.dim() == 1 and p.numel() > 1 and bool(p.any())
                  and float(p.abs().max()) < 1e-3 and bool((p == p.flatten()[0]).all())]
        for p in scales:
            p.fill_(1.0)
    if scales:
        steps.append(f"LayerScale factors set to 1 ({len(scales)})")
        if not flat():
            return steps
    with torch.no_grad():
        biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
        for b in biases:
            b.zero_()
    if biases:
        steps.append("Linear biases zeroed")
    return steps


def library_state() -> dict[str, Any]:
    """Which library code a row measured: the commit, and a hash of torch_trt_module/'s sources as they
    are on disk (the working tree may hold changes that are not committed)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "torch_trt_module").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "torch_trt_module"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        head, dirty = None, None
    return {"commit": head, "uncommitted_changes": dirty, "sources_sha256": digest.hexdigest()[:16]}


def _capture_warnings(logger: Any) -> list[str]:
    """The package's WARNING lines of this process (why a model was partitioned, which graph fell back)."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING and not record.name.endswith(".tensorrt"):
                lines.append(record.getMessage().splitlines()[0][:400])

    logger.addHandler(Keep())
    return lines


def _shapes(args: Any, kwargs: Any) -> list[list[int]]:
    import torch

    return [list(t.shape) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(ln.strip() for ln in str(e).strip().splitlines()[:3] if ln.strip())
    return text[:limit] or type(e).__name__
