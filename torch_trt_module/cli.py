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
    common = argparse.ArgumentParser(add_help=False)  # accepted before and after the subcommand
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logs, TensorRT's verbose log, tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
    common.add_argument("--cache-dir", default=argparse.SUPPRESS,
                        help="engine cache (default: $TORCH_TRT_MODULE_CACHE, else ~/.cache/torch_trt_module)")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("model", metavar="MODEL", help="an .onnx file or package.module:factory")
    model.add_argument("--shapes", action="append", default=[], metavar="NAME:MIN,OPT,MAX",
                       help="trtexec style, e.g. x:1x3x224x224,8x3x224x224,32x3x224x224 (repeat per input)")
    model.add_argument("--dtype", action="append", default=[], metavar="[NAME:]DTYPE",
                       help="input dtype of a factory model (default float32), e.g. int64 or input_ids:int64")
    model.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    model.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt_rtx", "onnxruntime"))
    model.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    model.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
    build = argparse.ArgumentParser(add_help=False)
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
    return p


# --------------------------------------------------------------------------- shared steps

def _device(args: argparse.Namespace) -> Any:
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load(args: argparse.Namespace, batches: Sequence[int] = ()) -> tuple[Any, list[Any], Any]:
    """(source, input plan, exported model or None): a factory is exported later, by compile()."""
    import torch

    from ._cli_models import input_plan, load_model, parse_dtypes, parse_shapes, with_batch

    torch.manual_seed(args.seed)
    source = load_model(args.model)
    shapes = parse_shapes(args.shapes)
    plan = input_plan(source, shapes, parse_dtypes(args.dtype))
    plan = [(n, dt, with_batch(p, batches)) for n, dt, p in plan]
    exported = None
    if source.onnx_path is not None:
        from ._cli_models import exported_from_onnx

        exported = exported_from_onnx(source.onnx_path, {n: p for n, _, p in plan})
        if args.precision not in (None, exported.precision):
            raise _usage(f"{args.model} is a {exported.precision} graph; its precision comes from its dtypes, "
                         f"so --precision {args.precision} cannot apply (export it in that precision)")
    return source, plan, exported


def _usage(msg: str) -> Exception:
    from ._cli_models import UsageError

    return UsageError(msg)


def _export(source: Any, plan: list[Any], args: argparse.Namespace, verify: bool = True) -> Any:
    from ._cli_models import dynamic_of, example_inputs
    from ._export import export_onnx

    return export_onnx(source.module, ((), example_inputs(plan)), dynamic=dynamic_of(plan),
                       precision=args.precision or "fp32", verify=verify)


def _build(args: argparse.Namespace, source: Any, plan: list[Any], exported: Any) -> Any:
    from ._build import build_engine
    from ._cache import parse_size

    backend, targets = args.backend, args.target
    if targets and backend == "auto":
        backend = "tensorrt_rtx"  # targets only mean something to RTX's ahead-of-time build
    if targets and backend != "tensorrt_rtx":
        raise _usage(f"--target needs --backend tensorrt_rtx; {backend} builds for the GPU it runs on")
    try:
        workspace = parse_size(args.workspace) if args.workspace else None
    except ValueError as e:
        raise _usage(f"--workspace: {e}") from None
    if exported is None:
        exported = _export(source, plan, args, verify=not getattr(args, "no_verify", False))
    return build_engine(exported, backend=backend, targets=targets.split(",") if targets else None,
                        device=_device(args), workspace=workspace, optimization_level=args.opt_level,
                        progress=False if args.no_progress else None)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n / 1024:.1f} KiB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _io_rows(specs: Sequence[dict[str, Any]]) -> list[list[Any]]:
    shape = lambda v: "-" if v is None else tuple(v)  # noqa: E731
    return [[s["name"], s["dtype"], tuple(s["dims"]), shape(s.get("min")), shape(s.get("opt")), shape(s.get("max"))]
            for s in specs]


def _where(meta: dict[str, Any]) -> str:
    if meta.get("targets"):
        return "targets " + ", ".join(meta["targets"])
    if meta.get("gpu"):
        return f"GPU {meta['gpu']['name']} (sm {meta['gpu']['compute_capability']})"
    return "RTX's default targets" if meta.get("backend") == "tensorrt_rtx" else "ONNX Runtime (any machine)"


# --------------------------------------------------------------------------- build / inspect

