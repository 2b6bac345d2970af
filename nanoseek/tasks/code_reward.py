"""Assertion tests for the code reward: this process judges, the sandbox only computes.

:mod:`nanoseek.tasks.rewards` scores a ``{"tests": [...]}`` record with the functions here. An
assertion test (``assert add(2, 3) == 5``) is never run as written. :func:`compile_assert_test`
splits every ``assert`` into a *plan* that this trusted process evaluates and *slots*, the
sub-expressions that depend on the model's code, which alone run in the sandbox.

What runs where:

* A name is *parent-known* when this process evaluates it itself: the builtins in
  :data:`PARENT_FUNCS` (``int float str list tuple set dict range len sorted abs min max sum round
  type isinstance all any pow divmod zip reversed enumerate ...``), ``True``/``False``/``None``,
  ``math`` and its pure functions and constants, ``fractions.Fraction``, ``decimal.Decimal``,
  ``collections.Counter``/``OrderedDict`` when the test imports them, ``map``/``filter`` with a
  builtin function, and a name the test binds once at its top level to a
  parent-evaluable value (``CASES = [(1, 2, 3)]``: the sandbox never runs that assignment).
  Every other name (``add``, a helper or variable the test defines) is evaluated in the sandbox.
* The model's code cannot take a parent-known name over: a ``def abs``, ``isinstance = ...``, a
  fake ``math`` module or ``if False: sorted = 1`` in the code leaves the test (here and in the
  sandbox) with the real one, so a shadowing builtin cannot turn ``abs(f(1) - 2.5) < 1e-9`` into
  a question the code answers itself. The one exception is the record's ``entry_point`` (a name
  or a list): a task whose function is called ``sum`` names it there, and then ``sum`` is always
  the code's (a slot; a NameError in the sandbox when the code never defines it).
* Every sub-expression free of names other than parent-known ones (literals, containers,
  arithmetic, comparisons, ``and``/``or``/``not``, conditional expressions, subscripts, the
  functions above and allow-listed methods of ``str``/``bytes``/``list``/``tuple``/``dict``/
  ``set``: ``'ABC'.lower()``, ``[0] * 3``, ``10 ** 9 + 7``, ``int('42')``, ``float('inf')``,
  ``list(range(3))``, ``Fraction(1, 2)``) is evaluated here and never enters the sandbox. So are
  the parent-evaluable parts around a slot: in ``sorted(f(3)).index(2) == 2 * 1`` only ``f(3)``
  runs in the sandbox.
* ``for`` loops (at any statement level) and comprehensions whose iterable is parent-evaluable
  are unrolled here (at most :data:`MAX_UNROLL` copies per test): ``for a, b, c in [(1, 2, 3)]:
  assert add(a, b) == c`` becomes ``assert add(1, 2) == 3``, so the sandbox sees ``add(1, 2)``
  and this process compares with ``3``; ``all(f(x) == 2 * x for x in [1, 2])`` becomes
  ``all([f(1) == 2, f(2) == 4])``. A loop body with ``break``/``continue`` or that rebinds its
  target is not unrolled. A comprehension over a model value (``all(x > 0 for x in f(3))``)
  is evaluated here over the reported data: only ``f(3)`` runs in the sandbox. Inside a slot,
  every parent-evaluable part is replaced by its literal value (``add(*CASES[0][:2])`` runs as
  ``add(*(2, 3))``), so the sandbox gets the inputs only.
* Every operation here is bounded before it allocates: sequences and strings at
  :data:`MAX_LEN` items, integers at :data:`MAX_INT_BITS` bits (checked for ``*``, ``**``,
  ``<<``, ``%``-formatting, ``format``, ``join``, ``replace``, ``center``...), a value reported
  by the sandbox at :data:`REPORT_CAP_BYTES` of JSON, 100 levels of nesting and the int digit
  limit, sets/dicts/Counters decoded from a report or built here from a model value at
  :data:`MAX_HASHED` elements (keys that all hash alike, ``k * (2**61 - 1)``, make each insert
  scan the others), and :data:`MAX_EVAL_STEPS` plan nodes and comprehension steps and
  :data:`MAX_EVAL_CPU_S` CPU seconds per run (the code can call the harness's check itself to
  send many reports; each report of a top-level assert past the first fails at once). Exceeding a bound fails the test with a reason; it never allocates.
  Parent-evaluable parts of a plan are folded once when the test compiles (once per test: a
  compiled test does not depend on the code).

The sandbox reports slot values as tagged plain data (built-in scalars and containers read
through the built-in types' own methods, ``range``, ``Fraction``, ``Decimal``, ``complex``,
builtin type objects by name, other types as opaque names that equal nothing, ``bytearray`` as
the bytes it holds, any other object (an instance of a class the code defines) as the names of
its type's MRO only, which is not ``None``, equals only itself, has no truth value here and is an
instance of an opaque type of one of those names (``isinstance(make(), Stack)``), and iterators such
as generators materialised to at most :data:`MAX_LEN` items into a value that ``list``/
``tuple``/``set``/``sorted``/``sum`` accept but that equals no list) on a private duplicate of
stdout framed by a per-run nonce; :func:`judge` accepts a run only when it exited 0 in time,
every report is framed, one ``done`` ends it, each assert at the top level was reported exactly
once (in loops/functions at least once, under ``if``/``try``/``match`` or a ``for`` over what
only the model computes, ``for x in f(1)``, any number, unless no other model-dependent assert
must run: then that loop too must run) and every plan
holds here on the decoded values.

What remains in the sandbox, and so can be read or recomputed by the model's code (it shares the
harness's process): sub-expressions that use a name the *test* binds (a helper function the test
defines, a variable it assigns more than once or from a model value, the target of a loop that is
not unrolled, with the data that loop indexes, a module other than ``math``/``fractions``/
``decimal``/``collections``, a lambda) and the inputs of slots. When such a value is the expected side of an
assert (``assert f(x) == brute_force(x)`` with ``brute_force`` defined by the test), the model's
code can compute it too. Expected values written as literals, or computed from literals by
parent-known operations, never enter the sandbox.

:func:`check_assert_test` marks a test ``exposed`` when one of its asserts compares two values
computed in the sandbox (EvalPlus-style ``def check(candidate)`` loops over test-defined data:
frame walking can read ``r`` in ``assert candidate(*i) == r``), and datasets log a one-time
warning for it: write such tests at the top level, where the loop is unrolled here.

An assert none of whose parts depends on the model (every name in it parent-known, after
unrolling: ``assert sorted([3, 1]) == [1, 3]`` without ``entry_point: "sorted"``) would pass
with any code, so :func:`compile_assert_test` refuses it (ValueError, one line) and datasets
refuse the record when they load (:func:`nanoseek.tasks.rewards.check_code_tests`). Constant
asserts (``assert False`` under ``try``/``else``, HumanEval's ``assert True, 'msg'``) are
allowed, but a test needs at least one model-dependent assert that must run.
"""

from __future__ import annotations

