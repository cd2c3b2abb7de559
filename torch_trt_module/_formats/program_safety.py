"""What a stored torch.export program may say, checked before torch's deserializer reads it.

torch.export's deserializer is not safe on untrusted input, though it reads JSON:

- symbolic shapes (``expr_str``) go through ``sympy.sympify``, which is ``eval``;
- ``guards_code`` is ``exec``'d when ``ExportedProgram.module()`` builds its guard function,
  and a placeholder's string value is pasted into that code unescaped;
- node targets (and ``as_operator`` arguments) are resolved by ``getattr`` from ``torch``,
  ``math`` and ``operator``: ``torch.os.system`` is a "target" too, called at forward;
- node names, placeholder targets and attribute paths become Python source when FX generates
  the graph module's code.

So every string of the serialized program is checked here, with ``json`` (which runs no code)
and Python's ``ast`` (which parses and never evaluates): an evaluated string must pass a strict
grammar (:func:`check_expr`, :func:`check_guard`, :func:`check_target`), a string torch only
stores (a stack trace, a string argument, which FX writes with ``repr``) may be any text, and
every other string must be a plain name. Anything else raises
:class:`~torch_trt_module.EngineLoadError` before torch sees the program.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from .._errors import EngineLoadError

__all__ = ["check_expr", "check_guard", "check_program_json", "check_target"]

# Free text: stored by torch, never evaluated, never pasted into generated code.
_TEXT_KEYS = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "custom", "as_string",
                        "as_strings", "torch_version", "from_node", "scope"})
# A plain name: identifiers, attribute paths ("lin.weight", "layers.0.conv"), device types.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,499}")
# Attribute paths of the model's weights and submodules may hold any character a ModuleDict key can
# ("blocks.layer 1.weight"): FX writes them as getattr(self, "...") strings, so quotes, backslashes
# and control characters are what must not be there.
_PATH_KEYS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"})
_PATH_RE = re.compile(r"[^\"'\\\x00-\x1f\x7f]{0,500}")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_DUNDER_RE = re.compile(r"__\w*__")
_SYMBOL_RE = re.compile(r"[a-z_]{1,8}[0-9]{1,9}")
_FLOAT_RE = re.compile(r"-?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?(?:e[-+]?[0-9]{1,3})?|inf|nan)", re.IGNORECASE)

# sympy's own classes (what ``srepr`` writes) and torch's (the deserializer's ``sympy_functions``).
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Min", "Max", "floor", "ceiling", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity"})
_SYMPY_NAMES = frozenset({"oo", "int_oo", "true", "false", "nan", "zoo"})
_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                          "zero", "nonzero", "even", "odd", "commutative", "extended_real", "rational"})
# Calls whose second argument is an exponent: a literal one, and small, so that parsing cannot
# be made to compute 10**(10**9).
_POWERS = frozenset({"Pow", "PowByNatural", "LShift"})
_MAX_EXPONENT = 64
_MAX_INT_DIGITS = 40
_MAX_EXPR_CHARS = 100_000

_OPERATOR_TARGETS = frozenset({"getitem", "add", "sub", "mul", "floordiv", "mod", "truediv", "pow", "neg", "pos",
                               "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "lshift", "rshift", "abs"})
_MATH_TARGETS = frozenset({"ceil", "floor", "trunc", "sqrt"})
_TORCH_TARGETS = frozenset({"sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "sym_not",
                            "sym_sum"})
# Higher-order operators that only run the graphs they are given.
_HIGHER_ORDER = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast", "cond", "while_loop", "map_impl",
                           "scan"})
# ATen's operators named after Python's (aten::__and__.Tensor); no other dunder may be looked up.
_DUNDER_OPS = frozenset(f"__{op}__" for base in ("and", "or", "xor", "lshift", "rshift") for op in (base, f"i{base}"))
_OP_RE = re.compile(r"torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?")

# A guard is Python over the inputs' sizes: L['x'].size()[0] == L['y'].size()[0], L['x'].size()[1] <= 64.
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_CALLS = frozenset({"min", "max", "abs", "int", "float"})
_GUARD_MATH = frozenset({"floor", "ceil", "trunc", "sqrt", "isnan", "inf"})
_GRAPH_INPUTS = frozenset({"as_tensor", "as_sym_int", "as_sym_float", "as_sym_bool", "as_int", "as_float",
                           "as_bool", "as_none", "as_token"})
_TREE_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})


class _Refused(Exception):
    """Why a string of the program is refused (becomes EngineLoadError naming where)."""


# --------------------------------------------------------------------------- grammars

def _parse(text: str, what: str) -> ast.expr:
    if not isinstance(text, str) or len(text) > _MAX_EXPR_CHARS:
        raise _Refused(f"{what} is not a string of at most {_MAX_EXPR_CHARS} characters")
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _Refused(f"{what} {text[:120]!r} is not an expression ({type(e).__name__})") from None


def _int_literal(node: ast.expr) -> int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _int_literal(node.operand)
        return None if value is None else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer"
            and len(node.args) == 1 and not node.keywords):
        return _int_literal(node.args[0])
    return None


def check_expr(text: str) -> None:
    """Refuse (``_Refused``) a symbolic expression that is more than sympy's arithmetic on integers and
    shape symbols: ``Symbol('s0', positive=True, integer=True)``, ``Mul(Integer(4), Symbol('s1'))``,
    ``s0 + 2*s1``, ``Max(1, FloorDiv(s0, 2))``. Names of anything else, attributes, subscripts,
    lambdas and strings other than a symbol's name are refused."""
    _expr(_parse(text, "symbolic expression"), text)