def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    source, plan, exported = _load(args)
    engine = _build(args, source, plan, exported)
    engine.save(args.output)
    m = engine.meta
    print(f"built {args.model} -> {args.output}")
    print(f"  backend    {engine.backend} {m.get('backend_version', '')} for {_where(m)}")
    print(f"  precision  {m['model']['precision']}, exporter {m['model']['exporter']}")
    print(_table(["input", "dtype", "dims", "min", "opt", "max"], _io_rows(m["model"]["inputs"]), "    "))
    print(f"  time       export {m.get('export_time_s', 0):.2f} s, build {m.get('build_time_s', 0):.2f} s, "
          f"total {time.perf_counter() - t0:.2f} s")
    print(f"  size       engine {_mib(len(engine.plan or b''))} + ONNX graph {_mib(len(engine.onnx))} = file "
          f"{_mib(os.path.getsize(args.output))}")
    return 0


def _read_engine(path: str) -> Any:
    from ._build import Engine
    from ._errors import EngineLoadError

    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"TTMENG01":
        return Engine.load(path), "engine file"
    import torch

    from ._module import _from_u8

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unreadable is answered below
        state = None
    for key, value in (state.items() if isinstance(state, dict) else ()):
        if key.endswith("_extra_state") and isinstance(value, dict) and "plan" in value:
            plan = _from_u8(value["plan"])
            return Engine(value["backend"], plan or None, _from_u8(value["onnx"]), json.loads(value["meta"])), \
                "saved TRTModule"
    raise EngineLoadError(f"{path} is not an engine file, a saved TRTModule or an .onnx file")


def _layers(engine: Any) -> tuple[list[str], str | None]:
    """TensorRT's per-layer information, or why there is none (it needs a deserialized engine)."""
    from ._errors import TorchTRTError
    from ._module import _can_run
    from .backends import select_backend

    if engine.plan is None:
        return [], "none: ONNX Runtime runs the graph ops above"
    if not _can_run(engine, "cuda"):
        try:
            select_backend(engine.backend, "cuda")
            why = "the engine was built for another GPU"
        except TorchTRTError as e:
            why = str(e).split(". ")[0]
        return [], f"layer information needs a GPU runtime ({why})"
    from .backends._tensorrt import deserialize, import_tensorrt

    trt = import_tensorrt(engine.backend)[1]
    inspector = deserialize(engine.plan, backend=engine.backend).create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.ONELINE)
    return [ln for ln in str(info).splitlines() if ln.strip()], None