import ast
import collections
import copy
import decimal
import fractions
import functools
import json
import math
import operator
import re
import secrets
import time
from collections import ChainMap
from dataclasses import dataclass
from typing import Any

MAX_LEN = 100_000        # items of a sequence / characters of a string built here
MAX_INT_BITS = 1 << 16   # bits of an integer built here
MAX_UNROLL = 2_000       # loop iterations and comprehension elements unrolled per test
MAX_EVAL_STEPS = 200_000  # plan nodes and comprehension steps evaluated per run of a test
REPORT_CAP_BYTES = 1 << 20  # the slot values of one run, as JSON
MAX_HASHED = 5_000       # elements of a set/dict decoded or built from a model value here
MAX_EVAL_CPU_S = 2.0     # CPU seconds this process spends judging one run of a test
_SLOT = " slot"          # plan nodes are Name(id=" slot<k>"): never a valid identifier


class _Fail(Exception):
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
        raise _Fail(f"truth value of a {self.mro[0] if self.mro else '?'} object is not evaluated here")

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
            raise _Fail("range too long") from None
        return 0


def _check(x: Any) -> Any:
    """x, or _Fail when it exceeds the bounds (called on every result)."""
    if type(x) in (int, fractions.Fraction) and _bits(x) > MAX_INT_BITS:
        raise _Fail(f"integer over {MAX_INT_BITS} bits")
    if isinstance(x, (str, bytes, list, tuple, dict, set, frozenset)) and _sized(x) > MAX_LEN:
        raise _Fail(f"value over {MAX_LEN} items")
    return x


def _hashed(x: Any) -> Any:
    """x when hashing its elements here is bounded: equal-hash keys (``k * (2**61 - 1)``) make
    every insert scan the others, so a set/dict from a model value holds at most MAX_HASHED."""
    if _sized(_iterable(x)) > MAX_HASHED:
        raise _Fail(f"set/dict over {MAX_HASHED} elements")
    return x


def _iterable(x: Any) -> Any:
    """x when iterating it here is bounded (a sized value of at most MAX_LEN items)."""
    if isinstance(x, (str, bytes, list, tuple, dict, set, frozenset, range, Materialised)) or \
            type(x).__name__ in ("dict_keys", "dict_values", "dict_items"):
        if _sized(x) > MAX_LEN:
            raise _Fail(f"iterable over {MAX_LEN} items")
        return x
    raise _Fail(f"cannot iterate {type(x).__name__} here")


_NUMBERS = (bool, int, float, complex, fractions.Fraction, decimal.Decimal)
_WIDE_SPEC = re.compile(r"\d{4,}|\*")


def _format_spec_ok(spec: str) -> None:
    if _WIDE_SPEC.search(spec):
        raise _Fail("format width or precision too large")


def _percent(fmt: Any, args: Any) -> Any:
    for m in re.finditer(r"%[^%a-zA-Z]*" if isinstance(fmt, str) else rb"%[^%a-zA-Z]*", fmt):
        _format_spec_ok(m.group() if isinstance(fmt, str) else m.group().decode("latin-1"))
    for a in (args if isinstance(args, tuple) else (args,)):
        if isinstance(a, (dict, list, tuple, set, frozenset)) or (type(a) is int and _bits(a) > 4096):
            raise _Fail("%-formatting of a container or huge int is not evaluated here")
    return _check(fmt % args)


def _mul(a: Any, b: Any) -> Any:
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (str, bytes, list, tuple)) and type(n) in (int, bool):
            if n > 0 and _sized(seq) * n > MAX_LEN:
                raise _Fail(f"repetition over {MAX_LEN} items")
            return seq * n
    if type(a) in (int, bool, fractions.Fraction) and type(b) in (int, bool, fractions.Fraction) \
            and _bits(a) + _bits(b) > MAX_INT_BITS:
        raise _Fail(f"product over {MAX_INT_BITS} bits")
    return a * b


def _pow(a: Any, b: Any, m: Any = None) -> Any:
    if m is not None:
        if not all(type(v) is int for v in (a, b, m)) or _bits(b) > 4096 or _bits(m) > 4096:
            raise _Fail("three-argument pow needs ints of at most 4096 bits")
        return pow(a, b, m)
    if type(b) in (int, bool) and b > 0 and type(a) in (int, bool, fractions.Fraction):
        if abs(a) > 1 and _bits(a) * b > MAX_INT_BITS:
            raise _Fail(f"power over {MAX_INT_BITS} bits")
    elif type(b) in (int, bool) and type(a) is fractions.Fraction and abs(b) > 64:
        raise _Fail("power of a fraction too large")
    elif type(a) is fractions.Fraction or type(b) is fractions.Fraction:
        if type(b) is fractions.Fraction and b.denominator != 1:
            return float(a) ** float(b)
    return a ** b


def _lshift(a: Any, b: Any) -> Any:
    if type(b) in (int, bool) and _bits(a) + b > MAX_INT_BITS:
        raise _Fail(f"shift over {MAX_INT_BITS} bits")
    return a << b


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes, list, tuple)) and _sized(a) + _sized(b) > MAX_LEN:
        raise _Fail(f"concatenation over {MAX_LEN} items")
    return a + b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes)):
        return _percent(a, b)
    return a % b


_BINOPS = {ast.Add: _add, ast.Sub: operator.sub, ast.Mult: _mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: _mod, ast.Pow: _pow, ast.LShift: _lshift,
           ast.RShift: operator.rshift, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
           ast.BitXor: operator.xor}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
        ast.In: lambda a, b: a in _iterable(b) if not isinstance(b, (str, bytes)) else a in b,
        ast.NotIn: lambda a, b: a not in (b if isinstance(b, (str, bytes)) else _iterable(b))}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_,
          ast.Invert: operator.invert}

# ----------------------------------------------------------------------------- parent builtins

_KEY_FUNCS = (len, abs, str, int, float, bool, tuple, list, sorted, sum, min, max, ord, str.lower,
              str.upper, str.strip, str.casefold, chr, repr, None)


def _keyed(kw: dict) -> dict:
    for k, v in kw.items():
        if k == "key" and not any(v is f for f in _KEY_FUNCS):
            raise _Fail("only builtin key functions are evaluated here")
    return kw


def _consume(fn, allowed_kw=()):
    def call(*args, **kw):
        if set(kw) - set(allowed_kw):
            raise _Fail(f"{fn.__name__}() keyword not evaluated here")
        if args and not (fn in (min, max) and len(args) > 1):
            _iterable(args[0])
        elif fn in (min, max):
            pass
        return _check(fn(*args, **_keyed(kw)))
    return call


def _set_of(fn):
    def call(*args):
        if args:
            _hashed(args[0])
        return fn(*args)
    return call


def _sum(xs: Any, start: Any = 0) -> Any:
    _iterable(xs)
    items = list(xs)
    if not all(isinstance(v, _NUMBERS) for v in items + [start]):
        raise _Fail("sum() of non-numbers is not evaluated here")
    return _check(sum(items, start))


