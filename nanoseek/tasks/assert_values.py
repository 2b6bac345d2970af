"""Values of the code reward's judge: the bounds, the types a sandbox report decodes to, and the
bounded builtins, ``math`` functions and methods the judge evaluates itself.

The floor of the assertion-test reward (overview: :mod:`nanoseek.tasks.code_reward`). Every
operation here is checked before it allocates: integers at :data:`MAX_INT_BITS` bits, sequences
and strings at :data:`MAX_LEN` items, sets and dicts built from a model value at
:data:`MAX_HASHED` elements; exceeding a bound raises :class:`EvalFailure` with the reason the
test fails for. :data:`PARENT_FUNCS` names the *parent-known* builtins and
:data:`BOUNDED_CALLS` maps each to its bounded call; :data:`MODULES` the names a test may import
genuinely (``math``, ``fractions``, ``decimal``, ``collections``). :class:`Materialised`,
:class:`Opaque` and :class:`Instance` stand for what the sandbox reports of an iterator, a type
and an object of a class the model defines.
"""

from __future__ import annotations

import ast
import collections
import decimal
import fractions
import math
import operator
import re
from typing import Any

MAX_LEN = 100_000        # items of a sequence / characters of a string built here
MAX_INT_BITS = 1 << 16   # bits of an integer built here
MAX_HASHED = 5_000       # elements of a set/dict decoded or built from a model value here


class EvalFailure(Exception):
    pass


class Materialised:
    """An iterator the model's code returned (a generator, ``map``...), materialised in the
    sandbox: iterable here, equal only to itself, like the iterator it stands for."""

    def __init__(self, items: list):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __repr__(self) -> str:
        return f"<iterator of {len(self.items)} items>"


class Opaque:
    """A type the sandbox reported by name only: it equals nothing but itself."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<type {self.name}>"


class Instance:
    """An object of a type that is not plain data (a class the model defines), reported by the
    qualified names of its type's MRO only: it is not ``None``, equals nothing but itself, is an
    instance of an :class:`Opaque` type of one of those names, and has no truth value here (its
    own ``__bool__`` is the model's, so ``assert f()`` on it fails)."""

    def __init__(self, mro: list[str]):
        self.mro = mro

    def __bool__(self) -> bool:
        raise EvalFailure(f"truth value of a {self.mro[0] if self.mro else '?'} object is not evaluated here")

    def __repr__(self) -> str:
        return f"<{self.mro[0] if self.mro else '?'} object>"


# ----------------------------------------------------------------------------- bounds


def _bits(x: Any) -> int:
    if type(x) is int or type(x) is bool:
        return int(x).bit_length()
    if type(x) is fractions.Fraction:
        return x.numerator.bit_length() + x.denominator.bit_length()
    return 64


def _sized(x: Any) -> int:
    if isinstance(x, Materialised):
        return len(x.items)
    try:
        return len(x)
    except (TypeError, OverflowError):
        if isinstance(x, range):
            raise EvalFailure("range too long") from None
        return 0


def check_bounds(x: Any) -> Any:
    """x, or EvalFailure when it exceeds the bounds (called on every result)."""
    if type(x) in (int, fractions.Fraction) and _bits(x) > MAX_INT_BITS:
        raise EvalFailure(f"integer over {MAX_INT_BITS} bits")
    if isinstance(x, (str, bytes, list, tuple, dict, set, frozenset)) and _sized(x) > MAX_LEN:
        raise EvalFailure(f"value over {MAX_LEN} items")
    return x


def _hashed(x: Any) -> Any:
    """x when hashing its elements here is bounded: equal-hash keys (``k * (2**61 - 1)``) make
    every insert scan the others, so a set/dict from a model value holds at most MAX_HASHED."""
    if _sized(iterable_of(x)) > MAX_HASHED:
        raise EvalFailure(f"set/dict over {MAX_HASHED} elements")
    return x


def iterable_of(x: Any) -> Any:
    """x when iterating it here is bounded (a sized value of at most MAX_LEN items)."""
    if isinstance(x, (str, bytes, list, tuple, dict, set, frozenset, range, Materialised)) or \
            type(x).__name__ in ("dict_keys", "dict_values", "dict_items"):
        if _sized(x) > MAX_LEN:
            raise EvalFailure(f"iterable over {MAX_LEN} items")
        return x
    raise EvalFailure(f"cannot iterate {type(x).__name__} here")


_NUMBERS = (bool, int, float, complex, fractions.Fraction, decimal.Decimal)
_WIDE_SPEC = re.compile(r"\d{4,}|\*")


def _format_spec_ok(spec: str) -> None:
    if _WIDE_SPEC.search(spec):
        raise EvalFailure("format width or precision too large")


def _percent(fmt: Any, args: Any) -> Any:
    for m in re.finditer(r"%[^%a-zA-Z]*" if isinstance(fmt, str) else rb"%[^%a-zA-Z]*", fmt):
        _format_spec_ok(m.group() if isinstance(fmt, str) else m.group().decode("latin-1"))
    for a in (args if isinstance(args, tuple) else (args,)):
        if isinstance(a, (dict, list, tuple, set, frozenset)) or (type(a) is int and _bits(a) > 4096):
            raise EvalFailure("%-formatting of a container or huge int is not evaluated here")
    return check_bounds(fmt % args)


def _mul(a: Any, b: Any) -> Any:
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (str, bytes, list, tuple)) and type(n) in (int, bool):
            if n > 0 and _sized(seq) * n > MAX_LEN:
                raise EvalFailure(f"repetition over {MAX_LEN} items")
            return seq * n
    if type(a) in (int, bool, fractions.Fraction) and type(b) in (int, bool, fractions.Fraction) \
            and _bits(a) + _bits(b) > MAX_INT_BITS:
        raise EvalFailure(f"product over {MAX_INT_BITS} bits")
    return a * b


