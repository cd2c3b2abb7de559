"""Output shapes from input shapes, for ONNX Runtime's runner: the exporter's symbolic dim
expressions (``2*s0``, ``(s1 - 1)//2 + 1``) evaluated safely, without ``eval``."""

from __future__ import annotations

import ast
import operator
from typing import Callable, Sequence

from .._core.spec import TensorSpec

__all__ = ["shape_function"]


_BINOPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_FUNCS: dict[str, Callable[..., int]] = {"Max": max, "Min": min, "max": max, "min": min,
                                         "floor": lambda v: int(v), "FloorDiv": operator.floordiv,
                                         "CeilToInt": lambda v: int(-(-v // 1)), "ceiling": lambda v: int(-(-v // 1))}


def _compile_dim(expr: str) -> Callable[[dict[str, int]], int] | None:
    """A safe evaluator for exporter dim expressions like ``2*s0`` or ``(s1 - 1)//2 + 1``.

    Metadata can come from disk, so this never calls ``eval``; anything outside
    integer arithmetic on known names returns None (the shape is then data-dependent).
    """
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None

    def ev(node: ast.AST, env: dict[str, int]) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left, env), ev(node.right, env))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand, env)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            return int(_FUNCS[node.func.id](*(ev(a, env) for a in node.args)))
        raise KeyError(ast.dump(node))

    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in _FUNCS}
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Constant, ast.Name, ast.BinOp, ast.UnaryOp, ast.Call, ast.Load,
                               ast.USub, *_BINOPS))
        if not ok or (isinstance(node, ast.Constant) and not isinstance(node.value, int)):
            return None
    del names
    return lambda env: ev(tree, env)


def shape_function(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
                   ) -> Callable[[Sequence[tuple[int, ...]]], list[tuple[int, ...] | None]]:
    """Map input shapes to output shapes (None for an output whose shape depends on data)."""
    symbols: dict[str, tuple[int, int]] = {}
    for i, spec in enumerate(inputs):
        for d, dim in enumerate(spec.dims):
            if isinstance(dim, str):
                symbols.setdefault(dim, (i, d))
    plans: list[list[Callable[[dict[str, int]], int]] | None] = []
    for spec in outputs:
        plan: list[Callable[[dict[str, int]], int]] | None = []
        for dim in spec.dims:
            if isinstance(dim, int):
                plan.append(lambda env, v=dim: v)  # type: ignore[misc]
                continue
            fn = _compile_dim(dim)
            if fn is None or plan is None:
                plan = None
                break
            plan.append(fn)
        plans.append(plan)

    def resolve(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...] | None]:
        env = {name: shapes[i][d] for name, (i, d) in symbols.items()}
        out: list[tuple[int, ...] | None] = []
        for plan in plans:
            try:
                out.append(None if plan is None else tuple(f(env) for f in plan))
            except (KeyError, ZeroDivisionError, TypeError):
                out.append(None)
        return out

    return resolve


# --------------------------------------------------------------------------- the runner
