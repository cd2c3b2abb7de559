"""How an exporter's failure reads: whether torch.export's exception chain shows data-dependent
control flow or a specialised dim, the fixes it suggests, and the one line of its pages-long
message that a user needs. Only torch.export's own evidence is ever called data-dependent: our
errors in the chain are not (their text may quote the words).

Example:
    >>> is_data_dependent(RuntimeError("Could not guard on data-dependent expression u0 > 0"))
    True
"""

from __future__ import annotations

import re

from .._errors import ExportError

__all__ = ["chain", "is_data_dependent", "is_specialization", "suggested_fixes", "summary"]

_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "DataDependent",
                   "Could not guard on data-dependent", "Could not extract specialized integer from data-dependent")


def chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return out


def is_data_dependent(e: BaseException) -> bool:
    """Whether torch.export's exception chain shows a guard on a data-dependent value. Our own errors
    in the chain are not evidence (their text may quote the words)."""
    return any(any(m in f"{type(x).__name__}: {x}" for m in _DATA_DEPENDENT)
               for x in chain(e) if not isinstance(x, ExportError))


def is_specialization(e: BaseException) -> bool:
    text = " ".join(str(x) for x in chain(e)[:2])
    return "Constraints violated" in text or "specialized" in text or "specialised" in text


def summary(e: BaseException) -> str:
    """The first meaningful line of an exporter's error (their messages run to pages)."""
    text = str(e)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else type(e).__name__)
    # Ours are written to be read whole (what, where, the fix); an exporter's first line can run long.
    return first if isinstance(e, ExportError) else first[:400]


def suggested_fixes(e: BaseException) -> list[str]:
    """torch.export's "Suggested fixes" for a constraint violation, as ``name = expr`` lines."""
    for x in chain(e):
        text = str(x)
        if "Suggested fixes:" in text:
            block = text.split("Suggested fixes:", 1)[1].split("\n\n")[0]
            return [ln.strip() for ln in block.splitlines() if " = " in ln]
    return []
