"""The ``calculator`` built-in: exact arithmetic on one expression, safely.

The expression is parsed with :mod:`ast` (never ``eval``) and only these nodes are evaluated:
integer and decimal literals, ``+ - * / // % **`` (``^`` also means ``**``), unary ``+ -`` and
parentheses. Integers stay exact (Python ints); ``/`` gives an exact integer when the division is
exact and a float otherwise; floats print with 12 significant digits. ``×``, ``÷``, ``−`` and
digits of other scripts (``１２``, ``١٢``) are read as their ASCII forms; any other non-ASCII
character, a name, call, attribute, comparison, string, boolean or complex number is refused.

Bounds keep a hostile expression cheap: at most :data:`MAX_CHARS` characters and
:data:`MAX_NODES` syntax nodes (deep nesting is refused by the parser or by the node count),
exponents of magnitude at most :data:`MAX_EXPONENT` (``10**10**10`` never computes), every
integer literal and intermediate result at most :data:`MAX_DIGITS` digits, every float finite
and real (``1e400``, ``1e308*10`` and ``(-8)**(1/3)`` are refused). Any other input is a
:class:`CalculatorError` (a :class:`~nanoseek.tools.tool.ToolError`) with one line saying why;
the model reads it as the tool's output.
"""

from __future__ import annotations

import ast
import math
import unicodedata

from .tool import ToolError

MAX_CHARS = 200
MAX_NODES = 100
MAX_EXPONENT = 64
MAX_DIGITS = 60

SPEC = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression exactly: integers and decimals, + - * / // % ** and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                   "description": "e.g. (347 * 829) - 12"}},
                   "required": ["expression"]}}}


class CalculatorError(ToolError, ValueError):
    """An expression the calculator refuses or cannot evaluate (one line saying why)."""


_LIMIT = 10 ** MAX_DIGITS
_SYMBOLS = {"×": "*", "÷": "/", "−": "-", "\n": " ", "\r": " ", "\t": " "}
_REFUSED = {ast.Name: "names are not allowed", ast.Call: "function calls are not allowed",
            ast.Attribute: "attributes are not allowed", ast.Compare: "comparisons are not allowed",
            ast.BoolOp: "'and'/'or' are not allowed", ast.Tuple: "commas are not allowed (write 1000, not 1,000)",
            ast.Lambda: "lambdas are not allowed", ast.Subscript: "indexing is not allowed"}


def _check(value):
    if isinstance(value, complex):
        raise CalculatorError("result is not a real number")
    if isinstance(value, int) and not -_LIMIT < value < _LIMIT:
        raise CalculatorError(f"a number has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise CalculatorError(f"only numbers are allowed, got {node.value!r}"[:120])
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return v if isinstance(node.op, ast.UAdd) else -v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left), _eval(node.right)
        op = node.op
        try:
            if isinstance(op, ast.Add):
                return _check(a + b)
            if isinstance(op, ast.Sub):
                return _check(a - b)
            if isinstance(op, ast.Mult):
                return _check(a * b)
            if isinstance(op, ast.Div):
                if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
                    return a // b
                return _check(a / b)
            if isinstance(op, ast.FloorDiv):
                return _check(a // b)
            if isinstance(op, ast.Mod):
                return _check(a % b)
            if isinstance(op, ast.Pow):
                if abs(b) > MAX_EXPONENT:
                    raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
                return _check(a ** b)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    why = _REFUSED.get(type(node)) or f"unsupported syntax: {type(node).__name__}"
    raise CalculatorError(why + (f" ({node.id!r})" if isinstance(node, ast.Name) else ""))


def _ascii(expression: str) -> str:
    """The expression with ``× ÷ −``, whitespace and other scripts' digits in ASCII; refuses any
    other non-ASCII character."""
    if expression.isascii() and "\t" not in expression and "\n" not in expression and "\r" not in expression:
        return expression
    out = []
    for ch in expression:
        if ch in _SYMBOLS:
            out.append(_SYMBOLS[ch])
        elif ch.isascii():
            out.append(ch)
        elif unicodedata.decimal(ch, None) is not None:
            out.append(str(unicodedata.decimal(ch)))
        else:
            raise CalculatorError(f"unsupported character {ch!r} (U+{ord(ch):04X})")
    return "".join(out)


def evaluate(expression: str):
    """The value of ``expression`` (int or float); :class:`CalculatorError` otherwise."""
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    expression = _ascii(expression).strip()
    if not expression:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("not an arithmetic expression") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    return _eval(tree)


def format_value(value) -> str:
    """How the tool prints a value: ints as digits, floats with up to 12 significant digits."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def calculator(expression: str) -> str:
    """The tool: the value of ``expression`` as text."""
    return format_value(evaluate(expression))