def _int(x: Any = 0, *base: Any) -> Any:
    if type(x) is decimal.Decimal and x.is_finite() and x.adjusted() > 1300:
        raise _Fail("int() of a huge Decimal")
    if isinstance(x, (str, bytes)) and len(x) > 5000:
        raise _Fail("int() of a long string")
    return _check(int(x, *base))


def _str(x: Any = "", *rest: Any) -> Any:
    if isinstance(x, (list, tuple, dict, set, frozenset)):
        _iterable(x)
    return _check(str(x, *rest))


def _format(x: Any, spec: str = "") -> Any:
    _format_spec_ok(str(spec))
    return _check(format(x, spec))


def _bytes(x: Any = b"", *rest: Any) -> Any:
    if type(x) is int and x > MAX_LEN:
        raise _Fail(f"bytes over {MAX_LEN}")
    if not isinstance(x, int):
        _iterable(x)
    return _check(bytes(x, *rest))


def _range(*a: Any) -> Any:
    if not all(type(v) in (int, bool) for v in a):
        raise _Fail("range() of non-ints")
    return range(*a)


def _map_filter(fn):
    def call(func, *its):
        if not any(func is f for f in _KEY_FUNCS):
            raise _Fail(f"{fn.__name__}() with a function other than a builtin is not evaluated here")
        for a in its:
            _iterable(a)
        return Materialised(list(fn(func, *its)))
    return call


def _counter(*args: Any) -> Any:
    if args:
        _hashed(args[0])
    return collections.Counter(*args)


def _materialise(fn):
    def call(*args):
        for a in args:
            _iterable(a)
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
        raise _Fail("factorial argument too large")
    return math.factorial(n)


def _comb(n: Any, k: Any) -> Any:
    if type(n) is not int or n > 5000:
        raise _Fail("comb/perm argument too large")
    return math.comb(n, k)


def _perm(n: Any, k: Any = None) -> Any:
    if type(n) is not int or n > 3000:
        raise _Fail("comb/perm argument too large")
    return math.perm(n, k)


def _round(x: Any, *n: Any) -> Any:
    if n and n[0] is not None and (type(n[0]) is not int or abs(n[0]) > 400):
        raise _Fail("round() digits out of range")
    return round(x, *n)


def _prod(xs: Any, **kw: Any) -> Any:
    _iterable(xs)
    if sum(_bits(v) for v in xs) > MAX_INT_BITS:
        raise _Fail(f"product over {MAX_INT_BITS} bits")
    return _check(math.prod(xs, **kw))


def _isqrt(n: Any) -> Any:
    return math.isqrt(_check(n))


def _dict(*args: Any, **kw: Any) -> Any:
    if args:
        _hashed(args[0])
    return _check(dict(*args, **kw))


def _type(x: Any) -> Any:
    return type(x)


def _repr(x: Any) -> Any:
    return _str(x) if not isinstance(x, str) else _check(repr(x))


# name -> the real builtin (what `type(x) == int` compares with) and real -> its bounded call
PARENT_FUNCS: dict[str, Any] = {n: getattr(__import__("builtins"), n) for n in (
    "abs all any bin bool bytes chr complex dict divmod enumerate float format frozenset hex int "
    "isinstance len list max min oct ord pow range repr reversed round set sorted str sum tuple "
    "type zip map filter").split()}
_WRAP: dict[Any, Any] = {
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
_PARENT_VALUES = {"True": True, "False": False, "None": None}
_MATH = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf, "nan": math.nan,
         "isclose": math.isclose, "sqrt": math.sqrt, "floor": math.floor, "ceil": math.ceil,
         "fabs": math.fabs, "gcd": math.gcd, "lcm": math.lcm, "log": math.log, "log2": math.log2,
         "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
         "atan2": math.atan2, "hypot": math.hypot, "isqrt": math.isqrt, "factorial": math.factorial,
         "comb": math.comb, "perm": math.perm, "trunc": math.trunc, "isnan": math.isnan, "isinf": math.isinf,
         "isfinite": math.isfinite, "copysign": math.copysign, "prod": math.prod,
         "dist": math.dist, "degrees": math.degrees, "radians": math.radians}