def _pow(a: Any, b: Any, m: Any = None) -> Any:
    if m is not None:
        if not all(type(v) is int for v in (a, b, m)) or _bits(b) > 4096 or _bits(m) > 4096:
            raise EvalFailure("three-argument pow needs ints of at most 4096 bits")
        return pow(a, b, m)
    if type(b) in (int, bool) and b > 0 and type(a) in (int, bool, fractions.Fraction):
        if abs(a) > 1 and _bits(a) * b > MAX_INT_BITS:
            raise EvalFailure(f"power over {MAX_INT_BITS} bits")
    elif type(b) in (int, bool) and type(a) is fractions.Fraction and abs(b) > 64:
        raise EvalFailure("power of a fraction too large")
    elif type(a) is fractions.Fraction or type(b) is fractions.Fraction:
        if type(b) is fractions.Fraction and b.denominator != 1:
            return float(a) ** float(b)
    return a ** b


def _lshift(a: Any, b: Any) -> Any:
    if type(b) in (int, bool) and _bits(a) + b > MAX_INT_BITS:
        raise EvalFailure(f"shift over {MAX_INT_BITS} bits")
    return a << b


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes, list, tuple)) and _sized(a) + _sized(b) > MAX_LEN:
        raise EvalFailure(f"concatenation over {MAX_LEN} items")
    return a + b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes)):
        return _percent(a, b)
    return a % b


BINOPS = {ast.Add: _add, ast.Sub: operator.sub, ast.Mult: _mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: _mod, ast.Pow: _pow, ast.LShift: _lshift,
           ast.RShift: operator.rshift, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
           ast.BitXor: operator.xor}
COMPARE_OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
        ast.In: lambda a, b: a in iterable_of(b) if not isinstance(b, (str, bytes)) else a in b,
        ast.NotIn: lambda a, b: a not in (b if isinstance(b, (str, bytes)) else iterable_of(b))}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_,
          ast.Invert: operator.invert}

# ----------------------------------------------------------------------------- parent builtins

_KEY_FUNCS = (len, abs, str, int, float, bool, tuple, list, sorted, sum, min, max, ord, str.lower,
              str.upper, str.strip, str.casefold, chr, repr, None)


def _keyed(kw: dict) -> dict:
    for k, v in kw.items():
        if k == "key" and not any(v is f for f in _KEY_FUNCS):
            raise EvalFailure("only builtin key functions are evaluated here")
    return kw


def _consume(fn, allowed_kw=()):
    def call(*args, **kw):
        if set(kw) - set(allowed_kw):
            raise EvalFailure(f"{fn.__name__}() keyword not evaluated here")
        if args and not (fn in (min, max) and len(args) > 1):
            iterable_of(args[0])
        elif fn in (min, max):
            pass
        return check_bounds(fn(*args, **_keyed(kw)))
    return call


def _set_of(fn):
    def call(*args):
        if args:
            _hashed(args[0])
        return fn(*args)
    return call


def _sum(xs: Any, start: Any = 0) -> Any:
    iterable_of(xs)
    items = list(xs)
    if not all(isinstance(v, _NUMBERS) for v in items + [start]):
        raise EvalFailure("sum() of non-numbers is not evaluated here")
    return check_bounds(sum(items, start))


def _int(x: Any = 0, *base: Any) -> Any:
    if type(x) is decimal.Decimal and x.is_finite() and x.adjusted() > 1300:
        raise EvalFailure("int() of a huge Decimal")
    if isinstance(x, (str, bytes)) and len(x) > 5000:
        raise EvalFailure("int() of a long string")
    return check_bounds(int(x, *base))


