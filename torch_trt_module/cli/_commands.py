"""The subcommands: build, inspect, verify, bench, doctor, cache, export-triton."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
from typing import Any

from .._build.build import build_engine
from .._cache.cache import EngineCache, parse_size
from .._cache.fleet_stats import COUNTERS, fleet_totals
from .._cache.remote import remote_store
from .._core.numerics import strict_fp32
from .._core.settings import Settings
from .._errors import TritonRepoExists, UsageError
from .._formats.onnx import onnx_io, op_summary
from .._pipeline.compile import compile as ttm_compile
from .._runtime.module import TRTModule
from .._tools.bench import BACKENDS, Timing, make_candidates, markdown_table, time_candidates
from .._tools.doctor import doctor
from .._tools.explain import explain
from .._tools.triton import export_triton
from .._verify.checks import check_tolerance
from .._verify.compare import compare_outputs
from ..backends import select_backend
from . import _inputs
from ._inputs import build, device_of, dynamic_of, example_inputs, export
from ._reports import describe, io_tables, layer_info, mib, read_engine, text_table

__all__ = ["cmd_bench", "cmd_build", "cmd_cache", "cmd_doctor", "cmd_export_triton", "cmd_inspect", "cmd_verify"]


# --------------------------------------------------------------------------- build / inspect

def cmd_build(args: argparse.Namespace) -> int:
    _check_output(args.output)  # before the export and build it would otherwise come after
    t0 = time.perf_counter()
    source, plan, exported = _inputs.load(args)
    engine = build(args, source, plan, exported)
    engine.save(args.output)
    print(f"built {args.model} -> {args.output} ({mib(os.path.getsize(args.output))}) in "
          f"{time.perf_counter() - t0:.2f} s")
    print("\n".join(describe(engine.meta, len(engine.plan or b""), len(engine.onnx))))
    return 0


def _check_output(path: str) -> None:
    """UsageError, naming ``-o``, for an output path that no build could be written to."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"-o {path} is a directory; give a file name, e.g. -o {os.path.join(path, 'model.ttm')}")
    if not os.path.isdir(folder):
        raise UsageError(f"-o {path}: the directory {folder} does not exist. Fix: create it (mkdir -p {folder}) "
                         "or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"-o {path}: the directory {folder} is not writable here. Fix: write elsewhere")


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.file
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; give an engine file, a saved module or an .onnx file")
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist")
    if path.lower().endswith(".onnx"):
        with open(path, "rb") as f:
            data = f.read()
        ins, outs = onnx_io(data, path)
        io = {k: [{"name": n, "dtype": str(d).removeprefix("torch."), "dims": list(s)} for n, d, s in rows]
              for k, rows in (("inputs", ins), ("outputs", outs))}
        info: dict[str, Any] = {"file": path, "kind": "onnx", "size": len(data), "model": io, "ops": op_summary(data)}
        lines, tail = [f"  size       {mib(len(data))}", *io_tables(io)], []
    else:
        engine, kind = read_engine(path)
        layers, note = layer_info(engine)
        info = {"file": path, "kind": kind, "backend": engine.backend, "plan_size": len(engine.plan or b""),
                "onnx_size": len(engine.onnx), "meta": engine.meta, "ops": op_summary(engine.onnx),
                "layers": layers, "layers_note": note}
        lines = describe(engine.meta, info["plan_size"], info["onnx_size"])
        tail = [f"layers       {note or len(layers)}", *("  " + ln for ln in layers)]
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join([f"{path}: {info['kind']}", *lines, f"graph ops    {info['ops']}", *tail]))
    return 0


# --------------------------------------------------------------------------- verify / bench

