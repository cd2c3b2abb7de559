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
import os
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

# The rest lives in sibling modules (issue 22: modules of at most ~400 lines). Every name is
# re-exported, so ``zoo_report.<name>`` (tests load this file by path) works as before.
from zoo_common import (COVERAGE_BATCHES, COVERAGE_EXAMPLE_BATCH, COVERAGE_GOAL, COVERAGE_MAX_BATCH,
                        COVERAGE_RESULTS, COVERAGE_TITLES, END, POINTS, RESULTS, RESULTS_MD, START,
                        SUPPORTED_MODELS, _json_default, coverage_environment, environment, load_results,
                        save_results)
from zoo_graphs import _graph_split, _graph_states, _how_it_runs, _module_split, _watch_dynamo_graphs
from zoo_render import (_cell, _cos, _e, _outcome_cell, _pct, _result_cell, _short, coverage_markers,
                        coverage_results_md, coverage_summary, render, render_all_coverage, render_coverage,
                        replace_block, summarize, write_readme, write_results_md)
from zoo_run import (MIN_INPUT_SPREAD, _capture_warnings, _eager_fp32_error, _first_line, _shapes,
                     condition_timm, library_state, run_case, run_coverage, run_must_fail)

__all__ = [
    "COVERAGE_BATCHES", "COVERAGE_EXAMPLE_BATCH", "COVERAGE_GOAL", "COVERAGE_MAX_BATCH", "COVERAGE_RESULTS",
    "COVERAGE_TITLES", "END", "MIN_INPUT_SPREAD", "POINTS", "RESULTS", "RESULTS_MD", "ROOT", "START",
    "SUPPORTED_MODELS", "_capture_warnings", "_cell", "_cos", "_e", "_eager_fp32_error", "_first_line",
    "_graph_split", "_graph_states", "_how_it_runs", "_json_default", "_module_split", "_outcome_cell", "_pct",
    "_result_cell", "_shapes", "_short", "_watch_dynamo_graphs", "child_main", "condition_timm",
    "coverage_environment", "coverage_markers", "coverage_results_md", "coverage_summary", "environment",
    "library_state", "load_results", "main", "render", "render_all_coverage", "render_coverage", "replace_block",
    "run_case", "run_child", "run_coverage", "run_coverage_set", "run_must_fail", "save_results", "summarize",
    "write_readme", "write_results_md",
]


# --------------------------------------------------------------------------- child

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
