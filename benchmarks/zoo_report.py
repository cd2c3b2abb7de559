"""Run the conformance zoo, the torchvision classifier sweep and the coverage sets; write the
support tables of docs/supported-models.md.

Every case (../shared/zoo/cases.md, tabled in tests/zoo/cases.py), every
classifier and every model of the coverage sets runs in its own subprocess with a
timeout, so one hang or crash costs one row, not the run. Results go to
``benchmarks/zoo_results.json`` (zoo and sweep) and ``benchmarks/zoo_hf_results.json`` /
``benchmarks/zoo_timm_results.json`` (the coverage sets), each rewritten after every
row, so a long run can be resumed with ``--resume``, and to docs/supported-models.md, between
``<!-- zoo-table:start -->`` and ``<!-- zoo-table:end -->`` and, for the coverage
sets, between ``<!-- coverage-hf:start/end -->`` and ``<!-- coverage-timm:start/end -->``
(inserted after the zoo table where missing; no other text of the page is touched). The
``--readme`` names of the options are kept from when the tables were in README.md.

The coverage sets (issue 14, "Measure: Coverage"; the models are in zoo_models.py):
``hf`` (Hugging Face transformers base models, tiny random configs) and ``timm``
(the smallest variant of each timm family, random weights). Each model goes through
``ttm.compile(model, example, max_batch=4)`` (verify=True, partition='auto': the
defaults) and is compared with eager (class M) at batch 1 (the profile's min) and 3.

Usage:
    python benchmarks/zoo_report.py                 # zoo + sweep + hf + timm, then the docs page
    python benchmarks/zoo_report.py --only zoo      # or: --only sweep, --only hf, --only timm
    python benchmarks/zoo_report.py --models resnet18,vgg11 --no-readme
    python benchmarks/zoo_report.py --only timm --models resnet18,vit_tiny_patch16_224
    python benchmarks/zoo_report.py --readme-only   # re-render the docs page (and RESULTS.md's Coverage) from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.zoo.cases holds the case table
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(1, str(ROOT / "benchmarks"))  # zoo_models (the coverage sets), _common

RESULTS = ROOT / "benchmarks" / "zoo_results.json"
COVERAGE_RESULTS = {"hf": ROOT / "benchmarks" / "zoo_hf_results.json",
                    "timm": ROOT / "benchmarks" / "zoo_timm_results.json"}
SUPPORTED_MODELS = ROOT / "docs" / "supported-models.md"  # the tables' page (README.md before issue 22)
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
POINTS = ("min", "max", "off")

#: The coverage sets: the example's batch (exporters specialise 1), the profile's max (compile()'s
#: max_batch; kept small so the checks at the profile's corners stay cheap on 2 cores), and the
#: batches compared with eager: the profile's min and one that is neither it nor the example's.
COVERAGE_EXAMPLE_BATCH = 2
COVERAGE_MAX_BATCH = 4
COVERAGE_BATCHES = (1, 3)
#: Share of the models that must run correctly under partition='auto' (issue 14).
COVERAGE_GOAL = 0.95
COVERAGE_TITLES = {"hf": "Hugging Face transformers", "timm": "timm"}


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


def _watch_dynamo_graphs() -> list[dict[str, Any]]:
    """Every graph torch.compile hands this package's backend in this process: its op count and what the
    backend returned. PartitionedModule counts graphs and fallbacks, but not the ops of each graph or
    which graph got an engine, so the benchmark (not the library) wraps the backend to see them."""
    from torch_trt_module._partition import dynamo as _dynamo  # the graphs: PartitionedModule calls its backend

    seen: list[dict[str, Any]] = []
    original = _dynamo.backend

    def watched(gm: Any, example_inputs: Any, **kw: Any) -> Any:
        fn = original(gm, example_inputs, **kw)
        ops = sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes)
        seen.append({"ops": ops, "fn": fn})
        return fn

    _dynamo.backend = watched
    return seen


def _graph_states(graphs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each graph ran: ``engine`` (a TensorRT-RTX plan), ``split`` (a SegmentedModule: some of its ops
    on engines), ``next runtime`` (its graph without a plan, on ONNX Runtime), ``pytorch`` (the backend's
    fallback) or ``not run``."""
    from torch_trt_module._partition import dynamo as _dynamo  # the graphs: PartitionedModule calls its backend

    out = []
    for g in graphs:
        fn, state = g["fn"], {"ops": g["ops"], "runs_on": "pytorch"}
        if isinstance(fn, _dynamo._Engine):
            if fn.failed:
                pass
            elif fn.module is None:
                state["runs_on"] = "not run"
            else:
                state.update(_module_split(fn.module))
                if state["runs_on"] == "split":  # the graph's FX ops, in the share its segments' ATen ops have
                    state["engine_ops"] = round(g["ops"] * state["engine_share"])
            if fn.warned and state["runs_on"] != "pytorch":
                state["runs_on"] += " (some calls in pytorch)"
        out.append(state)
    return out


