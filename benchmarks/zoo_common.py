"""Shared by the zoo report's modules: where the results and the docs page live, the coverage
sets' settings, the JSON files' reading and writing, and the machine's description.

Split out of zoo_report.py (issue 22); zoo_report.py re-exports every name, so
``zoo_report.<name>`` keeps working."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

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


def _json_default(o: Any) -> Any:
    return str(o)
