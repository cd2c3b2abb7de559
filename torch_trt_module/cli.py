"""The command line: ``python -m torch_trt_module`` or ``torch-trt-module``.

Subcommands: ``build``, ``inspect``, ``verify``, ``bench``, ``cache list|info|clear|prune``
and ``export-triton``. MODEL is an ``.onnx`` file or ``package.module:factory``.

Exit codes: 0 ok; 1 the command ran and failed (verification failed, or an export,
build or run failed); 2 usage error (bad arguments, bad model spec, missing file).
Errors are one line on stderr; ``--verbose`` adds the traceback and debug logs.

Example:
    $ python -m torch_trt_module build torchvision.models:resnet18 -o r18.ttm \\
          --shapes x:1x3x224x224,8x3x224x224,32x3x224x224 --target sm86,sm89
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
import traceback
import warnings
from typing import Any, Iterator, Sequence

__all__ = ["main"]

PROG = "torch-trt-module"
VERBOSE_ENV = "TORCH_TRT_MODULE_VERBOSE"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> _Parser:
    common = _Parser(add_help=False)  # accepted before and after the subcommand
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logs, TensorRT's verbose log, tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
    common.add_argument("--cache-dir", default=argparse.SUPPRESS,
                        help="engine cache (default: $TORCH_TRT_MODULE_CACHE, else ~/.cache/torch_trt_module)")
    model = _Parser(add_help=False)
    model.add_argument("model", metavar="MODEL", help="an .onnx file or package.module:factory")
    model.add_argument("--shapes", action="append", default=[], metavar="NAME:MIN,OPT,MAX",
                       help="trtexec style, e.g. x:1x3x224x224,8x3x224x224,32x3x224x224 (repeat per input)")
    model.add_argument("--dtype", action="append", default=[], metavar="[NAME:]DTYPE",
                       help="input dtype of a factory model (default float32), e.g. int64 or input_ids:int64")
    model.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    model.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt_rtx", "onnxruntime"))
    model.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    model.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
    build = _Parser(add_help=False)
    build.add_argument("--target", help="TensorRT-RTX compute capabilities to build for, e.g. sm86,sm89")
    build.add_argument("--workspace", help="builder workspace limit, e.g. 1G")
    build.add_argument("--opt-level", type=int, choices=range(6), help="builder optimization level 0..5")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], parents=[common])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    c = sub.add_parser("build", parents=[common, model, build], help="build an engine file")
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="engine file to write")
    c.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of the export")
    c.set_defaults(func=cmd_build)
    c = sub.add_parser("inspect", parents=[common], help="show an engine, saved module or ONNX file")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_inspect)
    c = sub.add_parser("verify", parents=[common, model], help="parity report at the profile's min, opt, max")
    c.add_argument("--rtol", type=float)
    c.add_argument("--atol", type=float)
    c.add_argument("--no-cache", action="store_true", help="do not use the engine cache")
    c.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    c.set_defaults(func=cmd_verify)
    c = sub.add_parser("bench", parents=[common, model], help="latency table across backends and batch sizes")
    c.add_argument("--batch-sizes", help="e.g. 1,8,32 (default: the batch sizes of --shapes)")
    c.add_argument("--backends", default="eager,onnxruntime,onnxruntime-cuda,trtmodule",
                   help="comma-separated: eager, torch.compile, onnxruntime, onnxruntime-cuda, trtmodule, "
                        "trtmodule-tensorrt, trtmodule-tensorrt_rtx, trtmodule-onnxruntime")
    c.add_argument("--warmup", type=int, default=3)
    c.add_argument("--iters", type=int, default=30)
    c.add_argument("--max-seconds", type=float, default=10.0, help="time budget per cell (at least 5 calls)")
    c.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    c.set_defaults(func=cmd_bench)
    cache = sub.add_parser("cache", parents=[common], help="engine cache: list, info, clear, prune")
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True, parser_class=_Parser)
    c = csub.add_parser("list", parents=[common], help="entries, least recently used first")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("info", parents=[common], help="one entry in full")
    c.add_argument("key", metavar="KEY_PREFIX")
    c.add_argument("--json", action="store_true")
    csub.add_parser("clear", parents=[common], help="remove every entry")
    c = csub.add_parser("prune", parents=[common], help="evict LRU entries down to a size")
    c.add_argument("--max-size", help="e.g. 500M or 2G (default: the cache's cap)")
    cache.set_defaults(func=cmd_cache)
    c = sub.add_parser("export-triton", parents=[common, model, build],
                       help="write a Triton model repository from an engine file or a model")
    c.add_argument("repo_dir", metavar="REPO_DIR")
    c.add_argument("--name", help="Triton model name (default: from MODEL)")
    c.add_argument("--max-batch-size", type=int)
    c.add_argument("--no-dynamic-batching", action="store_true")
    c.add_argument("--instance-count", type=int, default=1)
    c.set_defaults(func=cmd_export_triton)
    c = sub.add_parser("doctor", parents=[common], help="what runs here, and a smoke test of each backend")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--no-smoke", action="store_true", help="only report; build and run nothing")
    c.set_defaults(func=cmd_doctor)
    return p


def _usage(msg: str) -> Exception:
    from ._cli_models import UsageError

    return UsageError(msg)


# --------------------------------------------------------------------------- build / inspect

def cmd_build(args: argparse.Namespace) -> int:
    from ._cli_models import build, describe, load, mib

    t0 = time.perf_counter()
    source, plan, exported = load(args)
    engine = build(args, source, plan, exported)
    engine.save(args.output)
    print(f"built {args.model} -> {args.output} ({mib(os.path.getsize(args.output))}) in "
          f"{time.perf_counter() - t0:.2f} s")
    print("\n".join(describe(engine.meta, len(engine.plan or b""), len(engine.onnx))))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ._cli_models import describe, io_tables, layer_info, mib, onnx_io, op_summary, read_engine

    path = args.file
    if not os.path.isfile(path):
        raise _usage(f"{path} does not exist")
    if path.lower().endswith(".onnx"):
        with open(path, "rb") as f:
            data = f.read()
        ins, outs = onnx_io(path, data)
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

    from . import compile as ttm_compile
    from ._build import build_engine
    from ._cli_models import device_of, dynamic_of, example_inputs, load
    from ._compare import compare_outputs
    from ._export import check_tolerance
    from ._module import TRTModule
    from ._settings import Settings

    source, plan, exported = load(args)
    device = device_of(args)
    if exported is None:
        assert source.module is not None
        compiled = ttm_compile(source.module, ((), example_inputs(plan)), dynamic=dynamic_of(plan),
                               precision=args.precision or "fp32", backend=args.backend, cache_dir=args.cache_dir,
                               cache=not args.no_cache, verify=False, device=str(device))
        model = source.module.to(device)
    else:
        from .backends import select_backend

        backend = select_backend(args.backend, device).run  # raises if a requested backend cannot run here
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
                eager = model(**kw)
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
    from ._cli_models import (BACKENDS, Timing, device_of, example_inputs, export, load, make_candidates,
                              markdown_table, time_candidates)

    try:
        batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else []
    except ValueError:
        raise _usage(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of ints") from None
    source, plan, exported = load(args, batches)
    if not batches:
        batches = sorted({p[i][0] for _, _, p in plan[:1] for i in range(3) if p[i]})
    names: list[str] = []
    for b in args.backends.split(","):
        names += [n for n in BACKENDS if n.startswith("trtmodule-") and n not in names] if b == "trtmodule" else [b]
    if unknown := [n for n in names if n not in BACKENDS]:
        raise _usage(f"--backends: unknown {unknown}; expected some of {', '.join(BACKENDS)} or trtmodule")
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import doctor

    report = doctor(smoke=not args.no_smoke)
    print(json.dumps(report.to_json(), indent=2, default=str) if args.json else report)
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- cache / export-triton

def cmd_cache(args: argparse.Namespace) -> int:
    from ._cache import EngineCache, parse_size
    from ._cli_models import describe, mib, text_table

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
    elif args.cache_command == "info":
        try:
            e = cache.info(args.key)
        except ValueError as err:
            raise _usage(str(err)) from None
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
            raise _usage(f"--max-size: {err}") from None
        evicted = cache.prune(cap)
        print(f"evicted {len(evicted)} entries from {cache.root}; {mib(cache.total_size())} left (cap {mib(cap)})")
        print("".join(f"  {key}\n" for key in evicted), end="")
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    import importlib

    try:  # written by another part of the project; it may be absent from this installation
        export_triton: Any = getattr(importlib.import_module("torch_trt_module"), "export_triton", None) \
            or importlib.import_module("torch_trt_module._triton").export_triton
    except (ImportError, AttributeError) as e:
        print(f"{PROG} export-triton: error: this installation has no torch_trt_module.export_triton "
              f"(torch_trt_module/_triton.py missing or broken: {e})", file=sys.stderr)
        return 2
    from ._cli_models import build, load, read_engine

    if os.path.isfile(args.model) and not args.model.lower().endswith(".onnx"):
        obj = read_engine(args.model)[0]
    else:
        source, plan, exported = load(args)
        obj = build(args, source, plan, exported)
    name = args.name or os.path.splitext(os.path.basename(args.model.rpartition(":")[2]))[0]
    options: dict[str, Any] = {"dynamic_batching": not args.no_dynamic_batching, "instance_count": args.instance_count}
    if args.max_batch_size is not None:
        options["max_batch_size"] = args.max_batch_size
    export_triton(obj, args.repo_dir, name, **options)
    print(f"wrote Triton model {name!r} ({obj.backend}) to {os.path.join(args.repo_dir, name)}")
    return 0


# --------------------------------------------------------------------------- main

@contextlib.contextmanager
def _logging(verbose: bool, quiet: bool) -> Iterator[None]:
    """Our loggers to stderr for the length of one command; everything is restored afterwards."""
    logger = logging.getLogger("torch_trt_module")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(levelname)s{' %(name)s' if verbose else ''}: %(message)s"))
    saved = (logger.level, logger.propagate, os.environ.get(VERBOSE_ENV))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # TensorRT's VERBOSE messages reach the log
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")  # library deprecation noise is not the user's business
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if saved[2] is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = saved[2]


def _exit_code(e: BaseException) -> int:
    from ._cli_models import UsageError
    from ._errors import InputError
    from ._settings import SettingsError

    return 2 if isinstance(e, (UsageError, SettingsError, InputError, FileNotFoundError)) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    args.verbose = getattr(args, "verbose", False)
    args.cache_dir = getattr(args, "cache_dir", None)
    with _logging(args.verbose, getattr(args, "quiet", False)):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit code
            from ._errors import TorchTRTError

            if args.verbose:
                traceback.print_exc()
            code = _exit_code(e)
            msg = str(e) if isinstance(e, (TorchTRTError, OSError)) else f"{type(e).__name__}: {e}"
            hint = "" if args.verbose or code == 2 else " (run with --verbose for details)"
            print(f"{PROG} {args.command}: error: {msg}{hint}", file=sys.stderr)
            return code