def _expr(node: ast.expr, text: str) -> None:
    if isinstance(node, ast.Constant):
        if type(node.value) is int and len(str(abs(node.value))) <= _MAX_INT_DIGITS:
            return
        if type(node.value) is float:
            return
        raise _Refused(f"symbolic expression {text[:120]!r} holds the constant {str(node.value)[:40]!r}")
    if isinstance(node, ast.Name):
        if node.id in _SYMPY_NAMES or _SYMBOL_RE.fullmatch(node.id):
            return
        raise _Refused(f"symbolic expression {text[:120]!r} names {node.id!r}, which is not a shape symbol")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _expr(node.operand, text)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)):
        _expr(node.left, text)
        return _expr(node.right, text)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS:
        name = node.func.id
        for kw in node.keywords:
            ok = kw.arg in _ASSUMPTIONS and isinstance(kw.value, ast.Constant) and type(kw.value.value) is bool
            ok = ok or (name == "Float" and kw.arg == "precision" and _int_literal(kw.value) is not None)
            if not ok:
                raise _Refused(f"symbolic expression {text[:120]!r}: {name}() takes no argument {kw.arg!r} here")
        if name in ("Symbol", "Float"):
            pattern = _SYMBOL_RE if name == "Symbol" else _FLOAT_RE
            arg = node.args[0] if len(node.args) == 1 else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and pattern.fullmatch(arg.value):
                return None
            raise _Refused(f"symbolic expression {text[:120]!r}: {name}() must name a shape symbol (s0, u1) or a "
                           "number")
        if name in _POWERS and len(node.args) == 2:
            exponent = _int_literal(node.args[1])
            if exponent is None or abs(exponent) > _MAX_EXPONENT:
                raise _Refused(f"symbolic expression {text[:120]!r}: {name}() takes a literal exponent of at most "
                               f"{_MAX_EXPONENT}")
        for arg in node.args:
            _expr(arg, text)
        return None
    raise _Refused(f"symbolic expression {text[:120]!r} holds {type(node).__name__} "
                   f"{ast.unparse(node)[:60]!r}, which is not integer arithmetic on shape symbols")


def check_guard(text: str) -> None:
    """Refuse a guard that is more than comparisons and arithmetic over the inputs' sizes, as
    ``L['x'].size()[0] == L['y'].size()[0]``."""
    _guard(_parse(text, "guard"), text)


def _source(node: ast.expr, text: str) -> None:
    """``L['x']``, ``L['x'].size()[0]``, ``L['x'].stride()[1]``: where a guard reads a value."""
    if isinstance(node, ast.Subscript):
        key = node.slice
        ok = isinstance(key, ast.Constant) and (type(key.value) is int or (
            isinstance(key.value, str) and _IDENT_RE.fullmatch(key.value) is not None))
        if not ok:
            raise _Refused(f"guard {text[:120]!r} indexes with {ast.unparse(key)[:40]!r}")
        if isinstance(node.value, ast.Name) and node.value.id == "L":
            return
        return _source(node.value, text)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _GUARD_METHODS
            and not node.args and not node.keywords):
        return _source(node.func.value, text)
    raise _Refused(f"guard {text[:120]!r} reads {ast.unparse(node)[:60]!r}, which is not an input's size")


def _guard(node: ast.expr, text: str) -> None:
    if isinstance(node, ast.Compare):
        if not all(isinstance(op, (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for op in node.ops):
            raise _Refused(f"guard {text[:120]!r} compares with something other than == != < <= > >=")
        for part in (node.left, *node.comparators):
            _guard(part, text)
        return
    if isinstance(node, ast.BoolOp):
        for part in node.values:
            _guard(part, text)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
        return _guard(node.operand, text)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod,
                                                            ast.Div)):
        _guard(node.left, text)
        return _guard(node.right, text)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        if type(node.value) is int and len(str(abs(node.value))) > _MAX_INT_DIGITS:
            raise _Refused(f"guard {text[:120]!r} holds a {len(str(node.value))}-digit constant")
        return
    if isinstance(node, ast.Name) and node.id == "inf":
        return
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math" \
            and node.attr == "inf":
        return
    if isinstance(node, ast.Call) and not node.keywords:
        f = node.func
        named = isinstance(f, ast.Name) and f.id in _GUARD_CALLS
        mathematical = (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math"
                        and f.attr in _GUARD_MATH)
        if named or mathematical:
            for arg in node.args:
                _guard(arg, text)
            return
    return _source(node, text)


