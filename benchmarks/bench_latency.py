"""Latency of every backend that can run on this machine, side by side in one run.

Backends: eager, torch.compile (inductor, one graph per batch size), ONNX Runtime
(CPU; CUDA provider where installed; IOBinding over torch memory, outputs allocated
by ORT), and TRTModule on TensorRT, TensorRT-RTX and ONNX Runtime. A backend that
cannot run here gets a row that says why. Models: resnet18, mobilenet_v3_small and
the BERT of ../shared/zoo/cases.md #6 (sequence length 128); batch sizes 1, 8, 32.

Method: one graph per model, exported once with batch 1..32 (opt 8). Per cell: the
first call is timed alone (torch.compile compiles there), then warm-up calls, then
timed calls (CUDA events on a GPU, perf_counter on the CPU), stopping early once
``--max-seconds`` have passed and at least 5 calls are done. Median, p90, p99,
throughput = batch / median. Default call counts (warm-up / timed): batch 1: 10/100,
batch 8: 5/30, batch 32: 3/10; ``--iters`` and ``--warmup`` override them.

Threads: by default each runtime uses its own default (torch: all cores; ONNX Runtime:
the physical cores). ``--threads N`` pins torch and every ONNX Runtime session to N
threads: on a shared machine whose other jobs take cores, multi-threaded kernels stall
at every barrier, and one thread per runtime keeps the comparison fair.

Writes results/latency-<machine>.json, .md and .png (the plot needs matplotlib) and,
with ``--results``, its subsection of the "## Latency" section of RESULTS.md.
``--render`` re-renders (and merges) JSON files from earlier runs without measuring.

    python benchmarks/bench_latency.py --results                      # the full run
    python benchmarks/bench_latency.py --threads 1 --results          # on a busy machine
    python benchmarks/bench_latency.py --models resnet18 --batch-sizes 1 --iters 10   # a quick look

Runs without TensorRT and without torch_trt_module's optional dependencies: what is
missing shows up as a "not runnable on this machine" row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from _common import (OUT_DIR, RESULTS_MD, command_line, machine, machine_label, machine_line, section_intro,
                     write_section)

import torch

SCHEDULE = {1: (10, 100), 8: (5, 30), 32: (3, 10)}  # batch: (warm-up, timed calls)
DEFAULT_BACKENDS = ("eager", "torch.compile", "onnxruntime", "onnxruntime-cuda", "trtmodule-tensorrt",
                    "trtmodule-tensorrt_rtx", "trtmodule-onnxruntime")
SEQ = 128


def _resnet18() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


def _mobilenet() -> torch.nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(weights=None)


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128))


def _image(batch: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, 3, 224, 224)}


def _tokens(batch: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, SEQ, dtype=torch.int64)
    mask[:, SEQ * 3 // 4:] = 0  # tail padding, as in cases.md
    return {"input_ids": torch.randint(0, 1000, (batch, SEQ)), "attention_mask": mask,
            "token_type_ids": torch.zeros(batch, SEQ, dtype=torch.int64)}


def _resnet50() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def _vit() -> torch.nn.Module:
    import torchvision

    return torchvision.models.vit_b_16(weights=None)


def _bert_base() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig())  # BERT-base: 12 layers, hidden 768, 12 heads


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], dict[str, torch.Tensor]]]] = {
    "resnet18": (_resnet18, _image),
    "mobilenet_v3_small": (_mobilenet, _image),
    "bert": (_bert, _tokens),
    "resnet50": (_resnet50, _image),
    "vit_b_16": (_vit, _image),
    "bert-base": (_bert_base, _tokens),
}

#: The GPU comparison of issue 21: compile() as a user calls it beside eager and torch.compile, each
#: from the model (not from an exported graph). ``-fp16``: autocast for eager and torch.compile,
#: ``precision="fp16"`` (with ``cast_inputs=True``: fp32 inputs, as autocast takes) for compile().
GPU_BACKENDS = ("eager", "eager-fp16", "torch.compile", "torch.compile-fp16", "torch.compile-reduce-overhead",
                "trtmodule", "trtmodule-fp16", "trtmodule+cudagraphs")


def _user_candidates(names: list[str], model: torch.nn.Module, example: dict[str, torch.Tensor], hi: int,
                     device: torch.device) -> list[Any]:
    """Candidates for the names of :data:`GPU_BACKENDS`, each made as a user would."""
    import contextlib

    import torch_trt_module as ttm
    from torch_trt_module._tools.bench import Candidate

    m = model.to(device)
    out = []
    for name in names:
        # "trtmodule-fp16@passes" (optimize=) or "trtmodule@cuda_graphs=False": a compile() option beside
        # the defaults, for comparison
        base, _, option = name.partition("@")
        key, _, value = option.rpartition("=")
        extra: dict[str, Any] = {key or "optimize": {"True": True, "False": False}.get(value, value)} if option else {}
        if base.endswith("cudagraphs"):
            extra.setdefault("cuda_graphs", True)  # the other rows take compile()'s default
        fp16 = base.endswith("-fp16")
        ctx = (lambda: torch.autocast(device.type, torch.float16)) if fp16 else contextlib.nullcontext
        try:
            if base.startswith("eager"):
                fn: Any = m
            elif base.startswith("torch.compile"):
                fn = torch.compile(m, mode="reduce-overhead" if base.endswith("reduce-overhead") else None)
            else:
                t0 = time.perf_counter()
                fn = ttm.compile(m, ((), {k: v.to(device) for k, v in example.items()}),
                                 dynamic={k: {0: (1, 8, hi)} for k in example}, precision="fp16" if fp16 else "fp32",
                                 cast_inputs=fp16, **extra)
                print(f"{name}: compile() {time.perf_counter() - t0:.1f} s; {fn!r}", file=sys.stderr)
                ctx = contextlib.nullcontext
        except Exception as e:  # noqa: BLE001 - the other rows still run
            out.append(Candidate(name, device, reason=f"failed to set up: {type(e).__name__}: {e}"[:3000]))
            continue

        def call(kw: dict[str, torch.Tensor], fn: Any = fn, ctx: Any = ctx) -> Any:
            with ctx():
                return fn(**kw)

        out.append(Candidate(name, device, call))
    return out


def bench_model(name: str, backends: list[str], batches: list[int], device: torch.device,
                args: argparse.Namespace) -> list[dict[str, Any]]:
    from torch_trt_module._tools.bench import make_candidates

    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    exported, export_error = None, None
    if {b.partition("@")[0] for b in backends} <= set(GPU_BACKENDS) and set(backends) - {"eager", "torch.compile"}:
        # issue 21's comparison: every backend from the model, no exported graph needed
        cands = _user_candidates(backends, model, inputs(2), max(32, *batches), device)
        return _time_rows(name, cands, batches, args)
    try:
        from torch_trt_module import export_onnx

        example = inputs(8)
        lo, hi = min(1, *batches), max(32, *batches)
        t0 = time.perf_counter()
        exported = export_onnx(model, ((), example), dynamic={k: {0: (lo, 8, hi)} for k in example})
        print(f"{name}: exported in {time.perf_counter() - t0:.1f} s ({exported.exporter})", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - eager and torch.compile still run
        export_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    cands = make_candidates(backends, model=model, exported=exported, device=device, export_error=export_error,
                            ort_threads=args.threads)
    return _time_rows(name, cands, batches, args)


def _time_rows(name: str, cands: list[Any], batches: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    from torch_trt_module._tools.bench import time_candidates

    factory, inputs = MODELS[name]
    rows: list[dict[str, Any]] = []
    for c in cands:
        if c.reason:
            rows.append({"model": name, "backend": c.name, "batch": None, "status": "not runnable", "reason": c.reason})
    for batch in batches:
        warm, iters = SCHEDULE.get(batch, (3, 10))
        warm, iters = args.warmup if args.warmup is not None else warm, args.iters or iters
        res = time_candidates(cands, inputs(batch), warmup=warm, iters=iters, max_seconds=args.max_seconds)
        for backend, t in res.items():
            row: dict[str, Any] = {"model": name, "backend": backend, "batch": batch}
            if isinstance(t, str):  # e.g. torch.compile without a working C++ compiler
                row.update(status="failed", reason=t)
            else:
                row.update(status="ok", throughput=batch * 1e3 / t.median_ms, **t.__dict__)
            rows.append(row)
            msg = f"{row['median_ms']:.2f} ms median over {row['iters']}" if row["status"] == "ok" else row["reason"]
            print(f"{name} b{batch} {backend}: {msg}", file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    from torch_trt_module._tools.bench import markdown_table

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        eager = {r["batch"]: r["median_ms"] for r in mine if r["backend"] == "eager" and r["status"] == "ok"}
        table = []
        for r in sorted((r for r in mine if r["batch"] is not None), key=lambda r: (r["batch"], r["backend"])):
            if r["status"] != "ok":
                table.append([r["backend"], r["batch"], f"failed: {r['reason']}", "", "", "", "", "", ""])
                continue
            ratio = f"{eager[r['batch']] / r['median_ms']:.2f}x" if r["batch"] in eager else "-"
            table.append([r["backend"], r["batch"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
                          f"{r['p99_ms']:.3f}", f"{r['throughput']:.1f}", ratio, r["iters"],
                          f"{r['first_ms'] / 1e3:.2f}"])
        chunk = f"**{model}**\n\n" + markdown_table(
            ["backend", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "speed vs eager", "timed calls",
             "first call s"], table)
        reasons = [f"- {r['backend']}: {r['reason'].splitlines()[0]}" for r in mine if r["status"] == "not runnable"]
        out.append(chunk + ("\n\n" + "\n".join(reasons) if reasons else ""))
    return "\n\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Any, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        for backend in dict.fromkeys(r["backend"] for r in ok):
            pts = sorted((r["batch"], r["throughput"]) for r in ok if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set(title=model, xlabel="batch size", ylabel="samples/s (median)", xscale="log", yscale="log")
        sizes = sorted({r["batch"] for r in ok})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS))
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--iters", type=int, help="timed calls per cell (default: by batch size, see above)")
    p.add_argument("--warmup", type=int, help="warm-up calls per cell (default: by batch size)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time budget per cell (default 20)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: each its own)")
    p.add_argument("--out", default=str(OUT_DIR), help="where the JSON, markdown and PNG go")
    p.add_argument("--results", action="store_true", help="write the table into RESULTS.md's Latency section")
    p.add_argument("--note", action="append", default=[], help="a note for the section (repeatable)")
    p.add_argument("--inductor-options", metavar="JSON",
                   help="extra TorchInductor options for the PyTorch runtime's GPU compile (an experiment: merged "
                        "into backends._torch_opt._TIERS in this process, and keyed with the artifacts), e.g. "
                        "'{\"conv_1x1_as_mm\": true}'")
    p.add_argument("--dwconv-triton", metavar="DTYPES", default="",
                   help="dtypes whose depthwise convolutions run our Triton kernel where Inductor compiles for a GPU "
                        "(backends._dwconv.DWCONV_TRITON, an experiment, empty by default), e.g. float16,float32")
    p.add_argument("--dwconv-tile", metavar="ELEMENTSxWARPS", default="",
                   help="the Triton depthwise kernel's tile, e.g. 2048x4 (backends._dwconv.TILE and WARPS)")
    p.add_argument("--graph-inputs", choices=("caller", "runner"), default="caller",
                   help="the layout of a CUDA graph's static inputs (backends._cudagraphs.STATIC_INPUT_LAYOUT, an "
                        "experiment): the caller's (default), or the runner's (channels_last images)")
    p.add_argument("--pad-channels", choices=("on", "off"),
                   help="pad convolutions' few input channels where Inductor compiles for a GPU, or not "
                        "(backends._pad_channels.PAD_INPUT_CHANNELS; default: the library's, on)")
    p.add_argument("--max-static", type=int, metavar="N",
                   help="input signatures compiled statically per module on a GPU before torch.compile's dynamic program "
                        "takes the rest (backends._inductor_store.MAX_STATIC['cuda'], for comparison)")
    p.add_argument("--render", nargs="+", metavar="JSON",
                   help="no measuring: merge these JSON files (one machine) into the markdown, plot and RESULTS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # What cuda_graphs="auto" decided for each shape (INFO), for the log beside the table.
    logging.getLogger("torch_trt_module.backends._autographs").setLevel(logging.INFO)
    warnings.simplefilter("ignore")
    if args.dwconv_triton:
        from torch_trt_module.backends import _dwconv

        _dwconv.DWCONV_TRITON = frozenset(args.dwconv_triton.split(","))
        if args.dwconv_tile:
            _dwconv.TILE, _dwconv.WARPS = (int(v) for v in args.dwconv_tile.split("x"))
    if args.graph_inputs != "caller":
        from torch_trt_module.backends import _cudagraphs

        _cudagraphs.STATIC_INPUT_LAYOUT = args.graph_inputs
    if args.pad_channels:
        from torch_trt_module.backends import _pad_channels

        _pad_channels.PAD_INPUT_CHANNELS = args.pad_channels == "on"
    if args.max_static is not None:
        from torch_trt_module.backends import _inductor_store

        _inductor_store.MAX_STATIC = {**_inductor_store.MAX_STATIC, "cuda": args.max_static}
    if args.inductor_options:
        from torch_trt_module.backends import _torch_opt

        extra = json.loads(args.inductor_options)
        _torch_opt._TIERS[True] = tuple({**tier, **extra} for tier in _torch_opt._TIERS[True])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        runs = [json.loads(Path(f).read_text()) for f in args.render]
        info, rows = runs[0]["machine"], [r for run in runs for r in run["rows"]]
        commands = [run["command"] for run in runs]
    else:
        models = args.models.split(",")
        if bad := [m for m in models if m not in MODELS]:
            p.error(f"unknown model(s) {bad}; expected {', '.join(MODELS)}")
        batches = [int(b) for b in args.batch_sizes.split(",")]
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.threads:
            torch.set_num_threads(args.threads)
        info = machine()
        info["threads"] = args.threads or "default (torch: cores; ONNX Runtime: physical cores)"
        commands = [command_line("bench_latency.py", argv if argv is not None else sys.argv[1:])]
        rows = []
        for m in models:
            rows += bench_model(m, args.backends.split(","), batches, device, args)
            info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
            _dump(out, info, commands[0], rows)  # after each model: a cut-off run keeps what it measured
    label = machine_label(info)
    slug = _slug(label)
    note = plot(rows, out / f"latency-{slug}.png", f"{label}")
    cmd = "; ".join(f"`{c.strip()}`" for c in commands)
    rel = os.path.relpath(out, RESULTS_MD.parent)  # RESULTS.md links files relative to itself
    body = (f"Machine: {machine_line(info)}.\n\nCommand: {cmd}\n\n" + markdown(rows)
            + f"\nPlot: {'(' + note + ')' if note else f'{rel}/latency-{slug}.png'}; "
              f"JSON: {rel}/latency-{slug}.json\n" + "".join(f"\nNote: {n}\n" for n in args.note))
    (out / f"latency-{slug}.md").write_text(body)
    if args.render:
        _dump(out, info, "; ".join(commands), rows)
    print(body)
    if args.results:
        section_intro("Latency", __doc__.split("\n\n", 1)[1].split("Writes results/")[0].strip())
        write_section("Latency", label, body)
    return 0


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _dump(out: Path, info: dict[str, Any], command: str, rows: list[dict[str, Any]]) -> None:
    path = out / f"latency-{_slug(machine_label(info))}.json"
    path.write_text(json.dumps({"machine": info, "command": command, "rows": rows}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
