"""The README and every page of ``docs/`` run as written. Each file's Python blocks run in order, in
one namespace of its own (as a reader pastes that page), in a scratch directory of its own. Lines of
the form ``expression  # <python literal>`` are checked: the expression must equal the literal the
comment shows. The pages share one engine cache, as a reader's machine would: a page that compiles
a model an earlier page compiled gets a cache hit (refit to its own weights).

Two blocks cannot run here and are named with the reason: the ``compile()`` signature (not code)
and the Triton client (it needs a running Triton server).

Also checked: links between the pages reach a file and a heading that exist; the README stays short
and keeps CI's test command verbatim; the generated tables of docs/supported-models.md are what
benchmarks/zoo_report.py renders from its JSON results.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = {
    "ttm.compile(model, example_inputs=None": "the signature of compile(), not code",
    "import numpy as np, tritonclient.grpc": "a Triton client: needs a running Triton server",
}
#: Pages that build a TensorRT-RTX engine ahead of time (``build_engine(..., backend="tensorrt_rtx")``).
NEEDS_RTX = {"docs/api.md"}
#: CI's command line (.ci/run): the README's "Set-up (two commands)" must show it character for character.
CI_TEST_COMMAND = 'pip install -q -e ".[test,rtx]" -c constraints.txt && python -m pytest -q -n 2'


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.M | re.S)


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


def _readme_saved_its_module(namespace: dict[str, Any]) -> None:
    assert os.path.exists("resnet18.pt")


def _api_page_left_its_files(namespace: dict[str, Any]) -> None:
    assert os.path.exists("resnet18.ttm") and os.path.exists("model.pt")


def _the_training_loop_was_followed(namespace: dict[str, Any]) -> None:
    assert namespace["fast"].weights_version >= 2  # the training loop's steps were followed


#: What a page must leave behind once its blocks ran (in its namespace and scratch directory).
AFTER: dict[str, Callable[[dict[str, Any]], None]] = {
    "README.md": _readme_saved_its_module,
    "docs/api.md": _api_page_left_its_files,
    "docs/weights-and-refit.md": _the_training_loop_was_followed,
}
RUNNABLE = [p for p in PAGES if any(not b.startswith(tuple(NOT_RUN)) for b in blocks(p))]


def test_every_block_is_run_or_named() -> None:
    found = [b for page in PAGES for b in blocks(page)]
    assert len(found) >= 10 and blocks(README)
    for key in NOT_RUN:
        assert sum(b.startswith(key) for b in found) == 1, f"NOT_RUN entry {key!r} matches no block (or several)"
    assert set(AFTER) <= {_name(p) for p in RUNNABLE} and NEEDS_RTX <= {_name(p) for p in RUNNABLE}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("page", RUNNABLE, ids=_name)
def test_each_page_runs_as_written(page: Path, shared_cache: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    if _name(page) in NEEDS_RTX:
        request.getfixturevalue("rtx_required")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_TRT_MODULE_CACHE", str(shared_cache))
    namespace: dict[str, object] = {}
    ran = 0
    for n, code in enumerate(blocks(page), 1):
        if code.startswith(tuple(NOT_RUN)):
            continue
        exec(compile(code, f"{_name(page)} block {n}", "exec"), namespace)  # noqa: S102 - our own docs
        for expr, want in _claims(code):
            assert eval(expr, namespace) == want, f"{_name(page)} claims {expr} == {want!r}"  # noqa: S307
        ran += 1
    assert ran >= 1
    AFTER.get(_name(page), lambda ns: None)(namespace)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_links_between_the_pages_reach_a_file_and_a_heading() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an external address
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_name(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_name(page)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_short_and_keeps_ci_s_command() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 25_000, f"README.md has {len(text)} characters: move reference material to docs/"
    assert f"```bash\n{CI_TEST_COMMAND}\n```" in text  # .ci/run runs this line verbatim
    assert CI_TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_supported_models_tables_are_generated_from_the_json() -> None:
    spec = importlib.util.spec_from_file_location("zoo_report_for_docs", ROOT / "benchmarks" / "zoo_report.py")
    assert spec is not None and spec.loader is not None
    zr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zr)
    page = zr.SUPPORTED_MODELS.read_text(encoding="utf-8")
    want = {(zr.START, zr.END): zr.render(zr.load_results())}
    want.update({zr.coverage_markers(kind): body for kind, body in zr.render_all_coverage().items()})
    assert len(want) == 3
    for (start, end), body in want.items():
        assert f"{start}\n{body}\n{end}" in page, f"{start} ... {end} differs: run benchmarks/zoo_report.py --readme-only"