def _str(x: Any = "", *rest: Any) -> Any:
    if isinstance(x, (list, tuple, dict, set, frozenset)):
        iterable_of(x)
    return check_bounds(str(x, *rest))


def _format(x: Any, spec: str = "") -> Any:
    _format_spec_ok(str(spec))
    return check_bounds(format(x, spec))


def _bytes(x: Any = b"", *rest: Any) -> Any:
    if type(x) is int and x > MAX_LEN:
        raise EvalFailure(f"bytes over {MAX_LEN}")
    if not isinstance(x, int):
        iterable_of(x)
    return check_bounds(bytes(x, *rest))


def _range(*a: Any) -> Any:
    if not all(type(v) in (int, bool) for v in a):
        raise EvalFailure("range() of non-ints")
    return range(*a)


def _map_filter(fn):
    def call(func, *its):
        if not any(func is f for f in _KEY_FUNCS):
            raise EvalFailure(f"{fn.__name__}() with a function other than a builtin is not evaluated here")
        for a in its:
            iterable_of(a)
        return Materialised(list(fn(func, *its)))
    return call


def _counter(*args: Any) -> Any:
    if args:
        _hashed(args[0])
    return collections.Counter(*args)


def _materialise(fn):
    def call(*args):
        for a in args:
            iterable_of(a)
        return Materialised(list(fn(*args)))
    return call


def _isinstance(x: Any, t: Any) -> bool:
    if isinstance(t, Opaque):  # a class the model defines: by the reported value's MRO names
        return isinstance(x, Instance) and t.name in x.mro
    if isinstance(t, tuple) and any(isinstance(e, Opaque) for e in t):
        return any(_isinstance(x, e) for e in t)
    return isinstance(x, t)


def _factorial(n: Any) -> Any:
    if type(n) is not int or n > 3000:
        raise EvalFailure("factorial argument too large")
    return math.factorial(n)


def _comb(n: Any, k: Any) -> Any:
    if type(n) is not int or n > 5000:
        raise EvalFailure("comb/perm argument too large")
    return math.comb(n, k)


def _perm(n: Any, k: Any = None) -> Any:
    if type(n) is not int or n > 3000:
        raise EvalFailure("comb/perm argument too large")
    return math.perm(n, k)


def _round(x: Any, *n: Any) -> Any:
    if n and n[0] is not None and (type(n[0]) is not int or abs(n[0]) > 400):
        raise EvalFailure("round() digits out of range")
    return round(x, *n)


def _prod(xs: Any, **kw: Any) -> Any:
    iterable_of(xs)
    if sum(_bits(v) for v in xs) > MAX_INT_BITS:
        raise EvalFailure(f"product over {MAX_INT_BITS} bits")
    return check_bounds(math.prod(xs, **kw))


def _isqrt(n: Any) -> Any:
    return math.isqrt(check_bounds(n))


def _dict(*args: Any, **kw: Any) -> Any:
    if args:
        _hashed(args[0])
    return check_bounds(dict(*args, **kw))


def _type(x: Any) -> Any:
    return type(x)


def _repr(x: Any) -> Any:
    return _str(x) if not isinstance(x, str) else check_bounds(repr(x))


# name -> the real builtin (what `type(x) == int` compares with) and real -> its bounded call
PARENT_FUNCS: dict[str, Any] = {n: getattr(__import__("builtins"), n) for n in (
    "abs all any bin bool bytes chr complex dict divmod enumerate float format frozenset hex int "
    "isinstance len list max min oct ord pow range repr reversed round set sorted str sum tuple "
    "type zip map filter").split()}
