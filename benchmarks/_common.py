"""Shared by the benchmarks: the repository on sys.path, the machine's description, and
writing one section of benchmarks/RESULTS.md without touching the others."""

from __future__ import annotations

import importlib
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
OUT_DIR = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:  # run as `python benchmarks/bench_x.py` from a checkout, installed or not
    sys.path.insert(0, str(REPO))


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - a stub wheel fails with OSError and friends
        return f"not installed ({type(e).__name__})"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, GPU and every library version that matters."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"), "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }
    for m in ("torch", "torchvision", "transformers", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx",
              "numpy"):
        info[m] = _version(m)
    return info


def machine_label(info: dict[str, Any]) -> str:
    threads = f", {info['threads']} thread per runtime" if isinstance(info.get("threads"), int) else ""
    if info.get("gpu"):
        return f"GPU: {info['gpu']}{threads}"
    return f"CPU: {info['cores']}-core {info['cpu']}{threads}"


def machine_line(info: dict[str, Any]) -> str:
    libs = ", ".join(f"{m} {info[m]}" for m in ("torch", "torchvision", "transformers", "onnx", "onnxruntime",
                                               "tensorrt", "tensorrt_rtx"))
    gpu = f"GPU {info['gpu']}, " if info.get("gpu") else "no GPU, "
    load = ""
    if "load_average_start" in info:  # a shared machine: other jobs' load makes absolute figures noisy
        load = f"; 1/5/15-min load average {'/'.join(map(str, info['load_average_start']))} at the start"
        if "load_average_end" in info:
            load += f", {'/'.join(map(str, info['load_average_end']))} at the end"
    threads = f"torch threads {info['torch_threads']}"
    if isinstance(info.get("threads"), int):
        threads = f"{info['threads']} thread(s) for torch and for each ONNX Runtime session"
    return (f"{info['date']}; {info['cores']} cores ({info['cpu']}), {gpu}{threads}; "
            f"Python {info['python']}; {libs}{load}")


def command_line(script: str, argv: list[str]) -> str:
    """The command as it would be typed again, without the ``--note`` texts (they are in the section)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return " ".join([f"python benchmarks/{script}", *out])


def write_section(heading: str, sub: str | None, body: str, path: Path = RESULTS_MD) -> None:
    """Replace ``## heading`` (or only its ``### sub`` subsection) in RESULTS.md with ``body``,
    appending it where missing; every other section is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    body = body.strip("\n") + "\n"
    sec = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if sec is None:
        new = f"## {heading}\n\n" + (f"### {sub}\n\n{body}" if sub else body)
        text = text.rstrip("\n") + "\n\n" + new
    else:
        content = sec.group(1)
        if sub is None:
            content = "\n" + body + "\n"
        else:
            part = re.search(rf"^### {re.escape(sub)}[ \t]*\n(.*?)(?=^### |\Z)", content, flags=re.M | re.S)
            block = f"### {sub}\n\n{body}\n"
            content = (content[:part.start()] + block + content[part.end():]) if part else \
                content.rstrip("\n") + "\n\n" + block
        text = text[:sec.start(1)] + content + text[sec.end(1):]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def section_intro(heading: str, intro: str, path: Path = RESULTS_MD) -> None:
    """Set the text between ``## heading`` and its first ``###`` (the method and the command)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    sec = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if sec is None:
        write_section(heading, None, intro, path)
        return
    content = sec.group(1)
    first_sub = re.search(r"^### ", content, flags=re.M)
    rest = content[first_sub.start():] if first_sub else ""
    text = text[:sec.start(1)] + "\n" + intro.strip("\n") + "\n\n" + rest + text[sec.end(1):]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
