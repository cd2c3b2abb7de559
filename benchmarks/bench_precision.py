"""Mixed precision (fp32 islands) against casting the whole model, measured for accuracy.

For each model, two fp16 conversions of the same fp32 model are exported to ONNX and run
on ONNX Runtime's CPU provider, and compared with fp32 eager on fresh inputs (batch 3, the
graphs were exported at batch 2 with a dynamic batch):

- ``full cast``: ``convert_model(model, "fp16", keep_fp32=False)``, i.e. ``model.half()``;
- ``mixed``: ``convert_model(model, "fp16")``: normalisations, softmax, reductions and
  attention's softmax stay fp32 in the graph (``torch_trt_module/_precision.py``).

bf16 rows run the converted model eagerly in torch on the CPU: ONNX Runtime's Python
binding cannot take bf16 tensors. Speed is not measured: no machine here can run a
TensorRT engine (see ENVIRONMENT.md), and fp16 on a CPU says nothing about a GPU.

ONNX Runtime 1.32 crashes (SIGSEGV) creating a session for some fp16 graphs at its
default ``ORT_ENABLE_ALL`` level (fp16 Transpose -> MatMul, as in ViT); sessions here use
``ORT_ENABLE_EXTENDED``.

    python benchmarks/bench_precision.py --results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any, Callable

from _common import OUT_DIR, machine, machine_line, section_intro, write_section

import torch

from harness.models import Sensitive  # noqa: E402 - _common put the repository on sys.path

HEADING = "Mixed precision"


# --------------------------------------------------------------------------- models


def models() -> dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], tuple[torch.Tensor, ...]]]]:
    """name -> (constructor, inputs for a batch size); cases.md #1, #4, #6 and a synthetic case."""
    import torchvision

    def image(b: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, 3, 224, 224),)

    def bert_inputs(b: int) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, 1000, (b, 16))
        mask = torch.ones(b, 16, dtype=torch.long)
        mask[-1, 10:] = 0  # tail padding, as in cases.md #6
        return ids, mask, torch.zeros(b, 16, dtype=torch.long)

    def bert() -> torch.nn.Module:
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128))

    def vit() -> torch.nn.Module:
        model = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=2, num_heads=4,
                                                     hidden_dim=64, mlp_dim=128)
        # torchvision zero-initialises the head, so every output would be 0 and compare equal.
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model

    return {
        "resnet18 (#1)": (lambda: torchvision.models.resnet18(weights=None), image),
        "ViT (#4)": (vit, image),
        "BERT (#6)": (bert, bert_inputs),
        "synthetic: 16k reduction + hand-written norm": (Sensitive, lambda b: (torch.randn(b, 64),)),
    }


# --------------------------------------------------------------------------- measuring

def ort_session(onnx: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT_ENABLE_ALL segfaults on some fp16 graphs in ORT 1.32 (see the module docstring).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(onnx, so, providers=["CPUExecutionProvider"])


def flat_outputs(out: Any) -> list[torch.Tensor]:
    from torch_trt_module._core.spec import flatten

    return flatten(out, what="output", allow_const=False)[0]


def errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, Any]:
    """Worst case over the outputs: max/mean abs error, error relative to max|ref|, cosine."""
    worst: dict[str, Any] = {"max_abs": 0.0, "mean_abs": 0.0, "rel": 0.0, "cosine": 1.0, "finite": True,
                             "dtype_ok": True}
    for g, r in zip(got, ref):
        worst["dtype_ok"] &= g.dtype == r.dtype
        g64, r64 = g.double().flatten(), r.double().flatten()
        finite = bool(torch.isfinite(g64).all())
        worst["finite"] &= finite
        d = (g64 - r64).abs()
        worst["max_abs"] = max(worst["max_abs"], float(d.max()) if finite else float("inf"))
        worst["mean_abs"] = max(worst["mean_abs"], float(d.mean()) if finite else float("inf"))
        worst["rel"] = max(worst["rel"], float(d.max() / r64.abs().max().clamp_min(1e-12)) if finite else float("inf"))
        cos = float(torch.nn.functional.cosine_similarity(g64, r64, dim=0)) if finite else float("nan")
        worst["cosine"] = min(worst["cosine"], cos) if cos == cos else float("nan")
    worst["class_H"] = bool(worst["finite"] and worst["dtype_ok"] and worst["cosine"] > 0.99)
    return worst


def graph_facts(onnx_bytes: bytes) -> dict[str, int]:
    """How many ops of the kinds mixed precision keeps in fp32 compute in fp32 here, and the Casts."""
    import onnx
    from onnx import TensorProto, shape_inference

    model = shape_inference.infer_shapes(onnx.load_from_string(onnx_bytes))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    sensitive = {"Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "BatchNormalization",
                 "InstanceNormalization", "ReduceMean", "ReduceSum", "GlobalAveragePool"}
    facts = {"sensitive_ops": 0, "sensitive_fp32": 0, "casts": 0}
    for n in g.node:
        if n.op_type == "Cast":
            facts["casts"] += 1
        if n.op_type in sensitive:
            facts["sensitive_ops"] += 1
            facts["sensitive_fp32"] += int(types.get(n.input[0]) == TensorProto.FLOAT)
    return facts


