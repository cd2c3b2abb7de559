"""Per-call overhead of ``TRTModule.forward`` over calling the runtime directly.

Model: one ``nn.Linear(16, 16)``, batch 1, compiled with ``torch_trt_module.compile``.
The direct call is the runtime with buffers bound once, ahead of time:
``session.run_with_iobinding`` on ONNX Runtime (CPU), or ``context.execute_async_v3``
on a TensorRT/TensorRT-RTX runtime where one can run (GPU). Targets on the 2-core CPU machine:
median overhead <= 5 us, and TRTModule(x) <= 3.0x the direct call (issue 20; both medians from
the same interleaved run).

Method: every variant is timed call by call with ``perf_counter_ns``, in interleaved
rounds (``--rounds`` x ``--calls`` calls each, variants in turn, so background load hits
them alike), under ``torch.inference_mode()`` unless the variant says otherwise. The
timer's own cost (an empty call) is reported; it cancels in the differences. Unless
``--no-profile``: a breakdown of forward (layers by difference between entry points,
then pieces replayed alone, all interleaved) and cProfile's top functions (stderr, JSON).

    python benchmarks/bench_overhead.py --results
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
import sys
import time
import warnings
from typing import Any, Callable

from _common import OUT_DIR, command_line, machine, machine_label, machine_line, section_intro, write_section

import torch


def per_call_ns(fns: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, list[int]]:
    samples: dict[str, list[int]] = {k: [] for k in fns}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # one untimed call after switching variants
            out = samples[name]
            for _ in range(calls):
                t0 = clock()
                fn()
                out.append(clock() - t0)
    return samples


def pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(round((len(s) - 1) * q / 100)))])


def per_call_events(fns: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, list[int]]:
    """Like :func:`per_call_ns`, timed with CUDA events on the current stream (GPU time between the
    call's first and last enqueued work, in ns): host-side overhead shows only where it leaves the
    GPU idle."""
    samples: dict[str, list[int]] = {k: [] for k in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            out = samples[name]
            for _ in range(calls):
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(int(start.elapsed_time(end) * 1e6))
    return samples


def _model(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18().eval().to(device), torch.randn(1, 3, 224, 224, device=device)
    return torch.nn.Linear(16, 16).eval().to(device), torch.randn(1, 16, device=device)


def setup(device: torch.device, model_name: str = "linear"
          ) -> tuple[Any, torch.Tensor, dict[str, Callable[[], Any]], str]:
    """The module, its input, the variants to time, and what the direct call is."""
    import torch_trt_module as ttm

    model, x = _model(model_name, device)
    module = ttm.compile(model, x, cache=False, backend="auto" if device.type == "cuda" else "onnxruntime")
    runner = module.runner
    variants: dict[str, Callable[[], Any]] = {"timer only (empty call)": lambda: None}
    if module.backend == "onnxruntime":
        import numpy as np

        sess = runner.session
        binding = sess.io_binding()
        out = torch.empty(tuple(model(x).shape), device=runner._run_device)
        xin = x.to(runner._run_device)
        where = "cuda" if runner._run_device.type == "cuda" else "cpu"
        binding.bind_input(module.input_names[0], where, 0, np.float32, tuple(x.shape), xin.data_ptr())
        binding.bind_output(module.output_names[0], where, 0, np.float32, tuple(out.shape), out.data_ptr())
        # The buffers must outlive the binding: the lambda holds them (ORT writes into `out`).
        variants["direct: ORT run_with_iobinding (pre-bound)"] = \
            lambda bufs=(xin, out): sess.run_with_iobinding(binding)
        direct = "ONNX Runtime session.run_with_iobinding with input and output bound once"
    elif module.backend == "torch":  # the chain's PyTorch runtime (a GPU without TensorRT)
        raw = runner.raw
        variants["direct: the PyTorch program's graph module(*weights, x) + sync"] = \
            lambda: (raw([x]), torch.cuda.current_stream(device).synchronize())
        direct = "the PyTorch runtime's program (torch.export's lifted graph module) called with its weights"
    else:  # a TensorRT runtime runs here: the context with addresses set once
        keep = runner.run([x])  # sets shapes and addresses; keep the outputs they point to alive
        ctx = runner._state().ctx
        stream = torch.cuda.current_stream(device)

        def direct_trt(bufs: Any = keep) -> None:  # holds the bound outputs alive
            ctx.execute_async_v3(stream.cuda_stream)
            stream.synchronize()

        variants["direct: TensorRT execute_async_v3 (pre-bound) + sync"] = direct_trt
        direct = f"{module.backend} execution context execute_async_v3 with addresses set once (kept: {len(keep)})"
    sync = (lambda: torch.cuda.current_stream(device).synchronize()) if device.type == "cuda" else (lambda: None)
    variants["runner.run([x]) (backend adapter only)"] = lambda: (runner.run([x]), sync())
    call_for = getattr(runner, "call_for", None)
    if call_for is not None:
        planned = call_for((x.shape,))
        variants["runner's call planned for x's shape (what TRTModule(x) reaches)"] = lambda: (planned([x]), sync())
    variants["TRTModule.forward(x) (the full path: every check)"] = lambda: (module.forward(x), sync())
    variants["TRTModule(x) (nn.Module __call__)"] = lambda: (module(x), sync())
    variants[f"eager {model_name}(x) (for scale)"] = lambda: (model(x), sync())
    return module, x, variants, direct


def breakdown(module: Any, x: torch.Tensor, n: int) -> list[tuple[str, float | None]]:
    """Median ns of the layers of one forward, by difference between entry points, and of the
    helpers and ONNX Runtime calls inside them, each replayed alone. Only names that exist
    are timed: a step whose internals changed reads "n/a" instead of breaking the run."""
    import numpy as np

    runner, ex = module.runner, module.engine.exported if module.engine is not None else None
    sess = runner.session
    prepared = [x]
    out = torch.empty(1, 16)
    name_in, name_out = module.input_names[0], module.output_names[0]
    pub = sess.io_binding()
    pub.bind_input(name_in, "cpu", 0, np.float32, (1, 16), x.data_ptr())
    pub.bind_output(name_out, "cpu", 0, np.float32, (1, 16), out.data_ptr())

    def helper(modname: str, attr: str) -> Any:  # looked up once: only the call is timed; a rename fails here
        return getattr(__import__(f"torch_trt_module.{modname}", fromlist=[attr]), attr)

    bind_call_fn, match_fn, unflatten_fn = (helper("_signature", "bind_call"), helper("_inputs", "match_inputs"),
                                            helper("_spec", "unflatten"))
    bound = bind_call_fn(ex.params, (x,), {})

    def bind_call() -> Any:
        return bind_call_fn(ex.params, (x,), {})  # type: ignore[misc]

    def match() -> Any:
        return match_fn(ex.call_tree, bound, "")  # type: ignore[misc]

    def unflatten() -> Any:
        return unflatten_fn(ex.output_tree, [out])  # type: ignore[misc]

    def bind_output_c() -> Any:
        st = runner._state()
        return st.bind_c.bind_output(name_out, st.device, np.float32, (1, 16), out.data_ptr())

    shapes_seen = {x.shape}
    planned = runner.call_for((x.shape,))
    entry = {"call": lambda: module(x), "forward": lambda: module.forward(x), "runner": lambda: runner.run(prepared),
             "planned": lambda: planned(prepared), "direct": lambda: sess.run_with_iobinding(pub)}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("  _signature.bind_call(params, args, kwargs) (kwargs or nested inputs only)", bind_call),
        ("  _inputs.match_inputs(call_tree, bound) (kwargs or nested inputs only)", match),
        ("  TRTModule._prepare(leaves) (grad, dtype, device, profile checks, contiguous)",
         lambda: module._prepare([x])),
        ("  _spec.unflatten(output_tree, outs)", unflatten),
        ("  torch.empty(shape, dtype, device) (a tuple shape)", lambda: torch.empty((1, 16), dtype=torch.float32)),
        ("  torch.empty(size=shape, dtype, device) (what the planned call does)",
         lambda: torch.empty(size=(1, 16), dtype=torch.float32, device=runner.device)),
        ("  ORT C-level IOBinding bind_output(...) (what the runner calls)", bind_output_c),
        ("  ORT public IOBinding.bind_input(...)", lambda: pub.bind_input(name_in, "cpu", 0, np.float32, (1, 16),
                                                                           x.data_ptr())),
        ("  ORT public IOBinding.bind_output(...)", lambda: pub.bind_output(name_out, "cpu", 0, np.float32, (1, 16),
                                                                             out.data_ptr())),
        ("  all(type(a) is torch.Tensor for a in args)", lambda: all(type(a) is torch.Tensor for a in (x,))),
        ("  tuple(tuple(t.shape) for t in inputs)", lambda: tuple(tuple(t.shape) for t in prepared)),
        ("  any(r is None for r in outputs)", lambda: any(r is None for r in (out,))),
        ("  known_shapes.add(t.shape) (already in the set)", lambda: shapes_seen.add(x.shape)),
        ("  tuple(t.shape) + t.data_ptr()", lambda: (tuple(x.shape), x.data_ptr())),
        ("  t.device == torch.device('cpu')", lambda: x.device == runner.device),
    ]
    result: list[tuple[str, float | None]] = []
    usable: dict[str, Callable[[], Any]] = {}
    for label, fn in steps:
        try:
            fn()
            usable[label] = fn
        except Exception as e:  # noqa: BLE001 - the internals moved on
            usable[f"{label}: n/a ({type(e).__name__})"] = None  # type: ignore[assignment]
        pub.bind_input(name_in, "cpu", 0, np.float32, (1, 16), x.data_ptr())
        pub.bind_output(name_out, "cpu", 0, np.float32, (1, 16), out.data_ptr())
    with torch.inference_mode():  # everything interleaved in the same rounds, so load hits all alike
        timed = {k: f for k, f in usable.items() if f is not None}
        med = {k: pct(v, 50) for k, v in per_call_ns({**entry, **timed}, 20, n // 20).items()}
    result += [("TRTModule(x) above the planned call = TRTModule(x) - planned([x]) (hook check, input checks, "
                "shape lookup)", med["call"] - med["planned"]),
               ("the planned call above the direct call = planned([x]) - direct (a copy of the output out of the "
                "buffer bound once per thread, the input address check)", med["planned"] - med["direct"]),
               ("the direct call: session.run_with_iobinding (pre-bound)", med["direct"]),
               ("for scale, the full path: forward(x) - runner.run([x])", med["forward"] - med["runner"]),
               ("for scale, runner.run([x]) - planned([x]) (the shape-plan lookup)", med["runner"] - med["planned"]),
               ("pieces, each replayed alone (the timer and a lambda call add about 110 ns to each):", None)]
    result += [(k, med.get(k)) for k in usable]
    return result


def profile(module: Any, x: torch.Tensor, n: int, top: int = 18) -> str:
    prof = cProfile.Profile()
    with torch.inference_mode():
        prof.enable()
        for _ in range(n):
            module(x)
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    body = text[text.index("ncalls"):] if "ncalls" in text else text
    return re.sub(r"/\S*/site-packages/|/\S*/torch_trt_module/", "", body).rstrip()


def watch_cost(device: torch.device, rounds: int, calls: int) -> tuple[str, dict[str, Any]]:
    """What ``weights="follow"`` adds to a call where nothing changed: the check of the source's
    weights (issue 12's goal: <= 1 us on resnet18). Linear(16, 16): TRTModule(x) follow vs
    snapshot, interleaved. resnet18: the check alone (``WeightWatch.changed()``, 122 tensors),
    since a resnet18 call's own noise would hide it."""
    import torchvision

    import torch_trt_module as ttm
    from torch_trt_module._runtime.weights import WeightWatch

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).eval().to(device)
    x = torch.randn(1, 16, device=device)
    backend = "auto" if device.type == "cuda" else "onnxruntime"
    follow = ttm.compile(model, x, cache=False, backend=backend)
    snapshot = ttm.compile(model, x, cache=False, backend=backend, weights="snapshot")
    sync = (lambda: torch.cuda.current_stream(device).synchronize()) if device.type == "cuda" else (lambda: None)
    resnet = torchvision.models.resnet18().eval()
    names = [n for n, _ in resnet.named_parameters()] + [n for n, _ in resnet.named_buffers()]
    watch = WeightWatch(resnet, names)
    watch.mark()
    with torch.inference_mode():
        samples = per_call_ns({
            "Linear(16,16): TRTModule(x), weights='snapshot'": lambda: (snapshot(x), sync()),
            "Linear(16,16): TRTModule(x), weights='follow'": lambda: (follow(x), sync()),
            "timer only (empty call)": lambda: None,
            f"resnet18: the weights check alone ({len(names)} tensors)": watch.changed,
        }, rounds, calls)
    med = {k: pct(v, 50) for k, v in samples.items()}
    keys = list(med)
    linear = (med[keys[1]] - med[keys[0]]) / 1e3
    resnet_us = (med[keys[3]] - med[keys[2]]) / 1e3
    from torch_trt_module._tools.bench import markdown_table

    table = markdown_table(["variant", "median us", "p90 us"],
                           [[k, f"{med[k] / 1e3:.2f}", f"{pct(samples[k], 90) / 1e3:.2f}"] for k in keys])
    text = (f"**The weights check (weights='follow', nothing changed) adds {linear:.2f} us a call on Linear(16,16) "
            f"and {resnet_us:.2f} us on resnet18 (goal <= 1 us on resnet18: "
            f"{'met' if resnet_us <= 1 else 'NOT met'}).** It reads each tracked tensor's `_version` counter and "
            "the address of its memory (about 60 and 70 ns each through torch's Python binding, which has no "
            "batched form); hooks alone cannot see an in-place write under no_grad (an EMA update, `copy_`) or "
            "`p.data = w`, so they are not enough. `weights='snapshot'` skips the check.\n\n" + table + "\n")
    return text, {"linear_follow_minus_snapshot_us": linear, "resnet18_check_us": resnet_us,
                  "samples": {k: {"median_ns": med[k], "p90_ns": pct(samples[k], 90)} for k in keys}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the TensorRT context where one can run)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=1000, help="timed calls per variant per round")
    p.add_argument("--no-profile", action="store_true", help="skip cProfile and the stage breakdown")
    p.add_argument("--model", default="linear", choices=["linear", "resnet18"],
                   help="linear: nn.Linear(16, 16), batch 1 (the target's model); resnet18: batch 1 at 224x224")
    p.add_argument("--out", default=str(OUT_DIR))
    p.add_argument("--results", action="store_true", help="write RESULTS.md's 'Per-call overhead' section")
    p.add_argument("--note", action="append", default=[], help="a note for the section (repeatable)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    info = machine()
    module, x, variants, direct_desc = setup(device, args.model)
    with torch.inference_mode():
        samples = per_call_ns(variants, args.rounds, args.calls)
        events = per_call_events(variants, args.rounds, args.calls) if device.type == "cuda" else {}
    grad = per_call_ns({"TRTModule(x) outside inference_mode (grad mode on)": lambda: module(x)},
                       max(1, args.rounds // 4), args.calls)
    samples.update(grad)
    direct_name = next(k for k in samples if k.startswith("direct"))
    base = pct(samples[direct_name], 50)
    rows = []
    for name, s in samples.items():
        med = pct(s, 50)
        over = "-" if name.startswith(("timer", "direct", "eager")) else f"{(med - base) / 1e3:+.2f}"
        rows.append([name, f"{med / 1e3:.2f}", f"{pct(s, 90) / 1e3:.2f}", f"{pct(s, 99) / 1e3:.2f}", over, len(s)])
    from torch_trt_module._tools.bench import markdown_table

    table = markdown_table(["variant", "median us", "p90 us", "p99 us", "overhead over direct (median) us",
                            "calls"], rows)
    fwd = pct(samples["TRTModule(x) (nn.Module __call__)"], 50) - base
    ratio = pct(samples["TRTModule(x) (nn.Module __call__)"], 50) / base
    verdict = (f"**TRTModule(x) costs {fwd / 1e3:.1f} us more than the direct call per call (median); target <= 5 us: "
               f"{'met' if fwd <= 5000 else 'NOT met'}. TRTModule(x) / direct call = {ratio:.2f}x; target <= 3.0x: "
               f"{'met' if ratio <= 3.0 else 'NOT met'}.** Runtime here: {module.backend}; direct call: {direct_desc}.")
    command = command_line("bench_overhead.py", argv if argv is not None else sys.argv[1:])
    body = f"Machine: {machine_line(info)}.\n\nCommand: `{command.strip()}`\n\n{verdict}\n\n{table}\n"
    extra: dict[str, Any] = {}
    if events:
        ebase = pct(events[direct_name], 50)
        erows = [[name, f"{pct(s, 50) / 1e3:.2f}", f"{pct(s, 90) / 1e3:.2f}",
                  "-" if name.startswith(("timer", "direct", "eager")) else f"{(pct(s, 50) - ebase) / 1e3:+.2f}"]
                 for name, s in events.items()]
        efwd = pct(events["TRTModule(x) (nn.Module __call__)"], 50) - ebase
        body += (f"\nThe same calls timed with CUDA events (GPU time from the call's start to its end on the current "
                 f"stream): **TRTModule(x) {efwd / 1e3:+.1f} us over the direct call.**\n\n"
                 + markdown_table(["variant", "median us", "p90 us", "overhead over direct (median) us"], erows) + "\n")
        extra["cuda_events"] = {k: {"median_ns": pct(v, 50), "p90_ns": pct(v, 90)} for k, v in events.items()}
    if not args.no_profile and module.backend == "onnxruntime":
        stages = breakdown(module, x, 20000)
        body += "\nWhere the time goes (median ns per call; layers by difference, then pieces replayed alone):\n\n" \
            + markdown_table(["stage", "median ns"], [[k, "" if v is None else f"{v:.0f}"] for k, v in stages])
        body += "\n"
        prof = profile(module, x, 20000)
        extra = {"stages_ns": stages, "cprofile": prof}
        print(f"\ncProfile, 20000 calls of TRTModule(x), by own time:\n{prof}\n", file=sys.stderr)
    watch_text, extra["weights_watch"] = watch_cost(device, max(1, args.rounds // 2), args.calls)
    body += "\nThe weights check:\n\n" + watch_text
    body += "".join(f"\nNote: {n}\n" for n in args.note)
    label = machine_label(info) + ("" if args.model == "linear" else f", {args.model}")
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    out = __import__("pathlib").Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {k: {"median_ns": pct(v, 50), "p90_ns": pct(v, 90), "p99_ns": pct(v, 99), "n": len(v)}
             for k, v in samples.items()}
    (out / f"overhead-{slug}.json").write_text(json.dumps({"machine": info, "command": command, "variants": stats,
                                                          "ratio_call_over_direct": ratio, **extra}, indent=2))
    print(body)
    if args.results:
        section_intro("Per-call overhead", __doc__.split("\n\n", 1)[1].split("    python")[0].strip())
        write_section("Per-call overhead", label, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