def _module_split(module: Any) -> dict[str, Any]:
    """How a compiled module (TRTModule, or a SegmentedModule where the library has one) runs its graph."""
    segments = getattr(module, "segments", None)
    if segments is not None:  # a SegmentedModule: engine parts and PyTorch parts of one graph
        ops = sum(sum(s.ops.values()) for s in segments)
        on = sum(sum(s.ops.values()) for s in segments if s.kind == "engine")
        return {"runs_on": "split", "engines": sum(s.kind == "engine" for s in segments),
                "engine_share": round(on / ops, 4) if ops else 0.0, "segment_ops": ops, "segment_engine_ops": on,
                "pytorch_parts": [f"{sum(s.ops.values())} ops in PyTorch ({', '.join(list(s.ops)[:3])}"
                                  f"{', ...' if len(s.ops) > 3 else ''}): {s.why[:200]}"
                                  for s in segments if s.kind != "engine"][:5]}
    engine = module.engine
    return {"runs_on": "engine" if engine.backend in ("tensorrt", "tensorrt_rtx") else "next runtime"}


def _graph_split(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of a partitioned model's graphs: how many, how many engines, and the share of the graphs'
    ops that are on engines (ops: FX call nodes of dynamo's graphs; a split graph counts the share of
    its ATen ops that its engine parts hold)."""
    total = sum(s["ops"] for s in states)
    engines = engine_ops = 0
    for s in states:
        if s["runs_on"].startswith("engine"):
            engines, engine_ops = engines + 1, engine_ops + s["ops"]
        elif s["runs_on"].startswith("split"):
            engines, engine_ops = engines + s.get("engines", 0), engine_ops + s.get("engine_ops", 0)
    return {"graphs": len(states), "engines": engines,
            "in_pytorch": sum(s["runs_on"].startswith("pytorch") for s in states),
            "next_runtime": sum(s["runs_on"].startswith("next runtime") for s in states),
            "split": sum(s["runs_on"].startswith("split") for s in states),
            "ops": total, "engine_ops": engine_ops,
            "engine_fraction": round(engine_ops / total, 4) if total else None,
            "per_graph": states}


def _how_it_runs(compiled: Any, graphs: list[dict[str, Any]]) -> dict[str, Any]:
    import torch_trt_module as ttm

    if isinstance(compiled, ttm.PartitionedModule):
        split = _graph_split(_graph_states(graphs))
        return {"result": "partitioned", "how": "PartitionedModule", "reason": compiled.reason.splitlines()[0][:400],
                "module_counts": {"graphs": compiled.graphs, "fallbacks": compiled.fallbacks}, **split}
    if getattr(compiled, "segments", None) is not None:  # one graph split into engines and PyTorch
        s = _module_split(compiled)
        return {"result": "partitioned", "how": "SegmentedModule", "graphs": 1, "engines": s["engines"],
                "engine_fraction": s["engine_share"], "ops": s["segment_ops"], "engine_ops": s["segment_engine_ops"],
                "segments": len(compiled.segments), "pytorch_parts": s["pytorch_parts"],
                "reason": "; ".join(s["pytorch_parts"][:2])[:400]}
    engine = compiled.engine
    if engine.backend in ("tensorrt", "tensorrt_rtx"):
        return {"result": "full graph", "how": f"one {engine.backend} engine", "graphs": 1, "engines": 1,
                "engine_fraction": 1.0, "engine_mb": round(len(engine.plan or b"") / 1e6, 2),
                "runs_on": compiled.backend}
    return {"result": "partitioned", "how": "whole graph on the next runtime (no engine)", "graphs": 1,
            "engines": 0, "engine_fraction": 0.0, "runs_on": compiled.backend}


def _shapes(args: Any, kwargs: Any) -> list[list[int]]:
    import torch

    return [list(t.shape) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(ln.strip() for ln in str(e).strip().splitlines()[:3] if ln.strip())
    return text[:limit] or type(e).__name__


def child_main(kind: str, name: str, out_path: str) -> None:
    if kind == "case":
        result: Any = run_case(name)
    elif kind == "model":
        from harness.cases import sweep_one

        result = sweep_one(name)
    elif kind in COVERAGE_RESULTS:
        result = run_coverage(kind, name)
    else:
        result = run_must_fail()
    Path(out_path).write_text(json.dumps(result, default=_json_default))


def _json_default(o: Any) -> Any:
    return str(o)


# --------------------------------------------------------------------------- parent

def run_child(kind: str, name: str, timeout: float) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TORCH_TRT_MODULE_CACHE=str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", kind, name, str(out)], env=env,
                                  cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
        wall = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0 or not out.exists():
            tail = " ".join(proc.stderr.strip().splitlines()[-2:])[-300:]
            return {"error": f"subprocess exited with {proc.returncode}: {tail}", "wall_s": wall}
        result = json.loads(out.read_text())
        if isinstance(result, dict):
            result["wall_s"] = wall
        return result


def environment() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch
    import torchvision

    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
           "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    try:
        import tensorrt_rtx

        env["tensorrt_rtx"] = tensorrt_rtx.__version__
    except ImportError:
        env["tensorrt_rtx"] = None
    return env


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {}


def save_results(data: dict[str, Any], path: Path = RESULTS) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def coverage_environment() -> dict[str, Any]:
    """environment(), plus the model libraries and the CPU of the coverage sets."""
    import transformers

    env = environment()
    env["transformers"] = transformers.__version__
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    from _common import cpu_name

    env["cpu"] = cpu_name()
    return env


def coverage_summary(rows: list[dict[str, Any]], goal: float = COVERAGE_GOAL) -> dict[str, Any]:
    """How many of a coverage set's models run correctly under partition='auto', and how they ran."""
    correct = [r for r in rows if r.get("correct")]
    full = [r for r in correct if r.get("result") == "full graph"]
    part = [r for r in correct if r.get("result") == "partitioned"]
    wrong = [r for r in rows if not r.get("correct") and r.get("result") != "failed"]
    no_engine = [r for r in part if not r.get("engines")]
    rate = len(correct) / len(rows) if rows else None
    families = {r.get("module") or r.get("group") for r in rows}
    return {"models": len(rows), "correct": len(correct), "rate": round(rate, 4) if rate is not None else None,
            "goal": goal, "meets_goal": rate is not None and rate >= goal, "full_graph": len(full),
            "partitioned": len(part), "partitioned_no_engine": len(no_engine), "wrong": len(wrong), "failed": len(rows) - len(correct) - len(wrong),
            "timm_modules": len(families) if any(r.get("module") for r in rows) else None,
            "failures": {r["model"]: r.get("failure") for r in rows if not r.get("correct")}}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    sweep = data.get("sweep", [])
    attempted = [r for r in sweep if r.get("status") != "skipped"]
    passed = [r for r in attempted if r.get("status") == "pass"]
    zoo = data.get("zoo", [])
    return {
        "zoo_cases": len(zoo), "zoo_pass": sum(r.get("status") == "pass" for r in zoo),
        "sweep_models": len(sweep), "sweep_attempted": len(attempted), "sweep_pass": len(passed),
        "sweep_skipped": len(sweep) - len(attempted),
        "sweep_pass_rate": round(len(passed) / len(attempted), 4) if attempted else None,
        "sweep_failures": {r["model"]: r.get("failure") for r in attempted if r.get("status") != "pass"},
    }


# --------------------------------------------------------------------------- docs/supported-models.md

def _e(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1e}" if isinstance(v, float) else str(v)


def _cos(v: Any) -> str:
    return "-" if v is None else f"{v:.6f}"


def _cell(text: Any) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def render(data: dict[str, Any]) -> str:
    env, s = data.get("environment", {}), summarize(data)
    lines = [
        f"Generated by `python benchmarks/zoo_report.py` on {data.get('generated', '?')} "
        f"(torch {env.get('torch')}, torchvision {env.get('torchvision')}, onnxruntime {env.get('onnxruntime')}, "
        f"TensorRT-RTX {env.get('tensorrt_rtx')}, {env.get('cpus')} CPU cores, "
        f"{'a CUDA GPU' if env.get('cuda') else 'no GPU'}). Engines are built with TensorRT-RTX ahead of time; "
        "without a GPU the compiled modules run on ONNX Runtime, so the parity figures are ONNX Runtime's. "
        "Full results: `benchmarks/zoo_results.json`.",
        "",
        "## Conformance cases",
        "",
        "The cases of `shared/zoo/cases.md`, each checked at the profile's min, max and an off-opt shape "
        "against eager with its tolerance class (S: abs 1e-5 or rel 1e-3; M: abs 1e-3 or rel 1e-2 and "
        "cosine > 0.999; E: exact, same dtype; H: cosine > 0.99, same dtype). Errors are the worst over "
        "the three shapes and all outputs.",
        "",
        "| # | case | tol | export | max abs err | min cosine | TensorRT-RTX build | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(data.get("zoo", []), key=lambda r: (r.get("id", 99), r.get("case", ""))):
        pts = r.get("points") or {}
        if pts:
            err = max(p["compiled"]["max_abs"] for p in pts.values())
            cos = min(p["compiled"]["min_cosine"] for p in pts.values())
        else:
            err = cos = None
        rtx = r.get("rtx") or {}
        build = (f"OK, {rtx['engine_mb']} MB, {rtx['build_s']} s" if rtx.get("ok")
                 else (f"failed: {rtx.get('error')}" if rtx else "-"))
        export = f"{r['exporter']}, {r['export_s']} s" if r.get("exporter") else "-"
        if r.get("outcome"):  # must-fail cases
            export, build = "-", "-"
        result = "pass" if r.get("status") == "pass" else f"FAIL: {r.get('failure') or r.get('error')}"
        if r.get("outcome"):
            result = f"{result.split(':')[0]}: {r['outcome']}"
        lines.append(f"| {r.get('id', '')} | {_cell(r.get('case'))} | {r.get('tol', '')} | {export} | {_e(err)} | "
                     f"{_cos(cos)} | {_cell(build)} | {_cell(result)} |")
    rate = f"{s['sweep_pass_rate']:.1%}" if s["sweep_pass_rate"] is not None else "-"
    lines += [
        "",
        "## torchvision classifiers",
        "",
        f"Every model of `torchvision.models.list_models(module=torchvision.models)`, random weights, batch "
        f"profile 1/2/4, input 224x224 or the architecture's documented minimum if larger, parity class M at "
        f"batch 1, 3 and 4. **{s['sweep_pass']} of {s['sweep_attempted']} attempted pass ({rate})**; "
        f"{s['sweep_skipped']} skipped (over the parameter limit). Some random-weight classifiers output "
        "tiny logits (see *output rms*), which makes the absolute bar loose; the cosine bound still applies. "
        "*Input spread* is how much the eager logits of different random images differ, relative to the "
        "largest logit (the smallest over batches 3 and 4): a model whose spread is below 1e-3 fails, because "
        "a graph that ignored its input would match it. To keep every check able to fail, all-zero weight "
        "matrices get random values, and where the random-weight logits still ignore the input the Linear "
        "biases are zeroed (*conditioning*).",
        "",
        "| model | params | input | export | max abs err | min cosine | output rms | input spread | "
        "conditioning | TensorRT-RTX build | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(data.get("sweep", []), key=lambda r: r["model"]):
        par = r.get("parity") or {}
        rtx = r.get("rtx") or {}
        build = (f"OK, {rtx['engine_mb']} MB, {rtx['build_s']} s" if rtx.get("ok")
                 else (f"failed: {rtx.get('error')}" if rtx else "-"))
        export = f"{r['exporter']}, {r.get('export_s')} s" if r.get("exporter") else ("-" if r.get("status") ==
                                                                                        "skipped" else "failed")
        if r.get("status") == "skipped":
            result = f"skipped: {r.get('skip')}"
        elif r.get("status") == "pass":
            result = "pass"
        else:
            result = f"FAIL: {r.get('failure') or r.get('error')}"
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        size = f"{r['input_size']}" if r.get("input_size") else "-"
        spreads = [p["input_spread"] for p in (par.get("points") or {}).values() if p.get("input_spread") is not None]
        cond = (["zero weights randomized"] if r.get("randomized") else []) + (
            ["Linear biases zeroed"] if r.get("zeroed_bias") else [])
        lines.append(f"| {r['model']} | {params} | {size} | {export} | {_e(par.get('max_abs'))} | "
                     f"{_cos(par.get('min_cosine'))} | {_e(par.get('ref_rms'))} | {_e(min(spreads, default=None))} | "
                     f"{', '.join(cond) or '-'} | {_cell(build)} | {_cell(result)} |")
    return "\n".join(lines)


def write_readme(table: str, coverage: dict[str, str] | None = None) -> None:
    """Into docs/supported-models.md: the zoo/sweep block, then each coverage set's block
    (``coverage``: set -> text) after it."""
    text = SUPPORTED_MODELS.read_text(encoding="utf-8") if SUPPORTED_MODELS.exists() else ""
    text = replace_block(text, START, END, table, after=None)
    previous = END
    for kind, body in (coverage or {}).items():
        start, end = coverage_markers(kind)
        text = replace_block(text, start, end, body, after=previous)
        previous = end
    tmp = SUPPORTED_MODELS.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, SUPPORTED_MODELS)


def coverage_markers(kind: str) -> tuple[str, str]:
    return f"<!-- coverage-{kind}:start -->", f"<!-- coverage-{kind}:end -->"


def replace_block(text: str, start: str, end: str, body: str, after: str | None) -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced by ``body``. Missing
    markers are inserted after the line holding ``after`` (another block's end marker) or, without
    it, at the end (under a "# Supported models" title where the page is new)."""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    if after is not None and after in text:
        head, tail = text.split(after, 1)
        return f"{head}{after}\n\n{block}{tail}"
    if not text.strip():
        return f"# Supported models\n\n{block}\n"
    sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{sep}{block}\n"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


def _result_cell(r: dict[str, Any]) -> str:
    if r.get("result") == "full graph":
        return "full graph"
    if r.get("result") == "partitioned" and r.get("how") == "PartitionedModule":
        extra = []
        if r.get("in_pytorch"):
            extra.append(f"{r['in_pytorch']} in PyTorch")
        if r.get("next_runtime"):
            extra.append(f"{r['next_runtime']} on ONNX Runtime without a plan")
        if r.get("split"):
            extra.append(f"{r['split']} split into engines and PyTorch")
        n = r.get("graphs")
        return f"partitioned: {n} graph{'' if n == 1 else 's'}" + (f" ({', '.join(extra)})" if extra else "")
    if r.get("result") == "partitioned" and r.get("how") == "SegmentedModule":
        return f"partitioned: one graph in {r.get('segments')} parts (engines and PyTorch)"
    if r.get("result") == "partitioned":
        return "partitioned: whole graph without an engine (next runtime)"
    return "failed"


def _outcome_cell(r: dict[str, Any]) -> str:
    cond = (["zero weights randomized"] if r.get("randomized") else []) + list(r.get("conditioning") or [])
    note = f"; conditioning: {', '.join(cond)}" if cond else ""
    if not r.get("correct"):
        return f"**FAIL**: {_cell(r.get('failure') or r.get('error'))}{note}"
    if r.get("result") == "partitioned":
        why = r.get("reason") or next((w for w in r.get("warnings", []) if "cannot build" in w), "")
        return f"pass (partitioned because: {_cell(_short(why, 240))}){note}" if why else f"pass{note}"
    return f"pass{note}"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def render_coverage(kind: str, data: dict[str, Any]) -> str:
    """The docs/supported-models.md block of one coverage set."""
    rows, env = data.get("rows", []), data.get("environment", {})
    s = coverage_summary(rows)
    title = COVERAGE_TITLES[kind]
    json_name = COVERAGE_RESULTS[kind].name
    verdict = "met" if s["meets_goal"] else "not met"
    lib = (f"transformers {env.get('transformers')}" if kind == "hf" else f"timm {env.get('timm')}")
    lines = [
        f"## {title}",
        "",
        f"Generated by `python benchmarks/zoo_report.py --only {kind}` on {data.get('generated', '?')} ({lib}, "
        f"torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, TensorRT-RTX {env.get('tensorrt_rtx')}, "
        f"{env.get('cpus')} CPU cores, {'a CUDA GPU' if env.get('cuda') else 'no GPU'}). Full results: "
        f"`benchmarks/{json_name}`; the models and their calls: `benchmarks/zoo_models.py`.",
        "",
    ]
    if kind == "hf":
        lines.append(
            "Base models of `transformers`, one per architecture, with tiny random configurations (hidden size "
            "16-64, 1-2 layers, 1-4 heads, vocabulary 100); text is 16 tokens with a padded attention mask, "
            "decoders and encoder-decoders are called with `use_cache=False`.")
    else:
        lines.append(
            "The smallest variant of each `timm` family, `pretrained=False`, at 96x96 where the model takes "
            "any size and at its fixed input size otherwise (*input*). Where the random-weight outputs do not "
            "depend on the input (the features of different images agree to 1e-3), the model is conditioned "
            "first, step by step until they do, and the outcome says how: BatchNorm statistics measured on "
            "random images, LayerScale factors initialised to a tiny constant set to 1, Linear biases zeroed "
            "(`condition_timm` in `zoo_report.py`). timm is in the `bench` extra: "
            "`pip install -e \".[bench]\" -c constraints.txt`.")
    lines += [
        "",
        f"Each model: `ttm.compile(model, example, max_batch={COVERAGE_MAX_BATCH})` with the defaults "
        "(`verify=True`, `partition='auto'`, `backend='auto'`: TensorRT-RTX builds ahead of time here, "
        "ONNX Runtime runs), example batch "
        f"{COVERAGE_EXAMPLE_BATCH}, then compared with eager at batch "
        f"{' and '.join(map(str, COVERAGE_BATCHES))} (the profile's min and another) with class M (abs 1e-3 or "
        "rel 1e-2 per element, cosine > 0.999 per output), over every output; *output rms* is the first output's "
        "(the smallest over the two batches: where it is tiny the absolute bar is loose, and the cosine bound "
        "decides), and an output that does not depend on the input fails (it could not tell a wrong graph). *Result*: **full graph** (one "
        "engine), **partitioned** (a `PartitionedModule`: dynamo's graphs, each on an engine or in PyTorch; "
        "or the whole graph without an engine on the next runtime) or **failed** (compile() or the first call "
        "raised). A `SegmentedModule` (one graph split into engine parts and PyTorch ops, where the library "
        "has it) counts as partitioned too. *Engines* and *ops on engines* count the graphs of the first call "
        "and their FX ops (a split graph: the share of its ATen ops in engine parts). *Time* is "
        "compile() plus the first call (a `PartitionedModule` builds its engines at its first call).",
        "",
        f"**{s['correct']} of {s['models']} run correctly under `partition='auto'` ({_pct(s['rate'])}; goal "
        f">= {COVERAGE_GOAL:.0%}: {verdict})**: {s['full_graph']} as a full graph, {s['partitioned']} "
        f"partitioned ({s['partitioned_no_engine']} of them with no op on an engine); {s['wrong']} compiled but "
        f"wrong, {s['failed']} failed."
        + (f" {len(rows)} models from {s['timm_modules']} timm modules." if kind == "timm" else ""),
        "",
    ]
    if kind == "hf":
        lines += ["| model | kind | call | result | engines | ops on engines | time | max abs err | output rms | "
                  "outcome |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    else:
        lines += ["| model | family (module) | params | input | result | engines | ops on engines | time | "
                  "max abs err | output rms | outcome |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        secs = [r[k] for k in ("compile_s", "first_call_s") if isinstance(r.get(k), (int, float))]
        time_s = f"{sum(secs):.1f} s" if secs else (f"({r['wall_s']} s)" if r.get("wall_s") else "-")
        engines = "-" if r.get("result") == "failed" else str(r.get("engines", "-"))
        frac = "-" if r.get("result") == "failed" else _pct(r.get("engine_fraction"))
        common = (f"{_result_cell(r)} | {engines} | {frac} | {time_s} | {_e(r.get('max_abs'))} | "
                  f"{_e(r.get('output_rms'))} | {_outcome_cell(r)} |")
        if kind == "hf":
            lines.append(f"| {r['model']} | {r.get('group', '')} | {_cell(r.get('note')) or '-'} | {common}")
        else:
            fam = r.get("group", "")
            fam += f" ({r['module']})" if r.get("module") and r["module"] != fam else ""
            params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
            lines.append(f"| {r['model']} | {_cell(fam)} | {params} | {r.get('input', '-')} | {common}")
    return "\n".join(lines)


def coverage_results_md(blocks: dict[str, dict[str, Any]]) -> str:
    """The body of RESULTS.md's "Coverage" section: the machine, the command, the percentages."""
    lines = ["Issue 14's coverage sets (`benchmarks/zoo_models.py`): each model compiled with `ttm.compile(model, "
             f"example, max_batch={COVERAGE_MAX_BATCH})` and the defaults (`verify=True`, `partition='auto'`), in "
             "its own process, then compared with eager (class M: abs 1e-3 or rel 1e-2, cosine > 0.999) at batch "
             f"{' and '.join(map(str, COVERAGE_BATCHES))}. The tables, with every failure's reason, are in "
             "docs/supported-models.md. Goal: >= 95% run correctly under `partition='auto'`.", ""]
    lines += ["| set | command | measured | models | run correctly | full graph | partitioned | wrong | failed | "
              "goal >= 95% |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    machines = set()
    for kind, data in blocks.items():
        rows, env = data.get("rows", []), data.get("environment", {})
        if not rows:
            continue
        s = coverage_summary(rows)
        lines.append(f"| {COVERAGE_TITLES[kind]} | `nice python benchmarks/zoo_report.py --only {kind}` | "
                     f"{data.get('generated', '?')} | {s['models']} | {s['correct']} ({_pct(s['rate'])}) | "
                     f"{s['full_graph']} | {s['partitioned']} ({s['partitioned_no_engine']} with no op on an engine) | "
                     f"{s['wrong']} | {s['failed']} | "
                     f"{'met' if s['meets_goal'] else 'not met'} |")
        machines.add(f"{env.get('cpus')} cores ({env.get('cpu')}), {'a CUDA GPU' if env.get('cuda') else 'no GPU'}; "
                     f"Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
                     f"timm {env.get('timm')}, onnx {env.get('onnx')}, onnxruntime {env.get('onnxruntime')}, "
                     f"TensorRT-RTX {env.get('tensorrt_rtx')} (builds the engines on the CPU; ONNX Runtime runs "
                     "them: no machine here executes a TensorRT engine)")
    lines += [""] + [f"Machine: {m}. Other jobs shared its 2 cores during the runs, so the compile times "
                     "in the tables are indicative only." for m in sorted(machines)]
    for kind, data in blocks.items():
        states = sorted({(r.get("library") or {}).get("sources_sha256") or "?" for r in data.get("rows", [])})
        commits = sorted({(r.get("library") or {}).get("commit") or "?" for r in data.get("rows", [])})
        dirty = any((r.get("library") or {}).get("uncommitted_changes") for r in data.get("rows", []))
        if data.get("rows"):
            lines.append(f"Library measured by the {COVERAGE_TITLES[kind]} set: sources sha256 "
                         f"{', '.join(states)} (commit {', '.join(commits)}"
                         f"{'; some rows with uncommitted changes' if dirty else ''}).")
    for kind, data in blocks.items():
        failures = coverage_summary(data.get("rows", []))["failures"]
        if failures:
            lines += ["", f"Not correct in the {COVERAGE_TITLES[kind]} set:"]
            lines += [f"- {name}: {_cell(why)}" for name, why in failures.items()]
    return "\n".join(lines)


def write_results_md(blocks: dict[str, dict[str, Any]]) -> None:
    if not any(d.get("rows") for d in blocks.values()):
        return
    from _common import write_section

    write_section("Coverage", None, coverage_results_md(blocks), RESULTS_MD)


def render_all_coverage() -> dict[str, str]:
    out = {}
    for kind, path in COVERAGE_RESULTS.items():
        data = load_results(path)
        if data.get("rows"):
            out[kind] = render_coverage(kind, data)
    return out


# --------------------------------------------------------------------------- main

def run_coverage_set(kind: str, a: argparse.Namespace) -> None:
    """Run one coverage set (each model in a child process) into its JSON file, row by row."""
    import zoo_models

    specs = zoo_models.SETS[kind]
    wanted = [s.name for s in specs if not a.models or s.name in a.models.split(",")]
    if not wanted:
        return
    path = COVERAGE_RESULTS[kind]
    previous = load_results(path)
    old = {r["model"]: r for r in previous.get("rows", [])}
    now, command = time.strftime("%Y-%m-%d %H:%M %Z"), " ".join(["python", "benchmarks/zoo_report.py", *sys.argv[1:]])
    data = {"generated": now, "environment": coverage_environment(), "command": command, "rows": []}
    if (a.models or a.resume) and previous.get("generated"):  # some rows again: the set keeps its run's date
        data.update(generated=previous["generated"], command=previous.get("command", command),
                    reruns=[*previous.get("reruns", []), {"when": now, "command": command, "models": wanted}])

    def save() -> None:
        order = {s.name: i for i, s in enumerate(specs)}
        rows = sorted(old.values(), key=lambda r: order.get(r["model"], len(order)))
        data["rows"] = rows
        data["summary"] = coverage_summary(rows)
        save_results(data, path)

    for name in wanted:
        if a.resume and name in old:
            continue
        rec = run_child(kind, name, a.timeout)
        if "error" in rec:  # the child died or timed out
            spec = zoo_models.spec(kind, name)
            rec.update(model=name, group=spec.group, note=spec.note, result="failed", correct=False,
                       failure=rec["error"])
        old[name] = rec
        print(f"{kind} {name}: {rec.get('result')}, {'correct' if rec.get('correct') else 'NOT correct'} "
              f"({rec.get('wall_s')} s) {rec.get('failure') or ''}", flush=True)
        save()
    if a.models is None:  # a full run: rows of models no longer in the set go
        names = {s.name for s in specs}
        old = {k: v for k, v in old.items() if k in names}
    save()
    s = data["summary"]
    print(f"{kind}: {s['correct']} of {s['models']} run correctly under partition='auto' ({s['rate']}); "
          f"{s['full_graph']} full graph, {s['partitioned']} partitioned, {s['wrong']} wrong, {s['failed']} failed",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "NAME", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=("zoo", "sweep", "hf", "timm"),
                    help="run only the zoo, the torchvision sweep, or one coverage set (hf, timm)")
    ap.add_argument("--models", help="comma-separated classifier or coverage-set model names (default: all)")
    ap.add_argument("--cases", help="comma-separated case labels (default: all)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case or model (default 900)")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the JSON, run the rest")
    ap.add_argument("--no-readme", "--no-docs", dest="no_readme", action="store_true",
                    help="do not touch docs/supported-models.md")
    ap.add_argument("--readme-only", "--docs-only", dest="readme_only", action="store_true",
                    help="re-render docs/supported-models.md (and RESULTS.md's Coverage section) from the JSON files")
    a = ap.parse_args(argv)
    if a.child:
        child_main(*a.child)
        return 0
    data = load_results()
    if a.readme_only:
        write_readme(render(data), render_all_coverage())
        write_results_md({k: load_results(p) for k, p in COVERAGE_RESULTS.items()})
        return 0
    for kind in COVERAGE_RESULTS:
        if a.only in (None, kind):
            run_coverage_set(kind, a)
    if a.only in ("hf", "timm"):  # the zoo's JSON is not rewritten: its date stays the zoo's own
        if not a.no_readme:
            write_readme(render(data), render_all_coverage())
            write_results_md({k: load_results(p) for k, p in COVERAGE_RESULTS.items()})
        return 0
    from harness.cases import CASES, classifier_facts, classifier_names

    # Rows not re-run this time (another --only, other --models/--cases, or --resume) are kept.
    data = {"generated": time.strftime("%Y-%m-%d %H:%M %Z"), "environment": environment(),
            "zoo": list(data.get("zoo", [])), "sweep": list(data.get("sweep", []))}
    if a.only in (None, "zoo"):
        labels = a.cases.split(",") if a.cases else [c.label for c in CASES] + ["must_fail"]
        if not a.resume:
            data["zoo"] = [r for r in data["zoo"] if a.cases and r["case"] not in labels]
        done = {r["case"] for r in data["zoo"]}
        for label in labels:
            if label == "must_fail":
                if {"18-masked_select", "19-data_dependent_branch"} <= done:
                    continue
                data["zoo"] = [r for r in data["zoo"] if r.get("id") not in (18, 19)]
                recs = run_child("must_fail", "-", a.timeout)
                if isinstance(recs, dict):  # the child itself failed
                    recs = [{"case": "18/19", "status": "fail", "failure": recs.get("error")}]
                data["zoo"] += recs
                for r in recs:
                    print(f"zoo {r['case']}: {r['status']} {r.get('outcome') or r.get('failure') or ''}", flush=True)
            elif label not in done:
                rec = run_child("case", label, a.timeout)
                if "error" in rec:
                    rec.update(case=label, status="fail", failure=rec["error"])
                data["zoo"].append(rec)
                print(f"zoo {label}: {rec['status']} ({rec.get('wall_s')} s) {rec.get('failure') or ''}",
                      flush=True)
            save_results(data)
    if a.only in (None, "sweep"):
        names = a.models.split(",") if a.models else classifier_names()
        if not a.resume:
            data["sweep"] = [r for r in data["sweep"] if a.models and r["model"] not in names]
        done = {r["model"] for r in data["sweep"]}
        for name in names:
            if name in done:
                continue
            facts = classifier_facts(name)
            if facts["skip"]:
                rec = {"model": name, **facts, "status": "skipped"}
            else:
                rec = run_child("model", name, a.timeout)
                if "error" in rec:
                    rec.update(model=name, **facts, status="fail", failure=rec["error"])
            data["sweep"].append(rec)
            print(f"sweep {name}: {rec['status']} ({rec.get('wall_s', 0)} s) {rec.get('failure') or ''}", flush=True)
            save_results(data)
    data["summary"] = summarize(data)
    save_results(data)
    if not a.no_readme:
        write_readme(render(data), render_all_coverage())
        write_results_md({k: load_results(p) for k, p in COVERAGE_RESULTS.items()})
    s = data["summary"]
    print(f"zoo: {s['zoo_pass']}/{s['zoo_cases']} pass; sweep: {s['sweep_pass']}/{s['sweep_attempted']} "
          f"attempted pass ({s['sweep_pass_rate']}), {s['sweep_skipped']} skipped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