def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    device = device_of(args)  # first: a GPU this machine lacks is said before any work
    source, plan, exported = _inputs.load(args)
    if exported is None:
        assert source.module is not None
        compiled = ttm_compile(source.module, ((), example_inputs(plan)), dynamic=dynamic_of(plan),
                               precision=args.precision or "fp32", backend=args.backend, cache_dir=args.cache_dir,
                               cache=not args.no_cache, verify=False, device=str(device))
        model = source.module.to(device)
    else:
        choice = select_backend(args.backend, device)  # raises if a requested backend cannot run here
        backend = choice.build if choice.run == choice.build else "onnxruntime"
        compiled = TRTModule(build_engine(exported, backend=backend, device=device, progress=False), device=device)
        model = None
    engine = compiled.engine
    assert engine is not None
    precision = engine.meta["model"]["precision"]
    tolerance = check_tolerance(Settings.from_options(precision=precision, rtol=args.rtol, atol=args.atol))
    rtol, atol = tolerance.rtol, tolerance.atol
    if compiled.backend != engine.backend:
        print(f"note: the {engine.backend} engine cannot run on {device}; the compiled module runs on "
              f"{compiled.backend}, so that is what is compared")
    results: list[dict[str, Any]] = []
    seen = set()
    for which in (0, 1, 2):
        shapes = tuple(p[which] for _, _, p in plan)
        if shapes in seen:
            continue
        seen.add(shapes)
        kw = {k: v.to(device) for k, v in example_inputs(plan, which=which).items()}
        with torch.inference_mode():
            ort = compiled.run_reference(**kw)
            got = compiled(**kw)
            if model is not None:
                with strict_fp32() if device.type == "cuda" else contextlib.nullcontext():
                    eager = model(**kw)  # strict fp32, as ONNX Runtime computes
                reports = [compare_outputs(ort, eager, tolerance=tolerance, what="onnxruntime (CPU)"),
                           compare_outputs(got, eager, tolerance=tolerance, what=f"compiled ({compiled.backend})")]
            else:
                reports = [compare_outputs(got, ort, tolerance=tolerance, what=f"compiled ({compiled.backend})",
                                           reference_name="onnxruntime (CPU)")]
        label = ", ".join(f"{n}={tuple(t.shape)}" for n, t in kw.items())
        print(f"inputs {label}")
        for r in reports:
            print("  " + str(r).replace("\n", "\n  "))
        results.append({"inputs": {n: list(t.shape) for n, t in kw.items()}, "reports": [r.to_json() for r in reports]})
    failed = sum(not r["passed"] for res in results for r in res["reports"])
    total = sum(len(res["reports"]) for res in results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rtol": rtol, "atol": atol, "passed": not failed, "results": results}, f,
                      indent=2)
    print(f"verify: {'FAIL' if failed else 'PASS'} ({total - failed}/{total} comparisons pass, rtol={rtol:g}, "
          f"atol={atol:g})")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else []
    except ValueError:
        raise UsageError(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of ints") from None
    source, plan, exported = _inputs.load(args, batches)
    if not batches:
        batches = sorted({p[i][0] for _, _, p in plan[:1] for i in range(3) if p[i]})
    names: list[str] = []
    for b in args.backends.split(","):
        names += [n for n in BACKENDS if n.startswith("trtmodule-") and n not in names] if b == "trtmodule" else [b]
    if unknown := [n for n in names if n not in BACKENDS]:
        raise UsageError(f"--backends: unknown {unknown}; expected some of {', '.join(BACKENDS)} or trtmodule")
    if exported is None:
        exported = export(source, plan, args)
    device = device_of(args)
    cands = make_candidates(names, model=source.module, exported=exported, device=device)
    rows, json_rows = [], []
    for batch in batches:
        res = time_candidates(cands, example_inputs(plan, batch=batch), warmup=args.warmup, iters=args.iters,
                              max_seconds=args.max_seconds)
        eager = res.get("eager")
        for name, t in res.items():
            if isinstance(t, str):
                rows.append([name, batch, f"failed: {t}", "", "", "", "", ""])
                continue
            ratio = f"{eager.median_ms / t.median_ms:.2f}x" if isinstance(eager, Timing) else "-"
            rows.append([name, batch, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.p99_ms:.3f}",
                         f"{batch * 1e3 / t.median_ms:.1f}", ratio, t.iters])
            json_rows.append({"backend": name, "batch": batch, **t.__dict__})
    print(markdown_table(["backend", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "vs eager", "iters"], rows))
    for c in cands:
        if c.reason:
            print(f"{c.name}: {c.reason}")
            json_rows.append({"backend": c.name, "reason": c.reason})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": json_rows}, f, indent=2)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    source, plan, exported = _inputs.load(args)
    if source.module is None:
        raise UsageError(f"{args.model} is an ONNX file; explain takes a PyTorch model (package.module:factory)")
    ops = [o for o in (args.torch_executed_ops or "").split(",") if o]
    report = explain(source.module, ((), example_inputs(plan)), dynamic=dynamic_of(plan),
                     precision=args.precision or "fp32", min_block_size=args.min_block_size,
                     torch_executed_ops=ops or None)
    print(report)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor(smoke=not args.no_smoke)
    print(json.dumps(report.to_json(), indent=2, default=str) if args.json else report)
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- cache / export-triton

def _as_flags(message: str) -> str:
    """export_triton's fixes (``overwrite=True``, ``version=2``, ``model_name``) as this command's options."""
    message = message.replace("pass overwrite=True", "pass --overwrite")
    message = re.sub(r"\bversion=(\d+)", r"--version \1", message)
    return message.replace("use another model_name", "use another NAME")


