"""Compare a compiled module's outputs with a reference, the way Polygraphy does.

An element passes when ``abs_err <= atol`` OR ``rel_err <= rtol``, with
``rel_err = abs_err / |reference|``. This is deliberately not numpy's
``abs_err <= atol + rtol * |reference|``: it is what Polygraphy checks, so numbers
and tolerances carry over between the two tools. NaN never passes, not even
NaN against NaN, because a NaN in either output almost always means a broken
kernel rather than agreement. Equal infinities agree exactly.
Integer and boolean outputs must be equal element for element.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from .._core.numerics import POLICY, Tolerance
from .._core.tree import TreeSpec, flatten, leaf_paths
from .._errors import VerificationError

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "REFERENCES", "OutputReport", "ParityReport", "PerOutput", "compare_outputs",
           "percentile"]

#: compare_outputs()' plain elementwise default: the fp32 policy's rtol and absolute floor.
DEFAULT_RTOL = POLICY["fp32"].rtol
DEFAULT_ATOL = POLICY["fp32"].atol
REFERENCES = ("eager", "onnxruntime", "both")

#: A float for every output, or ``{output_name: float}`` with the default for missing names.
PerOutput = Union[float, Mapping[str, float], None]


@dataclass(frozen=True)
class OutputReport:
    """How one output compares with its reference.

    Error statistics leave NaN elements out (they are counted in ``num_nan`` and
    always fail); they are ``nan`` when shapes differ and nothing could be compared.
    ``min_atol`` is the smallest atol that passes every element at this ``rtol``
    (and ``min_rtol`` the converse); both are ``inf`` when a NaN is present.
    ``atol`` is the absolute bar applied: the tolerance's floor, or ``atol_rms`` times the
    reference's root-mean-square (``reference_rms``) where that is larger. ``min_cosine``
    is the cosine bound the output had to meet (0: none).
    """

    name: str
    dtype: str
    reference_dtype: str
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    passed: bool
    rtol: float
    atol: float
    max_abs: float = 0.0
    mean_abs: float = 0.0
    median_abs: float = 0.0
    p99_abs: float = 0.0
    max_rel: float = 0.0
    mean_rel: float = 0.0
    median_rel: float = 0.0
    p99_rel: float = 0.0
    cosine: float = 1.0
    min_atol: float = 0.0
    min_rtol: float = 0.0
    num_failed: int = 0
    fraction_failed: float = 0.0
    num_nan: int = 0
    num_nan_reference: int = 0
    reference_rms: float = 0.0
    min_cosine: float = 0.0
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: _json_value(v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class ParityReport:
    """All outputs of one comparison; ``str()`` renders a table.

    Example:
        >>> report = compare_outputs(torch.ones(3), torch.ones(3))
        >>> report.passed, str(report).splitlines()[0]
        (True, 'parity: compiled vs eager: PASS (1/1 outputs)')
    """

    outputs: list[OutputReport] = field(default_factory=list)
    what: str = "compiled"
    reference_name: str = "eager"
    structure_error: str | None = None
    #: How the reference computed, when it matters (e.g. "eager in strict fp32 (TF32 off for this call)").
    numerics: str | None = None

    @property
    def passed(self) -> bool:
        return self.structure_error is None and all(o.passed for o in self.outputs)

    def raise_for_failure(self) -> "ParityReport":
        """Raise :class:`VerificationError` carrying the table unless every output passed."""
        if not self.passed:
            raise VerificationError(str(self), report=self)
        return self

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "reference_name": self.reference_name, "passed": self.passed,
                "numerics": self.numerics, "structure_error": self.structure_error,
                "outputs": [o.to_json() for o in self.outputs]}

    def __str__(self) -> str:
        n_ok = sum(o.passed for o in self.outputs)
        n = len(self.outputs)
        counts = f"({n}/{n} outputs)" if self.passed else f"({n_ok}/{n} outputs pass)"
        lines = [f"parity: {self.what} vs {self.reference_name}: {'PASS' if self.passed else 'FAIL'} {counts}"]
        if self.structure_error:
            lines.append(self.structure_error)
        note = [f"reference numerics: {self.numerics}"] if self.numerics else []
        if not self.outputs:
            return "\n".join(lines + note)
        head = ["output", "dtype", "shape", "max abs", "mean abs", "p99 abs", "max rel", "p99 rel",
                "cosine", "min atol", "min rtol", "result"]
        rows = [head] + [_row(o) for o in self.outputs]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(lines + note)


def _row(o: OutputReport) -> list[str]:
    dtype = o.dtype if o.dtype == o.reference_dtype else f"{o.dtype} vs {o.reference_dtype}"
    shape = str(o.shape) if o.shape == o.reference_shape else f"{o.shape} vs {o.reference_shape}"
    nums = [_fmt(v) for v in (o.max_abs, o.mean_abs, o.p99_abs, o.max_rel, o.p99_rel)]
    # Cosine lives next to 1.0, where 3 significant digits would hide everything.
    cos = "-" if math.isnan(o.cosine) else f"{o.cosine:.6f}"
    result = "PASS" if o.passed else f"FAIL: {o.reason}"
    return [o.name, dtype, shape, *nums, cos, _fmt(o.min_atol), _fmt(o.min_rtol), result]


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3g}"


def _json_value(v: Any) -> Any:
    # Strict JSON has no NaN or Infinity.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return list(v) if isinstance(v, tuple) else v


def compare_outputs(actual: Any, reference: Any, *, rtol: PerOutput = None, atol: PerOutput = None,
                    tolerance: Tolerance | None = None, names: Sequence[str] | None = None,
                    what: str = "compiled", reference_name: str = "eager") -> ParityReport:
    """Compare two nests of tensors output by output.

    ``tolerance`` (a :class:`~torch_trt_module._core.numerics.Tolerance`, e.g. ``POLICY["fp16"]``)
    sets rtol, the absolute floor, the bar relative to the reference's rms and the cosine
    bound; without it the check is the plain elementwise one at rtol 1e-3 / atol 1e-5.
    ``rtol``/``atol`` override its rtol and floor, and may be ``{output_name: value}``.
    Names come from ``names`` or from each leaf's path: ``out`` for a lone tensor,
    ``[0]``, ``['b'][1][0]``, or a namedtuple's field name.

    Example:
        >>> ref = {"a": torch.tensor([1.0, 100.0])}
        >>> compare_outputs({"a": torch.tensor([1.0, 100.05])}, ref, atol=1e-5).passed
        True
        >>> compare_outputs(ref, ref, atol={"['a']": 0.0}).outputs[0].name
        "['a']"
    """
    a_leaves, a_spec = flatten(actual, what=what, allow_const=True)
    r_leaves, r_spec = flatten(reference, what=reference_name, allow_const=True)
    out_names = list(names) if names is not None else _leaf_names(r_spec)
    if len(out_names) != len(r_leaves):
        raise ValueError(f"names has {len(out_names)} entries but {reference_name} has {len(r_leaves)} outputs")
    tol = tolerance or Tolerance(DEFAULT_RTOL, DEFAULT_ATOL)
    rtols = _tolerances("rtol", rtol, tol.rtol, out_names)
    atols = _tolerances("atol", atol, tol.atol, out_names)
    report = ParityReport(what=what, reference_name=reference_name)
    if a_spec != r_spec or len(a_leaves) != len(r_leaves):
        report.structure_error = (
            f"structure differs: {what} returns {_describe(a_spec)} ({len(a_leaves)} tensors) "
            f"but {reference_name} returns {_describe(r_spec)} ({len(r_leaves)} tensors)")
        if len(a_leaves) != len(r_leaves):
            return report  # no way to pair leaves up
    report.outputs = [_compare_one(n, a, r, Tolerance(rt, at, tol.atol_rms, tol.min_cosine), what, reference_name)
                      for n, a, r, rt, at in zip(out_names, a_leaves, r_leaves, rtols, atols)]
    return report


def _tolerances(kind: str, value: PerOutput, default: float, names: list[str]) -> list[float]:
    if value is None:
        per = [default] * len(names)
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            # A typo in a name would otherwise silently fall back to the default.
            raise ValueError(f"{kind} names unknown outputs {unknown}; the outputs are {names}")
        per = [float(value.get(n, default)) for n in names]
    else:
        per = [float(value)] * len(names)
    for n, v in zip(names, per):
        if not v >= 0.0:
            raise ValueError(f"{kind} for output {n!r} is {v}; it must be a number >= 0")
    return per


def _leaf_names(spec: TreeSpec) -> list[str]:
    """Each leaf's path as Python would write it: ``out`` for a lone tensor, ``[0]``, ``['b'][1]``, ``.field``."""
    names = []
    for path in leaf_paths(spec):
        text = ""
        for kind, label in path:
            text += f"[{label!r}]" if kind == "key" else f"[{label}]" if kind == "index" else \
                (f".{label[1]}" if text else str(label[1]))
        names.append(text or "out")
    return names