_MODULES = {"math": _MATH, "fractions": {"Fraction": fractions.Fraction},
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
_ALL_METHODS = set().union(*_METHODS.values())
_FORMAT_FIELD = re.compile(r"\{\{|\}\}|\{(\d*)(?:![rsa])?(?::([^{}]*))?\}")


def _method(recv: Any, name: str, args: list, kw: dict) -> Any:
    if name not in _METHODS.get(type(recv), ()):
        raise _Fail(f"{type(recv).__name__}.{name}() is not evaluated here")
    if _sized(recv) > MAX_LEN or any(isinstance(a, (str, bytes)) and len(a) > MAX_LEN for a in args):
        raise _Fail(f"method operand over {MAX_LEN} items")
    if name in ("center", "ljust", "rjust", "zfill") and args and \
            (type(args[0]) is not int or args[0] > MAX_LEN):
        raise _Fail(f"width over {MAX_LEN}")
    if name == "join":
        _iterable(args[0] if args else None)
        if sum(_sized(v) for v in args[0]) + _sized(recv) * _sized(args[0]) > MAX_LEN:
            raise _Fail(f"join over {MAX_LEN} characters")
    if name == "replace" and len(args) >= 2:
        n = recv.count(args[0]) if args[0] else _sized(recv) + 1
        if _sized(recv) + n * _sized(args[1]) > MAX_LEN:
            raise _Fail(f"replace over {MAX_LEN} characters")
    if name == "format":
        rest = _FORMAT_FIELD.sub("", recv)
        if "{" in rest or "}" in rest:
            raise _Fail("only positional {} fields are formatted here")
        for m in _FORMAT_FIELD.finditer(recv):
            _format_spec_ok(m.group(2) or "")
        for a in list(args) + list(kw.values()):
            if isinstance(a, (list, tuple, dict, set, frozenset)):
                _iterable(a)
    if name in ("union", "intersection", "difference", "symmetric_difference"):
        for a in args:
            _iterable(a)
    return _check(getattr(recv, name)(*args, **kw))


# ----------------------------------------------------------------------------- scanning names


def _test_bindings(tree: ast.AST) -> tuple[set[str], dict[str, Any]]:
    """(names the test binds itself, names it imports from :data:`_MODULES` genuinely)."""
    bound: set[str] = set()
    imported: dict[str, Any] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            bound.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
            bound.update(a.arg for a in n.args.args + n.args.kwonlyargs + n.args.posonlyargs) \
                if not isinstance(n, ast.ClassDef) else None
        elif isinstance(n, ast.Lambda):
            bound.update(a.arg for a in n.args.args + n.args.kwonlyargs + n.args.posonlyargs)
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.asname is None and a.name in _MODULES:
                    imported[a.name] = _MODULES[a.name]
                else:
                    bound.add((a.asname or a.name).split(".")[0])
        elif isinstance(n, ast.ImportFrom):
            for a in n.names:
                if n.module in _MODULES and a.name in _MODULES[n.module]:
                    imported[a.asname or a.name] = _MODULES[n.module][a.name]
                else:
                    bound.add(a.asname or a.name)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    return bound - set(imported), imported


# ----------------------------------------------------------------------------- parent evaluation


def _is_slot(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id.startswith(_SLOT)


def _budget() -> list:
    """The evaluation budget of one run: MAX_EVAL_STEPS steps and MAX_EVAL_CPU_S CPU seconds."""
    return [MAX_EVAL_STEPS, time.process_time() + MAX_EVAL_CPU_S]


class _Evaluator:
    """Evaluates a plan (an expression AST whose model-dependent parts are slot names) here,
    with every operation bounded. ``names`` maps each parent-known name to its value."""

    def __init__(self, names: Any, slots: list | None = None, steps: list | None = None):
        self.names = names
        self.slots = slots or []
        # [steps left, CPU deadline]: shared with children
        self.steps = steps if steps is not None else _budget()

    def ev(self, node: ast.AST) -> Any:
        self.steps[0] -= 1
        if self.steps[0] < 0:
            raise _Fail(f"evaluation over {MAX_EVAL_STEPS} steps")
        if self.steps[0] & 255 == 0 and time.process_time() > self.steps[1]:
            raise _Fail(f"evaluation over {MAX_EVAL_CPU_S} s of CPU")
        m = getattr(self, "_" + type(node).__name__, None)
        if m is None:
            raise _Fail(f"{type(node).__name__} is not evaluated here")
        return m(node)

    def _Constant(self, n):
        return n.value

    def _Name(self, n):
        if n.id.startswith(_SLOT):
            ok, value = self.slots[int(n.id[len(_SLOT):])]
            if not ok:
                raise _Fail(f"raised {value}")
            return value
        if n.id in self.names:
            return self.names[n.id]
        raise _Fail(f"name {n.id} is not evaluated here")

    def _List(self, n):
        return _check([self.ev(e) for e in self._elts(n.elts)])

    def _Tuple(self, n):
        return _check(tuple(self.ev(e) for e in self._elts(n.elts)))

    def _Set(self, n):
        return _check({self.ev(e) for e in self._elts(n.elts)})

    def _elts(self, elts):
        out = []
        for e in elts:
            if isinstance(e, ast.Starred):
                raise _Fail("starred element is not evaluated here")
            out.append(e)
        return out

    def _Dict(self, n):
        if any(k is None for k in n.keys):
            raise _Fail("** in a dict display is not evaluated here")
        return _check({self.ev(k): self.ev(v) for k, v in zip(n.keys, n.values)})

    def _BoolOp(self, n):
        value = None
        for v in n.values:
            value = self.ev(v)
            if bool(value) != isinstance(n.op, ast.And):
                return value
        return value

    def _UnaryOp(self, n):
        return _check(_UNARY[type(n.op)](self.ev(n.operand)))

    def _BinOp(self, n):
        op = _BINOPS.get(type(n.op))
        if op is None:
            raise _Fail(f"{type(n.op).__name__} is not evaluated here")
        return _check(op(self.ev(n.left), self.ev(n.right)))

    def _Compare(self, n):
        left = self.ev(n.left)
        for op, c in zip(n.ops, n.comparators):
            right = self.ev(c)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True

    def _IfExp(self, n):
        return self.ev(n.body) if self.ev(n.test) else self.ev(n.orelse)

    def _Subscript(self, n):
        value = self.ev(n.value)
        if not isinstance(value, (str, bytes, list, tuple, dict, range)):
            raise _Fail(f"subscript of {type(value).__name__} is not evaluated here")
        return _check(value[self.ev(n.slice)])

    def _comprehension(self, n):
        out: list = []
        dict_comp = isinstance(n, ast.DictComp)
        hashed = dict_comp or isinstance(n, ast.SetComp)

        def walk(i: int, ev: "_Evaluator") -> None:
            if i == len(n.generators):
                out.append((ev.ev(n.key), ev.ev(n.value)) if dict_comp else ev.ev(n.elt))
                return
            g = n.generators[i]
            for item in _iterable(ev.ev(g.iter)):
                self.steps[0] -= 1
                if self.steps[0] < 0 or len(out) > MAX_LEN:
                    raise _Fail(f"evaluation over {MAX_EVAL_STEPS} steps")
                if hashed and len(out) > MAX_HASHED:
                    raise _Fail(f"set/dict over {MAX_HASHED} elements")
                b: dict[str, Any] = {}
                if not _bind(g.target, item, b):
                    raise _Fail("cannot unpack a comprehension item")
                child = _Evaluator(ChainMap(b, ev.names), self.slots, self.steps)
                if all(child.ev(c) for c in g.ifs):
                    walk(i + 1, child)

        walk(0, self)
        if dict_comp:
            return _check(dict(out))
        if isinstance(n, ast.SetComp):
            return _check(set(out))
        return _check(out) if isinstance(n, ast.ListComp) else Materialised(out)

    _ListComp = _SetComp = _GeneratorExp = _DictComp = _comprehension

    def _Slice(self, n):
        return slice(*(None if p is None else self.ev(p) for p in (n.lower, n.upper, n.step)))

    def _Attribute(self, n):
        if isinstance(n.value, ast.Name) and isinstance(self.names.get(n.value.id), dict) and \
                n.value.id in _MODULES and n.attr in self.names[n.value.id]:
            return self.names[n.value.id][n.attr]
        raise _Fail(f"attribute .{n.attr} is not evaluated here")

    def _Call(self, n):
        if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
            raise _Fail("*args/**kwargs are not evaluated here")
        args = [self.ev(a) for a in n.args]
        kw = {k.arg: self.ev(k.value) for k in n.keywords}
        if isinstance(n.func, ast.Attribute) and not (isinstance(n.func.value, ast.Name) and
                                                      n.func.value.id in _MODULES and
                                                      n.func.value.id in self.names):
            return _method(self.ev(n.func.value), n.func.attr, args, kw)
        fn = self.ev(n.func)
        if fn in (fractions.Fraction, decimal.Decimal):
            for a in args:
                if isinstance(a, str) and len(a) > 200:
                    raise _Fail("numeric string too long")
            value = fn(*args, **kw)
            if type(value) is decimal.Decimal and value.is_finite() and abs(value.adjusted()) > 10_000:
                raise _Fail("Decimal exponent too large")
            return _check(value)
        try:
            wrapped = _WRAP.get(fn) or (fn if fn in _MATH_FUNCS else None)
        except TypeError:  # unhashable
            wrapped = None
        if wrapped is None:
            raise _Fail("call is not evaluated here")
        return _check(wrapped(*args, **kw))


_MATH_FUNCS = {v for v in _MATH.values() if callable(v)}


# ----------------------------------------------------------------------------- planning


def _free_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


_PLANNABLE = (ast.Constant, ast.Name, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.BoolOp,
              ast.UnaryOp, ast.BinOp, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice,
              ast.Attribute, ast.Call, ast.Load, ast.expr_context, ast.boolop, ast.operator,
              ast.unaryop, ast.cmpop, ast.keyword)


def _to_ast(value: Any, depth: int = 0) -> ast.expr | None:
    """An expression that rebuilds a literal value (for unrolled loop variables); None if the
    value is not plain literal data."""
    if depth > 50:
        return None
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return ast.Constant(value)
    if type(value) in (list, tuple):
        elts = [_to_ast(v, depth + 1) for v in value]
        if any(e is None for e in elts):
            return None
        return (ast.List if type(value) is list else ast.Tuple)(elts, ast.Load())
    if type(value) is dict:
        keys = [_to_ast(k, depth + 1) for k in value]
        vals = [_to_ast(v, depth + 1) for v in value.values()]
        return None if any(e is None for e in keys + vals) else ast.Dict(keys, vals)
    if type(value) is set:
        elts = [_to_ast(v, depth + 1) for v in value]
        if any(e is None for e in elts):
            return None
        return ast.Set(elts) if elts else ast.Set([ast.Starred(ast.Tuple([], ast.Load()), ast.Load())])
    return None


def _bind(target: ast.AST, value: Any, out: dict) -> bool:
    if isinstance(target, ast.Name):
        out[target.id] = value
        return True
    if isinstance(target, (ast.Tuple, ast.List)) and not any(isinstance(e, ast.Starred) for e in target.elts):
        try:
            values = list(_iterable(value))
        except _Fail:
            return False
        if len(values) != len(target.elts):
            return False
        return all(_bind(t, v, out) for t, v in zip(target.elts, values))
    return False


class _Substitute(ast.NodeTransformer):
    def __init__(self, values: dict[str, ast.expr]):
        self.values = values

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.values:
            return copy.deepcopy(self.values[node.id])
        return node


class _Compiler:
    def __init__(self, known: dict[str, Any]):
        self.known = known          # parent-known names and their values
        self.budget = MAX_UNROLL

    def parent_ok(self, node: ast.AST, extra: set[str] = frozenset()) -> bool:
        return all(isinstance(n, _PLANNABLE) for n in ast.walk(node)) and \
            _free_names(node) <= set(self.known) | extra

    def comp_over_slot(self, node: ast.AST, slots: list) -> ast.expr | None:
        """A comprehension whose first iterable needs the model but whose elements and filters
        do not: the iterable becomes a slot (plain data) and the rest is evaluated here, so
        ``all(x > 0 for x in f(3))`` cannot be answered by objects of the model's making."""
        bound: set[str] = set()
        gens = node.generators
        if any(g.is_async for g in gens):
            return None
        for k, g in enumerate(gens):
            if k and not self.parent_ok(g.iter, bound):
                return None
            if not isinstance(g.target, (ast.Name, ast.Tuple, ast.List)) or \
                    not all(isinstance(t, (ast.Name, ast.Tuple, ast.List, ast.Load, ast.Store))
                            for t in ast.walk(g.target)):
                return None
            bound |= _free_names(g.target)
            if not all(self.parent_ok(c, bound) for c in g.ifs):
                return None
        elts = (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)
        if not all(self.parent_ok(e, bound) for e in elts):
            return None
        new = copy.deepcopy(node)
        new.generators[0].iter = self.plan(gens[0].iter, slots)
        return new

    def evaluate(self, node: ast.AST) -> Any:
        return _Evaluator(self.known).ev(node)

    def bindings(self, target: ast.AST, iter_node: ast.AST) -> list[dict[str, ast.expr]] | None:
        """One substitution per iteration of a parent-evaluable loop, or None."""
        if not self.parent_ok(iter_node):
            return None
        try:
            items = list(_iterable(self.evaluate(iter_node)))
        except (_Fail, Exception):
            return None
        if len(items) > self.budget:
            return None
        out = []
        for item in items:
            b: dict[str, Any] = {}
            if not _bind(target, item, b):
                return None
            nodes = {k: _to_ast(v) for k, v in b.items()}
            if any(v is None for v in nodes.values()):
                return None
            out.append(nodes)
        self.budget -= len(items)
        return out

    # comprehension -> display of its elements
    def unroll_comp(self, node: ast.AST) -> ast.expr | None:
        gens = node.generators
        if any(g.is_async for g in gens):
            return None
        elts: list = []

        def walk(i: int, subst: dict) -> bool:
            if i == len(gens):
                elt = (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)
                elts.append(tuple(_Substitute(subst).visit(copy.deepcopy(e)) for e in elt))
                return len(elts) <= MAX_UNROLL
            g = _Substitute(subst).visit(copy.deepcopy(g0 := gens[i]))
            binds = self.bindings(g.target, g.iter)
            if binds is None:
                return False
            for b in binds:
                s = {**subst, **b}
                keep = True
                for cond in g0.ifs:
                    c = _Substitute(s).visit(copy.deepcopy(cond))
                    if not self.parent_ok(c):
                        return False
                    try:
                        keep = keep and bool(self.evaluate(c))
                    except (_Fail, Exception):
                        return False
                if keep and not walk(i + 1, s):
                    return False
            return True

        if not walk(0, {}):
            return None
        if isinstance(node, ast.DictComp):
            return ast.Dict([k for k, _ in elts], [v for _, v in elts])
        items = [e[0] for e in elts]
        return ast.Set(items) if isinstance(node, ast.SetComp) and items else \
            ast.List(items, ast.Load())

    def plan(self, node: ast.expr, slots: list) -> ast.expr:
        """The plan for one expression; model-dependent parts are appended to ``slots``."""
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            unrolled = self.unroll_comp(node)
            if unrolled is not None:
                node = unrolled
        if self.parent_ok(node):
            try:  # folded once here, not once per report
                return ast.Constant(self.evaluate(node))
            except Exception:  # _Fail or the test's own error: it fails the same way when judged
                return node
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            new = self.comp_over_slot(node, slots)
            if new is not None:
                return new
        decomposable = isinstance(node, (ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Compare, ast.IfExp,
                                         ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Subscript))
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and \
                any(isinstance(e, ast.Starred) for e in node.elts):
            decomposable = False
        if isinstance(node, ast.Dict) and any(k is None for k in node.keys):
            decomposable = False
        if isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args) \
                and all(k.arg is not None for k in node.keywords):
            f = node.func
            if isinstance(f, ast.Name) and f.id in self.known:
                decomposable = True
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    f.value.id in _MODULES and f.value.id in self.known:
                decomposable = True
            elif isinstance(f, ast.Attribute) and f.attr in _ALL_METHODS:
                new = copy.copy(node)
                new.func = ast.Attribute(self.plan(f.value, slots), f.attr, ast.Load())
                new.args = [self.plan(a, slots) for a in node.args]
                new.keywords = [ast.keyword(k.arg, self.plan(k.value, slots)) for k in node.keywords]
                return new
        if not decomposable:
            slots.append(_FoldInSlot(self).visit(copy.deepcopy(node)))
            return ast.Name(f"{_SLOT}{len(slots) - 1}", ast.Load())
        new = copy.copy(node)
        for field, value in ast.iter_fields(node):
            if field == "func" or field == "ctx" or field == "op" or field == "ops":
                continue
            if isinstance(value, list):
                setattr(new, field, [self.plan(v, slots) if isinstance(v, ast.expr) else
                                     (ast.keyword(v.arg, self.plan(v.value, slots))
                                      if isinstance(v, ast.keyword) else v) for v in value])
            elif isinstance(value, ast.Slice):
                setattr(new, field, ast.Slice(*(None if p is None else self.plan(p, slots)
                                                for p in (value.lower, value.upper, value.step))))
            elif isinstance(value, ast.expr):
                setattr(new, field, self.plan(value, slots))
        return new


def _bind_counts(tree: ast.AST) -> dict[str, int]:
    counts: dict[str, int] = {}

    def add(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            add(n.name)
        elif isinstance(n, ast.arg):
            add(n.arg)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                add((a.asname or a.name).split(".")[0])
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            for name in n.names:
                add(name)
                add(name)
        elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
            add(n.name)
    return counts


class _SubstituteOutsideAsserts(_Substitute):
    def visit_Assert(self, node):
        return node


def _propagate_constants(tree: ast.Module, compiler: _Compiler) -> None:
    """``CASES = [...]`` at the top level, bound once, parent-evaluable: the parent keeps the
    value (a parent-known name in asserts and loops) and the sandbox never runs the assignment;
    statements other than asserts that use it get the literal (the sandbox sees it there)."""
    counts = _bind_counts(tree)
    body = list(tree.body)
    i = 0
    while i < len(body):
        st = body[i]
        if isinstance(st, ast.Assign) and len(st.targets) == 1 and \
                isinstance(st.targets[0], ast.Name) and counts.get(st.targets[0].id) == 1:
            name = st.targets[0].id
            used_before = any(isinstance(n, ast.Name) and n.id == name
                              for prev in body[:i] for n in ast.walk(prev))
            node = None
            if not used_before and compiler.parent_ok(st.value):
                try:
                    value = compiler.evaluate(st.value)
                    node = _to_ast(value)
                except Exception:  # _Fail, or the test's own error: leave it to the sandbox
                    node = None
            if node is not None:
                compiler.known[name] = value
                sub = _SubstituteOutsideAsserts({name: node})
                body[i + 1:] = [sub.visit(x) for x in body[i + 1:]]
                del body[i]
                continue
        i += 1
    tree.body = body or [ast.Pass()]


class _FoldInSlot(ast.NodeTransformer):
    """Inside a slot, every parent-evaluable part becomes its literal value: the sandbox gets
    the inputs (``add(*CASES[0][:2])`` -> ``add(*(2, 3))``), never a name only the parent has."""

    def __init__(self, compiler: _Compiler):
        self.compiler = compiler

    def visit(self, node):
        if isinstance(node, ast.expr) and not isinstance(node, (ast.Constant, ast.Starred)) and \
                self.compiler.parent_ok(node):
            try:
                literal = _to_ast(self.compiler.evaluate(node))
            except Exception:  # _Fail or the test's own error: the sandbox meets it as written
                literal = None
            if literal is not None:
                return literal
        return self.generic_visit(node)


class _UnrollLoops(ast.NodeTransformer):
    def __init__(self, compiler: _Compiler):
        self.compiler = compiler

    def visit_For(self, node):
        body_stores = {n.id for st in node.body for n in ast.walk(st)
                       if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        targets = _free_names(node.target)
        jumps = any(isinstance(n, (ast.Break, ast.Continue)) for st in node.body for n in ast.walk(st))
        binds = None if jumps or body_stores & targets else \
            self.compiler.bindings(node.target, node.iter)
        if binds is None:
            return self.generic_visit(node)
        out: list = []
        for b in binds:
            for st in node.body:
                new = _Substitute(b).visit(copy.deepcopy(st))
                visited = self.visit(new)
                out.extend(visited if isinstance(visited, list) else [visited])
        for st in node.orelse:
            visited = self.visit(st)
            out.extend(visited if isinstance(visited, list) else [visited])
        return out or [ast.Pass()]


@dataclass
class Check:
    plan: ast.expr
    n_slots: int
    min_runs: int           # 1: must run; 0: under if/try/match (may legitimately not run)
    max_runs: int | None    # 1 at the top level of the test; None inside loops and functions


@dataclass
class CompiledTest:
    source: str             # the test as the sandbox runs it: no assert, no expected value
    checks: list[Check]
    known: dict[str, Any]   # the parent-known names the plans use
    shadow: list[str]       # builtins the model owns: the test in the sandbox never sees the real one
    exposed: bool = False   # an assert compares two sandbox values: its expected side is the code's to see


def _assert_sites(body: list[ast.stmt], conditional: bool = False, repeated: bool = False,
                  model_iter: Any = None):
    """(assert node, conditional, repeated) for every assert, by where it sits. ``model_iter``:
    a predicate on a ``for`` loop's iterable; true when the model's code alone decides it (its
    body may then run 0 times, as an empty answer makes it in Python)."""
    for st in body:
        if isinstance(st, ast.Assert):
            yield st, conditional, repeated
        elif isinstance(st, (ast.For, ast.AsyncFor, ast.While)):
            empty_ok = isinstance(st, (ast.For, ast.AsyncFor)) and model_iter is not None and \
                model_iter(st.iter)
            yield from _assert_sites(st.body, conditional or empty_ok, True, model_iter)
            yield from _assert_sites(st.orelse, True, repeated, model_iter)
        elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _assert_sites(st.body, conditional, True, model_iter)
        elif isinstance(st, (ast.ClassDef, ast.With, ast.AsyncWith)):
            yield from _assert_sites(st.body, conditional, repeated, model_iter)
        elif isinstance(st, ast.If):
            yield from _assert_sites(st.body + st.orelse, True, repeated, model_iter)
        elif isinstance(st, (ast.Try, ast.TryStar)):
            for part in (st.body, *(h.body for h in st.handlers), st.orelse):
                yield from _assert_sites(part, True, repeated, model_iter)
            yield from _assert_sites(st.finalbody, conditional, repeated, model_iter)
        elif isinstance(st, ast.Match):
            for case in st.cases:
                yield from _assert_sites(case.body, True, repeated, model_iter)


_BUILTIN_NAMES = set(dir(__builtins__) if not isinstance(__builtins__, dict) else __builtins__)


def _entry_points(entry_point: Any) -> set[str]:
    if entry_point is None:
        return set()
    names = [entry_point] if isinstance(entry_point, str) else entry_point
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.isidentifier()
                                                        for n in names):
        raise ValueError(f"'entry_point' must be a name or a list of names, got {entry_point!r}")
    return set(names)


def compile_assert_test(snippet: str, entry_point: Any = None) -> CompiledTest:
    """Split an assertion test into what the sandbox runs and the plans judged here.
    ``entry_point``: the record's function name(s), model-owned whatever the code does and
    whatever builtin they shadow. ValueError when the test
    does not parse, has no assert that must run, or has an assert that does not depend on the
    model's code (see the module docstring)."""
    try:
        tree = ast.parse(snippet)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"assertion test does not parse: {e}") from None
    owned = _entry_points(entry_point)
    rebound, imported = _test_bindings(tree)
    known: dict[str, Any] = {k: v for k, v in {**PARENT_FUNCS, **_PARENT_VALUES}.items()
                             if k not in owned and k not in rebound}
    if "math" not in owned and "math" not in rebound:
        known["math"] = _MATH
    known.update(imported)  # the test's own import wins over whatever the model bound
    compiler = _Compiler(known)
    _propagate_constants(tree, compiler)
    tree = ast.fix_missing_locations(_UnrollLoops(compiler).visit(tree))
    # a loop over what only the model's code computes (``for x in f(1)``: no name the test binds)
    # may run 0 times, unless no other model-dependent assert must run (then an empty answer
    # would pass the whole test, so such a loop must still run)
    def model_iter(it: ast.expr) -> bool:
        names = _free_names(it)
        return not (names & rebound) and not compiler.parent_ok(it)

    sites = list(_assert_sites(tree.body, model_iter=model_iter))
    strict = list(_assert_sites(tree.body))
    if not any(not c and _free_names(n.test) - set(known) for n, c, _ in sites):
        sites = strict
    if not sites:
        raise ValueError(f"assertion test has no assert statement: {snippet[:80]!r}")
    if all(conditional for _, conditional, _ in sites):
        raise ValueError("assertion test has no assert that must run (all are under if/try/"
                         f"match), so a forged end of run would pass it: {snippet[:80]!r}")
    checks, calls, exposed = [], {}, False
    for i, (node, conditional, repeated) in enumerate(sites):
        slots: list[ast.expr] = []
        plan = compiler.plan(node.test, slots)
        if not slots and not isinstance(node.test, ast.Constant):
            raise ValueError(f"assert {ast.unparse(node.test)[:60]!r} does not depend on the code "
                             "under test (every name in it is a builtin the reward evaluates "
                             "itself); name the function in the record's 'entry_point' if it "
                             "shadows a builtin")
        checks.append(Check(plan, len(slots), 0 if conditional else 1, None if repeated else 1))
        if isinstance(plan, ast.Compare) and sum(
                any(isinstance(m, ast.Name) and m.id.startswith(_SLOT) for m in ast.walk(side))
                for side in [plan.left, *plan.comparators]) >= 2:
            exposed = True
        calls[id(node)] = ast.Expr(ast.Call(
            ast.Name("__nanoseek_check__", ast.Load()),
            [ast.Constant(i)] + [ast.Lambda(ast.arguments([], [], None, [], [], None, []), s)
                                 for s in slots], []))

    if not any(c.n_slots and c.min_runs for c in checks):
        raise ValueError("assertion test has no assert that depends on the code and must run "
                         f"(only constants such as 'assert True'): {snippet[:80]!r}")

    class Rewrite(ast.NodeTransformer):
        def visit_Assert(self, node):
            return ast.copy_location(calls[id(node)], node)

    tree = ast.fix_missing_locations(Rewrite().visit(tree))
    shadow = sorted(owned & _BUILTIN_NAMES)
    return CompiledTest(ast.unparse(tree), checks, known, shadow, exposed)


# ----------------------------------------------------------------------------- the sandbox side

_HARNESS = r"""
import builtins as _b, json as _json, os as _os, sys as _sys
import fractions as _fr, decimal as _de
_OUT = _os.dup(1)  # the report channel; the code's own prints go to stderr
_os.dup2(2, 1)
_PRISTINE = dict(_b.__dict__)  # the builtins the test sees: a copy from before the code ran
_isinstance, _type, _repr, _len = isinstance, type, repr, len
_TYPES = [(v, k) for k, v in _PRISTINE.items() if _isinstance(v, type)] + [(_type(None), "NoneType")]
_Fraction, _Decimal = _fr.Fraction, _de.Decimal
_fnum, _fden = _fr.Fraction.numerator.fget, _fr.Fraction.denominator.fget
_dstr, _next, _iter = _de.Decimal.__str__, next, iter
_MAX = 100000

def _enc(x, depth=0):
    # Built-in types by their base-type methods: a subclass is reduced to the data it holds, so
    # its own __eq__, __iter__ or items() cannot take part (namedtuple, Counter, IntEnum pass).
    if depth > 100:
        raise ValueError("nested too deeply")
    if x is None or x is True or x is False:
        return x
    if _isinstance(x, int):
        return {"i": int.__repr__(x)}
    if _isinstance(x, float):
        return {"f": float.__repr__(x)}
    if _isinstance(x, complex):
        return {"c": [float.__repr__(complex.real.__get__(x)), float.__repr__(complex.imag.__get__(x))]}
    if _isinstance(x, str):
        return {"s": str.__str__(x)}
    if _isinstance(x, bytes):
        return {"b": bytes.hex(x)}
    if _isinstance(x, bytearray):  # bytes-like: equal to the bytes it holds, as in Python
        return {"b": bytearray.hex(x)}
    for base, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
        if _isinstance(x, base):
            return {tag: [_enc(v, depth + 1) for v in base.__iter__(x)]}
    if _isinstance(x, dict):
        return {"d": [[_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in dict.items(x)]}
    if _type(x) is range:
        return {"r": [int.__repr__(x.start), int.__repr__(x.stop), int.__repr__(x.step)]}
    if _isinstance(x, _Fraction):
        return {"Q": [int.__repr__(_fnum(x)), int.__repr__(_fden(x))]}
    if _isinstance(x, _Decimal):
        return {"D": _dstr(x)}
    if _isinstance(x, type):
        for t, name in _TYPES:
            if x is t:
                return {"T": name}
        return {"T?": str.__str__(_type.__getattribute__(x, "__qualname__"))}
    if getattr(_type(x), "__next__", None) is not None:
        items = []
        for v in _iter(x):
            if _len(items) >= _MAX:
                raise ValueError("iterator too long")
            items.append(_enc(v, depth + 1))
        return {"G": items}
    # anything else (an instance of a class the code defines): the names of its type's MRO only
    mro = _type.__getattribute__(_type(x), "__mro__")
    return {"o": [str.__str__(_type.__getattribute__(c, "__qualname__")) for c in mro[:50]]}

def _emit(rec):
    data = (_NONCE + " " + _json.dumps(rec) + "\n").encode()
    while data:
        data = data[_os.write(_OUT, data):]

def __nanoseek_check__(_i, *slots):
    vals = []
    for f in slots:
        try:
            vals.append(["ok", _enc(f())])
        except BaseException as e:
            vals.append(["err", type(e).__name__])
    _emit({"a": _i, "v": vals})

_ns = {"__name__": "__main__", "__builtins__": _b}
exec(compile(_CODE, "solution.py", "exec"), _ns)
# the test sees the code's module-level names, its builtins that the parent knows it defines
# (entry points included: never the real builtin in their place), and otherwise the pristine ones
_t = {k: v for k, v in _ns.items() if k not in _PRISTINE or k in _SHADOW}
_t.update(__builtins__={k: v for k, v in _PRISTINE.items() if k not in _SHADOW},
          __name__="__main__", __nanoseek_check__=__nanoseek_check__)
exec(compile(_TEST, "test.py", "exec"), _t)
_emit({"done": True})
"""


def _decode(x: Any, depth: int = 0) -> Any:
    """A slot value from its tagged JSON form into plain built-in data; _Fail otherwise."""
    if depth > 120:
        raise _Fail("nested too deeply")
    if x is None or type(x) is bool:
        return x
    if type(x) is dict and len(x) == 1:
        (tag, v), = x.items()
        try:
            if tag == "i" and type(v) is str:
                return _check(int(v))
            if tag == "f" and type(v) is str:
                return float(v)
            if tag == "c" and type(v) is list and len(v) == 2:
                return complex(float(v[0]), float(v[1]))
            if tag == "s" and type(v) is str:
                return v
            if tag == "b" and type(v) is str:
                return bytes.fromhex(v)
            if tag in ("S", "F") and type(v) is list and len(v) > MAX_HASHED:
                raise _Fail(f"set over {MAX_HASHED} elements")
            if tag == "d" and type(v) is list and len(v) > MAX_HASHED:
                raise _Fail(f"dict over {MAX_HASHED} elements")
            if tag in ("l", "t", "S", "F", "G") and type(v) is list:
                items = [_decode(e, depth + 1) for e in v]
                return {"l": list, "t": tuple, "S": set, "F": frozenset, "G": Materialised}[tag](items)
            if tag == "d" and type(v) is list:
                return {_decode(kv[0], depth + 1): _decode(kv[1], depth + 1) for kv in v
                        if type(kv) is list and len(kv) == 2}
            if tag == "r" and type(v) is list and len(v) == 3 and all(type(e) is str for e in v):
                return range(*(_check(int(e)) for e in v))
            if tag == "Q" and type(v) is list and len(v) == 2 and all(type(e) is str for e in v):
                return _check(fractions.Fraction(int(v[0]), int(v[1])))
            if tag == "D" and type(v) is str and len(v) <= 200:
                d = decimal.Decimal(v)
                if d.is_finite() and abs(d.adjusted()) > 10_000:
                    raise _Fail("Decimal exponent too large")
                return d
            if tag == "T" and type(v) is str and (v in PARENT_FUNCS or v == "NoneType"):
                t = type(None) if v == "NoneType" else PARENT_FUNCS[v]
                if isinstance(t, type):
                    return t
            if tag in ("T", "T?") and type(v) is str:
                return Opaque(v[:100])
            if tag == "o" and type(v) is list and len(v) <= 50 and all(type(e) is str for e in v):
                return Instance([e[:100] for e in v])
        except (ValueError, TypeError, OverflowError, ZeroDivisionError, decimal.InvalidOperation) as e:
            raise _Fail(f"bad value: {type(e).__name__}") from None
    raise _Fail("not a tagged plain value")


def judge(r: Any, compiled: CompiledTest, nonce: str) -> str | None:
    """None when the run proves every assert held; otherwise why not."""
    checks = compiled.checks
    if r.timed_out:
        return "timeout"
    if r.returncode != 0:
        return f"exit status {r.returncode}"
    if r.stdout_truncated:
        return "report larger than the cap"
    records = []
    for line in r.stdout.splitlines():
        head, _, body = line.partition(" ")
        if head != nonce:
            return "foreign output on the report channel"
        try:
            records.append(json.loads(body))
        except (ValueError, RecursionError):
            return "malformed report"
    if not records or records[-1] != {"done": True} or {"done": True} in records[:-1]:
        return "the test did not run to its end"
    runs = [0] * len(checks)
    steps = _budget()
    for rec in records[:-1]:
        i = rec.get("a") if type(rec) is dict else None
        vals = rec.get("v") if type(rec) is dict else None
        if type(i) is not int or not 0 <= i < len(checks) or type(vals) is not list or \
                len(vals) != checks[i].n_slots:
            return "malformed report"
        if checks[i].max_runs is not None and runs[i] >= checks[i].max_runs:
            return f"assert #{i} ran more than {checks[i].max_runs} times"
        try:
            slots = [(True, _decode(v[1])) if type(v) is list and len(v) == 2 and v[0] == "ok"
                     else (False, str(v[1])[:80] if type(v) is list and len(v) == 2 else "?")
                     for v in vals]
            held = bool(_Evaluator(compiled.known, slots, steps).ev(checks[i].plan))
        except _Fail as e:
            return f"assert #{i}: {e}"
        except RecursionError:
            return f"assert #{i}: nested too deeply"
        except Exception as e:  # a comparison of mismatched types, as the assert itself would
            return f"assert #{i}: {type(e).__name__}"
        if not held:
            return f"assert #{i} failed"
        runs[i] += 1
    for i, c in enumerate(checks):
        if runs[i] < c.min_runs or (c.max_runs is not None and runs[i] > c.max_runs):
            return f"assert #{i} ran {runs[i]} times"
    return None


def run_assert_test(code: str, snippet: str, timeout_s: float, memory_mb: int,
                    entry_point: Any = None) -> tuple[bool, dict]:
    """Run one assertion test against ``code`` through the harness; (passed, details)."""
    from nanoseek.tasks.sandbox import run_code

    compiled = _compiled(snippet, tuple(sorted(_entry_points(entry_point))))
    nonce = secrets.token_hex(16)
    program = (f"_NONCE = {nonce!r}\n_CODE = {code!r}\n_TEST = {compiled.source!r}\n"
               f"_SHADOW = {set(compiled.shadow)!r}\n" + _HARNESS)
    r = run_code(program, "", timeout_s, memory_mb, max_output_bytes=REPORT_CAP_BYTES)
    why = judge(r, compiled, nonce)
    return why is None, {"passed": why is None, "reason": why or "ok", "returncode": r.returncode,
                         "killed_reason": r.killed_reason, "stderr_tail": r.stderr[-300:]}


@functools.lru_cache(maxsize=1024)
def _compiled(snippet: str, entry_points: tuple[str, ...]) -> CompiledTest:
    """The compiled test does not depend on the code: one compile per test, not per response
    (plans and parent values are never mutated when judged)."""
    return compile_assert_test(snippet, list(entry_points) or None)


def check_assert_test(snippet: str, entry_point: Any = None) -> CompiledTest:
    """The compiled test; ValueError when an assertion test cannot score code (see
    :func:`compile_assert_test`). Its ``exposed`` says an assert compares two values the sandbox
    computes (``assert candidate(*i) == r`` in a test-defined ``check``, ``f(x) == brute(x)``):
    the code can read or recompute that expected side."""
    return compile_assert_test(snippet, entry_point)


__all__ = ["compile_assert_test", "check_assert_test", "run_assert_test", "judge",
           "CompiledTest", "Check", "Materialised", "Opaque", "PARENT_FUNCS", "MAX_LEN",
           "MAX_INT_BITS", "MAX_UNROLL", "REPORT_CAP_BYTES"]