def cmd_cache(args: argparse.Namespace) -> int:
    cache = EngineCache(args.cache_dir)
    as_json = lambda e: {"key": e.key, "size": e.size_bytes, "created": e.created,  # noqa: E731
                         "last_used": e.last_used, "meta": e.meta}
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    if args.cache_command == "list":
        entries = cache.entries()
        if args.json:
            print(json.dumps([as_json(e) for e in entries], indent=2, default=str))
            return 0
        rows = []
        for e in entries:
            em = e.meta.get("engine_meta") or {}
            ins = ", ".join(f"{s['name']}:" + "x".join(f"{a}..{b}" if a != b else str(a) for a, b in
                                                      zip(s.get("min") or s["dims"], s.get("max") or s["dims"]))
                            for s in (em.get("model") or {}).get("inputs", []))
            rows.append([e.key[:16], mib(e.size_bytes), when(e.last_used), e.meta.get("backend", "?"),
                         (em.get("model") or {}).get("precision", "?"), ins])
        total = sum(e.size_bytes for e in entries)
        print(f"{cache.root}: {len(entries)} entries, {mib(total)} of {mib(cache.max_size)} "
              "(least recently used first)")
        if rows:
            print(text_table(["key", "size", "last used", "backend", "precision", "inputs"], rows))
    elif args.cache_command == "info" and args.key is None:
        return _cache_counts(cache, as_json=args.json)
    elif args.cache_command == "info":
        try:
            e = cache.info(args.key)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if args.json:
            print(json.dumps(as_json(e), indent=2, default=str))
            return 0
        blobs = e.meta.get("blobs", {})
        print(f"key        {e.key}\nsize       {mib(e.size_bytes)}, last used {when(e.last_used)}")
        print("\n".join(describe(e.meta.get("engine_meta") or {}, blobs.get("engine", {}).get("size", 0),
                                 blobs.get("onnx", {}).get("size", 0))))
        for name, b in blobs.items():
            print(f"  blob       {name}: {mib(b['size'])}, sha256 {b['sha256']}")
    elif args.cache_command == "clear":
        print(f"removed {cache.clear()} entries from {cache.root}")
    else:
        try:
            cap = parse_size(args.max_size) if args.max_size else cache.max_size
        except ValueError as err:
            raise UsageError(f"--max-size: {err}") from None
        evicted = cache.prune(cap)
        print(f"evicted {len(evicted)} entries from {cache.root}; {mib(cache.total_size())} left (cap {mib(cap)})")
        print("".join(f"  {key}\n" for key in evicted), end="")
    return 0


def _cache_counts(cache: Any, *, as_json: bool) -> int:
    """``cache info`` without a key: what every process that used this directory counted, and the remote store."""

    totals = fleet_totals(cache)
    remote = remote_store(True)
    report = {"directory": str(cache.root), "entries": len(cache.entries()), "counts": totals,
              "remote": remote.stats() if remote is not None else None}
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"{cache.root}: {report['entries']} entries")
    for name in COUNTERS:
        value = totals[name]
        print(f"  {name:<20} {value:.1f}" if name.endswith("_s") else f"  {name:<20} {int(value)}")
    if remote is None:
        print("remote store: none ($TORCH_TRT_MODULE_REMOTE_CACHE is not set)")
    else:
        print("remote store: " + ", ".join(f"{k} {v}" for k, v in report["remote"].items() if k != "store"))
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    if args.model_name and args.name and args.model_name != args.name:
        raise UsageError(f"export-triton got two model names, {args.model_name!r} (NAME) and {args.name!r} (--name); "
                         "give one")
    if os.path.isfile(args.model) and not args.model.lower().endswith(".onnx"):
        obj = read_engine(args.model)[0]
    else:
        source, plan, exported = _inputs.load(args)
        obj = build(args, source, plan, exported)
    name = args.model_name or args.name or os.path.splitext(os.path.basename(args.model.rpartition(":")[2]))[0]
    options: dict[str, Any] = {"dynamic_batching": not args.no_dynamic_batching, "instance_count": args.instance_count,
                               "version": args.version, "overwrite": args.overwrite}
    if args.max_batch_size is not None:
        options["max_batch_size"] = args.max_batch_size
    try:
        export_triton(obj, args.repo_dir, name, **options)
    except TritonRepoExists as e:  # its fix names export_triton's options: say the command line's
        raise TritonRepoExists(_as_flags(str(e))) from e
    print(f"wrote Triton model {name!r} ({obj.backend}) to {os.path.join(args.repo_dir, name)}")
    return 0