def measure(name: str, make: Callable[[], torch.nn.Module], inputs: Callable[[int], tuple[torch.Tensor, ...]]
            ) -> list[dict[str, Any]]:
    from torch_trt_module import export_onnx
    from torch_trt_module._export.precision import convert_model

    torch.manual_seed(0)
    model = make().eval()
    example, test = inputs(2), inputs(3)
    with torch.inference_mode():
        ref = [t.float() for t in flat_outputs(model(*test))]
    rows = []
    for label, keep in (("full cast", False), ("mixed", True)):
        conv = convert_model(model, "fp16", keep_fp32=keep)
        half = lambda ts: tuple(t.half() if t.is_floating_point() else t for t in ts)  # noqa: E731
        t0 = time.perf_counter()
        exported = export_onnx(conv, half(example), verify=False)
        export_s = time.perf_counter() - t0
        sess = ort_session(exported.onnx)
        feeds = {n: t.numpy() for n, t in zip(exported.input_names, half(test)) if n in
                 {i.name for i in sess.get_inputs()}}
        got = [torch.from_numpy(a) for a in sess.run(exported.output_names, feeds)]
        # Class H asks for the output dtype eager gives; the user-facing module casts fp16 outputs
        # back to the user's dtype, so compare that dtype after the same cast.
        row = {"model": name, "precision": "fp16", "variant": label, "runtime": "onnxruntime CPU",
               **errors([g.float() for g in got], ref), **graph_facts(exported.onnx),
               "export_s": round(export_s, 2), "onnx_mb": round(len(exported.onnx) / 1e6, 2)}
        row["raw_output_dtypes"] = sorted({str(g.dtype) for g in got})
        rows.append(row)
    for label, keep in (("full cast", False), ("mixed", True)):
        conv = convert_model(model, "bf16", keep_fp32=keep)
        with torch.inference_mode():
            got = flat_outputs(conv(*(t.bfloat16() if t.is_floating_point() else t for t in test)))
        rows.append({"model": name, "precision": "bf16", "variant": label, "runtime": "torch eager CPU",
                     **errors([g.float() for g in got], ref)})
    return rows


# --------------------------------------------------------------------------- report

def fmt(v: float) -> str:
    if v != v:
        return "nan"
    if v == float("inf"):
        return "inf"
    return f"{v:.2e}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | precision | variant | runtime | max abs err | mean abs err | max err / max abs ref | "
            "1 - cosine | class H | sensitive ops in fp32 | Casts |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        graph = f"{r['sensitive_fp32']}/{r['sensitive_ops']}" if "sensitive_ops" in r else "-"
        casts = str(r["casts"]) if "casts" in r else "-"
        cos = "nan" if r["cosine"] != r["cosine"] else fmt(max(0.0, 1.0 - r["cosine"]))
        lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {r['runtime']} | {fmt(r['max_abs'])} | "
                     f"{fmt(r['mean_abs'])} | {fmt(r['rel'])} | {cos} | {'pass' if r['class_H'] else 'FAIL'} | "
                     f"{graph} | {casts} |")
    ratios = []
    for model in dict.fromkeys(r["model"] for r in rows):
        err = {r["variant"]: r["max_abs"] for r in rows if r["model"] == model and r["precision"] == "fp16"}
        if err.get("mixed"):
            ratios.append(f"{model} {err['full cast'] / err['mixed']:.1f}x")
    lines += ["", "fp16 max abs error, full cast / mixed (> 1: mixed is closer to fp32): " + ", ".join(ratios) + "."]
    return "\n".join(lines)


INTRO = """Accuracy of fp16/bf16 against fp32 eager, for the mixed-precision conversion (normalisations,
softmax, reductions and attention's softmax kept in fp32 in the exported graph:
`torch_trt_module/_precision.py`) and for casting the whole model. fp16 graphs are exported
with `export_onnx` and run on ONNX Runtime's CPU provider at batch 3 (exported at batch 2,
dynamic batch), on inputs not used for the export; bf16 rows run the converted model
eagerly in torch (ONNX Runtime's Python binding takes no bf16). Errors are the worst over
a model's outputs; "max err / max abs ref" divides by the largest reference magnitude;
"1 - cosine" is the worst output's.
"sensitive ops in fp32" counts the graph's Softmax / *Normalization / ReduceMean /
ReduceSum / GlobalAveragePool nodes whose input is fp32. Class H (cases.md): cosine > 0.99
and the output dtype eager gives.

Speed is not measured: no machine here can execute a TensorRT engine (TensorRT-RTX builds
on the CPU but needs a GPU to run, and the lent H200 has no TensorRT runtime; RTX refuses
sm_90), and fp16 speed on a CPU says nothing about a GPU. The casts around kept ops cost
memory traffic on a GPU, and an fp32 BatchNormalization between fp16 Convs may keep
TensorRT from folding the BN into the Conv (unmeasured); measure both where a runtime
exists before recommending mixed over full cast for CNNs, where it gains nothing here.

Note: ONNX Runtime 1.32 crashes (SIGSEGV, the process dies) when it creates a session for
some fp16 graphs at its default `ORT_ENABLE_ALL` optimisation level (fp16 Transpose ->
MatMul with a constant weight, as in ViT); these sessions use `ORT_ENABLE_EXTENDED`.

    python benchmarks/bench_precision.py --results"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", action="store_true", help=f"write the '## {HEADING}' section of RESULTS.md")
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[dict[str, Any]] = []
    for name, (make, inputs) in models().items():
        if args.only and args.only.lower() not in name.lower():
            continue
        t0 = time.perf_counter()
        rows.extend(measure(name, make, inputs))
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = table(rows)
    print(text)
    info = machine()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "precision.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    if args.results:
        section_intro(HEADING, INTRO)
        write_section(HEADING, "Accuracy on the CPU (ONNX Runtime / torch eager)",
                      f"Measured {machine_line(info)}.\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
