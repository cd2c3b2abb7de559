"""Run the conformance zoo and the torchvision classifier sweep; write the README's support table.

Every case (../shared/zoo/cases.md, tabled in tests/zoo/cases.py) and every
classifier runs in its own subprocess with a timeout, so one hang or crash costs
one row, not the run. Results go to ``benchmarks/zoo_results.json`` (rewritten
after each row, so a long run can be resumed with ``--resume``) and to README.md,
between ``<!-- zoo-table:start -->`` and ``<!-- zoo-table:end -->`` (a
"Supported models" section with those markers is appended if missing; no other
README text is touched).

Usage:
    python benchmarks/zoo_report.py                 # zoo + sweep, then README
    python benchmarks/zoo_report.py --only zoo      # or: --only sweep
    python benchmarks/zoo_report.py --models resnet18,vgg11 --no-readme
    python benchmarks/zoo_report.py --readme-only   # re-render the README from the JSON
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

RESULTS = ROOT / "benchmarks" / "zoo_results.json"
README = ROOT / "README.md"
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
POINTS = ("min", "max", "off")


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
            from torch_trt_module._compare import compare_outputs

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


def load_results() -> dict[str, Any]:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {}


def save_results(data: dict[str, Any]) -> None:
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, RESULTS)


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


# --------------------------------------------------------------------------- README

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
        "### Conformance cases",
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
        "### torchvision classifiers",
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


def write_readme(table: str) -> None:
    text = README.read_text(encoding="utf-8") if README.exists() else ""
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text and text.index(START) < text.index(END):
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        new = head + block + tail
    else:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        new = f"{text}{sep}## Supported models\n\n{block}\n"
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, README)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "NAME", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=("zoo", "sweep"), help="run only the zoo or only the sweep")
    ap.add_argument("--models", help="comma-separated classifier names (default: all)")
    ap.add_argument("--cases", help="comma-separated case labels (default: all)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case or model (default 900)")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the JSON, run the rest")
    ap.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    ap.add_argument("--readme-only", action="store_true", help="re-render README.md from the JSON")
    a = ap.parse_args(argv)
    if a.child:
        child_main(*a.child)
        return 0
    data = load_results()
    if a.readme_only:
        write_readme(render(data))
        return 0
    from harness.cases import CASES, classifier_facts, classifier_names

    # Rows not re-run this time (another --only, other --models/--cases, or --resume) are kept.
    data = {"generated": time.strftime("%Y-%m-%d %H:%M %Z"), "environment": environment(),
            "zoo": list(data.get("zoo", [])), "sweep": list(data.get("sweep", []))}
    if a.only != "sweep":
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
    if a.only != "zoo":
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
        write_readme(render(data))
    s = data["summary"]
    print(f"zoo: {s['zoo_pass']}/{s['zoo_cases']} pass; sweep: {s['sweep_pass']}/{s['sweep_attempted']} "
          f"attempted pass ({s['sweep_pass_rate']}), {s['sweep_skipped']} skipped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
