"""The ``calculator`` built-in: exact arithmetic on one expression, safely.

The expression is parsed with :mod:`ast` and only these nodes are evaluated: integer and decimal
literals, ``+ - * / // % **``, unary ``+ -`` and parentheses. Integers stay exact (Python ints);
``/`` gives an exact integer when the division is exact and a float otherwise. Bounds keep a
hostile expression cheap: at most :data:`MAX_CHARS` characters and :data:`MAX_NODES` nodes,
exponents at most :data:`MAX_EXPONENT`, integer results at most :data:`MAX_DIGITS` digits. Any
other input is a :class:`CalculatorError` with one line saying why (the model reads it as the
tool's output).
"""

from __future__ import annotations

import ast
import math

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


class CalculatorError(ValueError):
    pass


def _check(value):
    if isinstance(value, int) and abs(value) >= 10 ** MAX_DIGITS:
        raise CalculatorError(f"result has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
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
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def evaluate(expression: str):
    """The value of ``expression`` (int or float); :class:`CalculatorError` otherwise."""
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    expression = expression.strip()
    if not expression:
        raise CalculatorError("empty expression")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
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