def _describe(spec: TreeSpec, limit: int = 300) -> str:
    def rec(s: TreeSpec) -> str:
        if s.kind in ("tensor", "none", "const"):
            return {"tensor": "tensor", "none": "None"}.get(s.kind) or repr(s.value)
        parts = [rec(c) for c in s.children]
        if s.kind == "dict":
            body = "{" + ", ".join(f"{k!r}: {p}" for k, p in zip(s.keys, parts)) + "}"
        elif s.kind == "tuple":
            body = "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
        else:
            body = "[" + ", ".join(parts) + "]"
        return f"{s.cls_name.rpartition(':')[2]}{body}" if s.cls_name else body

    text = rec(spec)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compare_one(name: str, a: torch.Tensor, r: torch.Tensor, tol: Tolerance,
                 what: str, reference_name: str) -> OutputReport:
    a, r = a.detach().cpu(), r.detach().cpu()
    exact = not (a.is_floating_point() and r.is_floating_point())
    rtol, min_cosine, rms = tol.rtol, tol.min_cosine, 0.0
    if exact:
        rtol = atol = min_cosine = 0.0  # with OR-semantics, zero tolerances mean "exactly equal"
    else:
        finite_ref = r.to(torch.float64)
        finite_ref = finite_ref[torch.isfinite(finite_ref)]
        rms = float(finite_ref.square().mean().sqrt()) if finite_ref.numel() else 0.0
        atol = tol.atol_for(rms)
    base = dict(name=name, dtype=_dtype_str(a.dtype), reference_dtype=_dtype_str(r.dtype),
                shape=tuple(a.shape), reference_shape=tuple(r.shape), rtol=rtol, atol=atol,
                reference_rms=rms, min_cosine=min_cosine)
    reasons = []
    if a.dtype != r.dtype:
        reasons.append(f"dtype {base['dtype']} but reference has {base['reference_dtype']}")
    if a.shape != r.shape:
        reasons.append(f"shape {tuple(a.shape)} but reference has shape {tuple(r.shape)}")
        nan = float("nan")
        return OutputReport(**base, passed=False, reason="; ".join(reasons), **{
            k: nan for k in ("max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "mean_rel",
                             "median_rel", "p99_rel", "cosine", "min_atol", "min_rtol", "fraction_failed")})

    a64, r64 = a.to(torch.float64).numpy().ravel(), r.to(torch.float64).numpy().ravel()
    nan_a, nan_r = np.isnan(a64), np.isnan(r64)
    is_nan = nan_a | nan_r
    with np.errstate(invalid="ignore", divide="ignore"):
        abs_err = np.abs(a64 - r64)
        abs_err[a64 == r64] = 0.0  # inf - inf is NaN, yet equal infinities agree exactly
        rel_err = abs_err / np.abs(r64)
    rel_err[abs_err == 0.0] = 0.0
    rel_err[np.isnan(rel_err)] = np.inf  # inf / inf: a finite value against an infinite one
    if exact:
        # float64 cannot hold every int64, so equality is decided on the original values.
        bad = (a != r).numpy().ravel()
    else:
        bad = is_nan | ~((abs_err <= atol) | (rel_err <= rtol))
    num_failed, n = int(bad.sum()), a64.size
    n_nan = int(is_nan.sum())
    if num_failed > n_nan:
        how = "differ (exact comparison)" if exact else f"exceed both atol={atol:g} and rtol={rtol:g}"
        reasons.append(f"{num_failed - n_nan} of {n} elements ({(num_failed - n_nan) / n:.2%}) {how}")
    if n_nan:
        reasons.append(f"{n_nan} of {n} elements are NaN ({int(nan_a.sum())} in {what}, "
                       f"{int(nan_r.sum())} in {reference_name}); NaN never passes")

    abs_v, rel_v = abs_err[~is_nan], rel_err[~is_nan]
    stats: dict[str, float] = {
        "min_atol": math.inf if n_nan else _max(abs_v[rel_v > rtol]),
        "min_rtol": math.inf if n_nan else _max(rel_v[abs_v > atol]),
    }
    for kind, v in (("abs", abs_v), ("rel", rel_v)):
        stats.update({f"max_{kind}": _max(v), f"mean_{kind}": float(v.mean()) if v.size else 0.0,
                      f"median_{kind}": percentile(v, 50), f"p99_{kind}": percentile(v, 99)})
    finite = np.isfinite(a64) & np.isfinite(r64)
    cosine = _cosine(a64[finite], r64[finite])
    # The direction bound means something only for a reference above the absolute floor: an
    # output of random-init mobilenet_v3_small is ~2e-9, which fp16 rounds to 0 (cosine 0),
    # while every element is within atol of it.
    if cosine < min_cosine and rms > tol.atol:
        reasons.append(f"cosine similarity {cosine:.7f} < {min_cosine:g}")
    return OutputReport(**base, **stats, passed=not reasons, cosine=cosine,
                        num_failed=num_failed, fraction_failed=num_failed / n if n else 0.0,
                        num_nan=int(nan_a.sum()), num_nan_reference=int(nan_r.sum()),
                        reason="; ".join(reasons) or None)


def _max(x: np.ndarray) -> float:
    return float(x.max()) if x.size else 0.0


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """numpy's "linear" percentile, except that it returns inf rather than NaN next to inf (0 when empty)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return 0.0
    k = (x.size - 1) * q / 100.0
    lo = int(math.floor(k))
    hi = min(lo + 1, x.size - 1)
    part = np.partition(x, [lo, hi])
    low, high = float(part[lo]), float(part[hi])
    return low if low == high or k == lo else low + (high - low) * (k - lo)


def _cosine(a: np.ndarray, r: np.ndarray) -> float:
    na, nr = float(np.linalg.norm(a)), float(np.linalg.norm(r))
    if na == 0.0 or nr == 0.0:
        return 1.0 if na == nr else 0.0  # two zero vectors are identical; zero vs nonzero is not
    return float(np.clip(np.dot(a, r) / (na * nr), -1.0, 1.0))