BOUNDED_CALLS: dict[Any, Any] = {
    abs: abs, all: _consume(all), any: _consume(any), bin: bin, bool: bool, chr: chr,
    complex: complex, dict: _dict, divmod: divmod, enumerate: _materialise(enumerate),
    float: float, format: _format, frozenset: _set_of(frozenset), hex: hex, int: _int,
    isinstance: _isinstance, len: len, list: _consume(list), max: _consume(max, ("key", "default")),
    min: _consume(min, ("key", "default")), oct: oct, ord: ord, pow: _pow, range: _range,
    reversed: _materialise(reversed), round: _round, set: _set_of(set),
    sorted: _consume(sorted, ("key", "reverse")), str: _str, sum: _sum, tuple: _consume(tuple),
    type: _type, zip: _materialise(zip), bytes: _bytes, repr: _repr,
    math.isqrt: _isqrt, math.factorial: _factorial, math.comb: _comb, math.perm: _perm,
    math.prod: _prod, map: _map_filter(map), filter: _map_filter(filter),
    collections.Counter: _counter, collections.OrderedDict: _dict,
}
PARENT_VALUES = {"True": True, "False": False, "None": None}
MATH = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf, "nan": math.nan,
         "isclose": math.isclose, "sqrt": math.sqrt, "floor": math.floor, "ceil": math.ceil,
         "fabs": math.fabs, "gcd": math.gcd, "lcm": math.lcm, "log": math.log, "log2": math.log2,
         "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
         "atan2": math.atan2, "hypot": math.hypot, "isqrt": math.isqrt, "factorial": math.factorial,
         "comb": math.comb, "perm": math.perm, "trunc": math.trunc, "isnan": math.isnan, "isinf": math.isinf,
         "isfinite": math.isfinite, "copysign": math.copysign, "prod": math.prod,
         "dist": math.dist, "degrees": math.degrees, "radians": math.radians}
MODULES = {"math": MATH, "fractions": {"Fraction": fractions.Fraction},
            "decimal": {"Decimal": decimal.Decimal},
            "collections": {"Counter": collections.Counter, "OrderedDict": collections.OrderedDict}}

_METHODS = {
    str: {"lower", "upper", "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines",
          "startswith", "endswith", "find", "rfind", "index", "rindex", "count", "replace", "join",
          "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper", "istitle", "isdecimal",
          "isnumeric", "title", "capitalize", "casefold", "swapcase", "center", "ljust", "rjust",
          "zfill", "partition", "rpartition", "encode", "removeprefix", "removesuffix", "format"},
    bytes: {"decode", "hex", "lower", "upper", "strip", "split", "startswith", "endswith",
            "count", "find", "replace", "join"},
    list: {"count", "index", "copy"}, tuple: {"count", "index"},
    dict: {"get", "keys", "values", "items", "copy"},
    set: {"union", "intersection", "difference", "symmetric_difference", "issubset",
          "issuperset", "isdisjoint", "copy"},
    frozenset: {"union", "intersection", "difference", "symmetric_difference", "issubset",
                "issuperset", "isdisjoint", "copy"},
    int: {"bit_length", "bit_count"}, float: {"is_integer", "hex"},
}
ALL_METHODS = set().union(*_METHODS.values())
_FORMAT_FIELD = re.compile(r"\{\{|\}\}|\{(\d*)(?:![rsa])?(?::([^{}]*))?\}")


def call_method(recv: Any, name: str, args: list, kw: dict) -> Any:
    if name not in _METHODS.get(type(recv), ()):
        raise EvalFailure(f"{type(recv).__name__}.{name}() is not evaluated here")
    if _sized(recv) > MAX_LEN or any(isinstance(a, (str, bytes)) and len(a) > MAX_LEN for a in args):
        raise EvalFailure(f"method operand over {MAX_LEN} items")
    if name in ("center", "ljust", "rjust", "zfill") and args and \
            (type(args[0]) is not int or args[0] > MAX_LEN):
        raise EvalFailure(f"width over {MAX_LEN}")
    if name == "join":
        iterable_of(args[0] if args else None)
        if sum(_sized(v) for v in args[0]) + _sized(recv) * _sized(args[0]) > MAX_LEN:
            raise EvalFailure(f"join over {MAX_LEN} characters")
    if name == "replace" and len(args) >= 2:
        n = recv.count(args[0]) if args[0] else _sized(recv) + 1
        if _sized(recv) + n * _sized(args[1]) > MAX_LEN:
            raise EvalFailure(f"replace over {MAX_LEN} characters")
    if name == "format":
        rest = _FORMAT_FIELD.sub("", recv)
        if "{" in rest or "}" in rest:
            raise EvalFailure("only positional {} fields are formatted here")
        for m in _FORMAT_FIELD.finditer(recv):
            _format_spec_ok(m.group(2) or "")
        for a in list(args) + list(kw.values()):
            if isinstance(a, (list, tuple, dict, set, frozenset)):
                iterable_of(a)
    if name in ("union", "intersection", "difference", "symmetric_difference"):
        for a in args:
            iterable_of(a)
    return check_bounds(getattr(recv, name)(*args, **kw))


__all__ = ["MAX_LEN", "MAX_INT_BITS", "MAX_HASHED", "EvalFailure", "Materialised", "Opaque", "Instance", "check_bounds", "iterable_of", "PARENT_FUNCS", "PARENT_VALUES", "BOUNDED_CALLS", "MATH", "MODULES", "ALL_METHODS", "BINOPS", "COMPARE_OPS", "UNARY_OPS", "call_method"]