def _ops(onnx_bytes: bytes) -> str:
    import collections

    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    count = collections.Counter(n.op_type for n in graph.node)
    return f"{len(graph.node)} nodes: " + ", ".join(f"{op} {n}" for op, n in count.most_common())


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.file
    if not os.path.isfile(path):
        raise _usage(f"{path} does not exist")
    if path.lower().endswith(".onnx"):
        from ._cli_models import onnx_io

        with open(path, "rb") as f:
            data = f.read()
        ins, outs = onnx_io(path, data)
        io = lambda rows: [{"name": n, "dtype": str(d).removeprefix("torch."), "dims": list(s)}  # noqa: E731
                           for n, d, s in rows]
        info = {"file": path, "kind": "onnx", "size": len(data), "inputs": io(ins), "outputs": io(outs),
                "ops": _ops(data)}
    else:
        engine, kind = _read_engine(path)
        m = engine.meta
        layers, why = _layers(engine)
        info = {"file": path, "kind": kind, "backend": engine.backend, "backend_version": m.get("backend_version"),
                "built_for": _where(m), "precision": m["model"]["precision"], "exporter": m["model"]["exporter"],
                "plan_size": len(engine.plan or b""), "onnx_size": len(engine.onnx),
                "inputs": m["model"]["inputs"], "outputs": m["model"]["outputs"], "ops": _ops(engine.onnx),
                "layers": layers, "layers_note": why,
                "metadata": {k: v for k, v in m.items() if k not in ("model", "backend", "backend_version")}}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{path}: {info['kind']}")
    if info["kind"] == "onnx":
        print(f"  size       {_mib(info['size'])}")
    else:
        print(f"  backend    {info['backend']} {info['backend_version']} for {info['built_for']}")
        print(f"  precision  {info['precision']}, exporter {info['exporter']}")
        print(f"  size       engine {_mib(info['plan_size'])}, ONNX graph {_mib(info['onnx_size'])}")
        for k, v in info["metadata"].items():
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v)) if k == "created" else v
            print(f"  {k:<10} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    print("inputs\n" + _table(["name", "dtype", "dims", "min", "opt", "max"], _io_rows(info["inputs"])))
    print("outputs\n" + _table(["name", "dtype", "dims"], [r[:3] for r in _io_rows(info["outputs"])]))
    print(f"graph ops    {info['ops']}")
    if info["kind"] != "onnx":
        print(f"layers       {info['layers_note'] or len(info['layers'])}")
        for line in info["layers"]:
            print("  " + line)
    return 0


# --------------------------------------------------------------------------- verify / bench

def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from . import compile as ttm_compile
    from ._build import build_engine
    from ._cli_models import dynamic_of, example_inputs
    from ._compare import compare_outputs
    from ._export import default_tolerances
    from ._module import TRTModule
    from ._settings import Settings

    source, plan, exported = _load(args)
    device = _device(args)
    if exported is None:
        compiled = ttm_compile(source.module, ((), example_inputs(plan)), dynamic=dynamic_of(plan),
                               precision=args.precision or "fp32", backend=args.backend, cache_dir=args.cache_dir,
                               cache=not args.no_cache, verify=False, device=str(device))
        model = source.module.to(device)
    else:
        from .backends import select_backend

        backend = select_backend(args.backend, device, to_run=False).run
        compiled = TRTModule(build_engine(exported, backend=backend, device=device, progress=False), device=device)
        model = None
    precision = compiled.engine.meta["model"]["precision"]
    rtol, atol = default_tolerances(Settings.from_options(precision=precision, rtol=args.rtol, atol=args.atol))
    if compiled.backend != compiled.engine.backend:
        print(f"note: the {compiled.engine.backend} engine cannot run on {device}; the compiled module runs on "
              f"{compiled.backend}, so that is what is compared")
    results, seen = [], set()
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
                reports = [compare_outputs(ort, eager, rtol=rtol, atol=atol, what="onnxruntime (CPU)"),
                           compare_outputs(got, eager, rtol=rtol, atol=atol, what=f"compiled ({compiled.backend})")]
            else:
                reports = [compare_outputs(got, ort, rtol=rtol, atol=atol, what=f"compiled ({compiled.backend})",
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
    import torch

    from ._cli_models import BACKENDS, example_inputs, make_candidates, markdown_table, measure

    try:
        batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else []
    except ValueError:
        raise _usage(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of ints") from None
    source, plan, exported = _load(args, batches)
    if not batches:
        batches = sorted({p[i][0] for _, _, p in plan[:1] for i in range(3) if p[i]})
    names: list[str] = []
    for b in args.backends.split(","):
        names += [n for n in BACKENDS if n.startswith("trtmodule-")] if b == "trtmodule" else [b]
    if unknown := [n for n in names if n not in BACKENDS]:
        raise _usage(f"--backends: unknown {unknown}; expected some of {', '.join(BACKENDS)} or trtmodule")
    if exported is None:
        exported = _export(source, plan, args)
    device = _device(args)
    cands = make_candidates(names, model=source.module, exported=exported, device=device)
    rows, json_rows, eager_ms = [], [], {}
    for batch in batches:
        inputs = example_inputs(plan, batch=batch)
        for c in [c for c in cands if c.call is not None]:
            kw = {k: v.to(c.device) for k, v in inputs.items()}
            try:
                with torch.inference_mode():
                    t = measure(lambda: c.call(kw), warmup=args.warmup, iters=args.iters, max_seconds=args.max_seconds,
                                cuda=c.device if c.device.type == "cuda" else None)
            except Exception as e:  # noqa: BLE001 - a backend failing at one size keeps the table
                rows.append([c.name, batch, f"failed: {type(e).__name__}: {e}".splitlines()[0], "", "", "", "", ""])
                continue
            eager_ms.setdefault(batch, t.median_ms if c.name == "eager" else None)
            ratio = f"{eager_ms[batch] / t.median_ms:.2f}x" if eager_ms.get(batch) else "-"
            rows.append([c.name, batch, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.p99_ms:.3f}",
                         f"{batch * 1e3 / t.median_ms:.1f}", ratio, t.iters])
            json_rows.append({"backend": c.name, "batch": batch, "device": str(c.device), **t.__dict__})
    print(markdown_table(["backend", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "vs eager", "iters"], rows))
    for c in cands:
        if c.reason:
            print(f"{c.name}: {c.reason}")
            json_rows.append({"backend": c.name, "reason": c.reason})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": json_rows}, f, indent=2)
    return 0


# --------------------------------------------------------------------------- cache / export-triton

def _entry_row(e: Any) -> list[Any]:
    em = e.meta.get("engine_meta") or {}
    model = em.get("model") or {}
    ins = ", ".join(f"{s['name']} {s['dtype']} " + "x".join(
        f"{a}..{b}" if a != b else str(a) for a, b in zip(s.get("min") or s["dims"], s.get("max") or s["dims"]))
        for s in model.get("inputs", []))
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
    return [e.key[:16], _mib(e.size_bytes), used, f"{e.meta.get('backend', '?')} {em.get('backend_version', '')}",
            model.get("precision", "?"), ins]


def cmd_cache(args: argparse.Namespace) -> int:
    from ._cache import EngineCache, parse_size

    cache = EngineCache(args.cache_dir)
    if args.cache_command == "list":
        entries = cache.entries()
        if args.json:
            print(json.dumps([{"key": e.key, "size": e.size_bytes, "created": e.created, "last_used": e.last_used,
                               "meta": e.meta} for e in entries], indent=2, default=str))
            return 0
        total = sum(e.size_bytes for e in entries)
        print(f"{cache.root}: {len(entries)} entries, {_mib(total)} of {_mib(cache.max_size)} (LRU first)")
        if entries:
            print(_table(["key", "size", "last used", "backend", "precision", "inputs"], [_entry_row(e) for e in entries]))
    elif args.cache_command == "info":
        try:
            e = cache.info(args.key)
        except ValueError as err:
            raise _usage(str(err)) from None
        if args.json:
            print(json.dumps({"key": e.key, "size": e.size_bytes, "created": e.created, "last_used": e.last_used,
                              "meta": e.meta}, indent=2, default=str))
            return 0
        em = e.meta.get("engine_meta") or {}
        row = _entry_row(e)
        print(f"key        {e.key}\nsize       {row[1]}\nlast used  {row[2]}\nbackend    {row[3]} for {_where(em)}")
        print(f"created    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.created))}\nprecision  {row[4]}")
        model = em.get("model") or {}
        print("inputs\n" + _table(["name", "dtype", "dims", "min", "opt", "max"], _io_rows(model.get("inputs", []))))
        print("outputs\n" + _table(["name", "dtype", "dims"], [r[:3] for r in _io_rows(model.get("outputs", []))]))
        print(f"settings   {json.dumps(em.get('settings', {}))}")
        for name, b in e.meta.get("blobs", {}).items():
            print(f"blob       {name}: {_mib(b['size'])}, sha256 {b['sha256'][:16]}...")
    elif args.cache_command == "clear":
        print(f"removed {cache.clear()} entries from {cache.root}")
    else:
        try:
            cap = parse_size(args.max_size) if args.max_size else cache.max_size
        except ValueError as err:
            raise _usage(f"--max-size: {err}") from None
        evicted = cache.prune(cap)
        print(f"evicted {len(evicted)} entries from {cache.root}; {_mib(cache.total_size())} left (cap {_mib(cap)})")
        for key in evicted:
            print(f"  {key[:16]}")
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    try:
        import torch_trt_module as ttm

        export_triton = getattr(ttm, "export_triton", None)
        if export_triton is None:
            from ._triton import export_triton  # type: ignore[no-redef]
    except ImportError as e:
        print(f"{PROG} export-triton: error: this installation has no torch_trt_module.export_triton "
              f"(torch_trt_module/_triton.py missing or broken: {e})", file=sys.stderr)
        return 2
    if os.path.isfile(args.model) and not args.model.lower().endswith(".onnx"):
        obj = _read_engine(args.model)[0]
    else:
        source, plan, exported = _load(args)
        obj = _build(args, source, plan, exported)
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
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"))
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
        except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit code
            from ._errors import TorchTRTError

            if args.verbose:
                traceback.print_exc()
            code = _exit_code(e)
            msg = str(e) if isinstance(e, (TorchTRTError, OSError)) else f"{type(e).__name__}: {e}"
            hint = "" if args.verbose or code == 2 else " (run with --verbose for details)"
            print(f"{PROG} {args.command}: error: {msg}{hint}", file=sys.stderr)
            return code