def check_target(target: str) -> None:
    """Refuse a node target other than a registered operator (``torch.ops.aten.add.Tensor``) or one of
    the few Python functions torch.export writes for symbolic sizes (``_operator.mul``, ``math.ceil``,
    ``torch.sym_max``)."""
    if not isinstance(target, str):
        raise _Refused(f"node target {target!r} is not a string")
    m = _OP_RE.fullmatch(target)
    if m is not None:
        namespace, op, overload = m.groups()
        plain = not _DUNDER_RE.fullmatch(namespace) and not (overload and _DUNDER_RE.fullmatch(overload))
        if plain and (not _DUNDER_RE.fullmatch(op) or op in _DUNDER_OPS) and (
                overload is not None or (namespace == "higher_order" and op in _HIGHER_ORDER)):
            return
    module, _, name = target.partition(".")
    allowed = {"_operator": _OPERATOR_TARGETS, "math": _MATH_TARGETS, "torch": _TORCH_TARGETS}.get(module, ())
    if name in allowed:
        return
    raise _Refused(f"node target {target[:120]!r} is not an operator (torch.ops.<namespace>.<op>.<overload>) or "
                   "a symbolic-size function")


def _check_token(value: str, where: str) -> None:
    if value in ("", "Infinity", "-Infinity", "NaN") or (_TOKEN_RE.fullmatch(value) and not any(_DUNDER_RE.fullmatch(p) for p in value.split("."))):
        return
    raise _Refused(f"{where} is {value[:120]!r}; expected a plain name ([A-Za-z0-9_.-], no __dunder__ parts)")


def _check_treespec(text: Any, where: str) -> None:
    """A pytree spec (JSON): tuples, lists and dicts of leaves, dict keys being plain data."""
    try:
        spec = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        spec = None
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], dict)):
        raise _Refused(f"{where} is not a pytree spec")
    stack = [spec[1]]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or node.get("type") not in _TREE_TYPES:
            kind = node.get("type") if isinstance(node, dict) else node
            raise _Refused(f"{where} holds a {str(kind)[:80]!r} node; expected tuples, lists, dicts and leaves")
        context = node.get("context")
        if node.get("type") in ("builtins.dict", "collections.OrderedDict"):
            try:
                keys = json.loads(context)
            except (TypeError, ValueError, RecursionError):
                keys = None
            if not (isinstance(keys, list) and all(type(k) in (str, int) for k in keys)):
                raise _Refused(f"{where}: a dict's keys are not a list of strings and integers")
        elif context not in (None, "null"):
            raise _Refused(f"{where}: a {node.get('type')} node has a context")
        stack.extend(node.get("children_spec") or [])


def check_program_json(raw: bytes, *, source: str) -> None:
    """Raise :class:`EngineLoadError` unless the serialized program ``raw`` (torch.export's JSON) says
    nothing that torch would evaluate beyond the grammars above."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise EngineLoadError(f"{source}: the stored PyTorch program is not JSON ({type(e).__name__}); the file is "
                              "corrupt or was not written by torch_trt_module") from None
    try:
        _walk(doc)
    except _Refused as e:
        raise EngineLoadError(f"{source}: refused to read the stored PyTorch program: {e}. torch.export would "
                              "evaluate it as code, and torch_trt_module never writes it; the file was made or "
                              "edited by someone else. Do not use it: compile the model again") from None


def _walk(doc: Any) -> None:
    stack: list[tuple[Any, str]] = [(doc, "the program")]
    while stack:
        value, key = stack.pop()
        if isinstance(value, str):
            _check_token(value, f"the value of {key!r}")
        elif isinstance(value, list):
            stack.extend((v, key) for v in value)
        elif isinstance(value, dict):
            is_node = "target" in value and "outputs" in value
            if "nodes" in value and isinstance(value.get("inputs"), list):  # a graph: what its placeholders are
                for inp in value["inputs"]:
                    if not (isinstance(inp, dict) and len(inp) == 1 and next(iter(inp)) in _GRAPH_INPUTS):
                        raise _Refused(f"a graph input is {str(inp)[:80]!r}; expected a tensor or a number")
            for k, v in value.items():
                if key == "range_constraints":  # a symbol ("s0"), or a derived size ("2*s0")
                    check_expr(k)
                else:
                    _check_token(k, f"the key {k[:40]!r}")
                if k in _TEXT_KEYS:
                    continue
                if k == "expr_str":
                    check_expr(v)
                elif k == "guards_code":
                    for guard in v if isinstance(v, list) else [v]:
                        check_guard(guard)
                elif k == "as_operator" or (k == "target" and is_node):
                    check_target(v)
                elif k in ("in_spec", "out_spec"):
                    _check_treespec(v, k)
                elif k in _PATH_KEYS and isinstance(v, str):
                    if not _PATH_RE.fullmatch(v) or any(_DUNDER_RE.fullmatch(p) for p in v.split(".")):
                        raise _Refused(f"the attribute path {v[:120]!r} holds a quote, a backslash, a control "
                                       "character or a __dunder__ part")
                else:
                    stack.append((v, k))
        elif value is not None and type(value) not in (int, float, bool):
            raise _Refused(f"the value of {key!r} is a {type(value).__name__}")
