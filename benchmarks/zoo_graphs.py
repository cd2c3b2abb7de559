"""How a compiled coverage model runs: the graphs torch.compile hands this package's backend,
where each graph ran (engine, split, next runtime, PyTorch) and the share of ops on engines.

The benchmark's own code, not the library's (PartitionedModule counts graphs and fallbacks only);
split out of zoo_report.py (issue 22), which re-exports every name."""

from __future__ import annotations

from typing import Any


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
