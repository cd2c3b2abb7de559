"""The README runs as written: its Python blocks, in order, in one namespace (as a reader pastes
them), in a scratch directory. Lines of the form ``expression  # <python literal>`` are checked:
the expression must equal the literal the comment shows.

Two blocks cannot run here and are named with the reason: the ``compile()`` signature (not code)
and the Triton client (it needs a running Triton server).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = {
    "ttm.compile(model, example_inputs=None": "the signature of compile(), not code",
    "import numpy as np, tritonclient.grpc": "a Triton client: needs a running Triton server",
}


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def _claims(code: str) -> list[tuple[str, object]]:
    """``(expression, value)`` for each line whose trailing comment is a Python literal."""
    out = []
    for line in code.splitlines():
        expr, sep, comment = line.partition("  # ")
        if not sep or "=" in expr.split("(")[0]:
            continue
        try:
            out.append((expr.strip(), ast.literal_eval(comment.strip())))
        except (ValueError, SyntaxError):
            continue
    return out


def test_every_block_is_run_or_named() -> None:
    found = blocks()
    assert len(found) >= 6
    skipped = [b for b in found if any(b.startswith(k) for k in NOT_RUN)]
    assert len(skipped) == len(NOT_RUN), "a NOT_RUN entry matches no README block: update the list"


@pytest.mark.usefixtures("rtx_required")  # the README builds a TensorRT-RTX engine ahead of time
def test_the_readme_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE", str(tmp_path / "cache"))
    namespace: dict[str, object] = {}
    ran = 0
    for code in blocks():
        if any(code.startswith(k) for k in NOT_RUN):
            continue
        exec(compile(code, f"README.md block {ran + 1}", "exec"), namespace)  # noqa: S102 - our own README
        for expr, want in _claims(code):
            assert eval(expr, namespace) == want, f"README claims {expr} == {want!r}"  # noqa: S307
        ran += 1
    assert ran >= 5
    assert os.path.exists("resnet18.ttm") and os.path.exists("model.pt")
    assert namespace["fast"].weights_version >= 2  # the training loop's steps were followed
