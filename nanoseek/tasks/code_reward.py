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
parent-known operations, never enter the sandbox. Read, not changed: before the test runs, the
harness puts back every module imported before the code ran (common ones are imported first) and
the classes they hold as they were, and forgets the modules the code imported (the test imports
them afresh), so the code cannot patch what a test helper computes with (``math.sqrt = lambda v:
5.0`` before ``norm(point()) == 5``); the code's own references keep what it patched.

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

Where each part lives: :mod:`.assert_values` (bounds, the reported value types, the bounded
builtins and methods), :mod:`.assert_eval` (the bounded evaluator of plans), :mod:`.assert_plan`
(names, slots, folding and unrolling), :mod:`.assert_compile` (a test's shape, the load check,
:class:`~.assert_compile.CompiledTest`), and this module: the run (the sandbox harness, decoding
its report, :func:`judge`, :func:`run_assert_test`).
"""

from __future__ import annotations

import decimal
import fractions
import functools
import json
import secrets
from typing import Any

from .assert_values import MAX_HASHED, PARENT_FUNCS, EvalFailure, Instance, Materialised, Opaque, check_bounds
from .assert_eval import Evaluator, eval_budget
from .assert_compile import CompiledTest, compile_assert_test, entry_point_names

REPORT_CAP_BYTES = 1 << 20  # the slot values of one run, as JSON


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

# What the test's own code (a helper it defines, run here) may use, as it was before the code ran:
# the modules imported so far (common ones imported now) and the classes they hold. The code could
# otherwise make a helper's result its own: math.sqrt = lambda v: 5.0 before norm(point()) == 5.
import math, cmath, itertools, functools, operator, collections, heapq, bisect, re, string, statistics
import random, copy, typing, numbers, array, datetime
_MISSING = object()
_MODULES = {_n: (_m, dict(vars(_m))) for _n, _m in list(_sys.modules.items())
            if _m is not None and _n != "__main__"}
_CLASSES = [(_c, dict(vars(_c))) for _m, _d in _MODULES.values() for _c in _d.values()
            if _isinstance(_c, type) and _c.__flags__ & (1 << 9) and not _c.__flags__ & (1 << 8)]

def _restore():
    for _n in [_n for _n in _sys.modules if _n not in _MODULES and _n != "__main__"]:
        _o = getattr(getattr(_sys.modules[_n], "__spec__", None), "origin", None) or ""
        if not _o.endswith((".so", ".pyd")) and _o != "built-in":   # (compiled modules load once a process)
            del _sys.modules[_n]      # imported by the code: the test imports it afresh
    for _n, (_m, _d) in _MODULES.items():
        _sys.modules[_n] = _m
        _v = vars(_m)
        if _len(_v) != _len(_d) or any(_v.get(_k, _MISSING) is not _x for _k, _x in _d.items()):
            _v.clear()
            _v.update(_d)
    for _c, _d in _CLASSES:
        _v = vars(_c)
        for _k in [_k for _k in _v if _k not in _d]:
            delattr(_c, _k)
        for _k, _x in _d.items():
            if _v.get(_k, _MISSING) is not _x:
                setattr(_c, _k, _x)

_ns = {"__name__": "__main__", "__builtins__": _b}
exec(compile(_CODE, "solution.py", "exec"), _ns)
_restore()
# the test sees the code's module-level names, its builtins that the parent knows it defines
# (entry points included: never the real builtin in their place), and otherwise the pristine ones
_t = {k: v for k, v in _ns.items() if k not in _PRISTINE or k in _SHADOW}
_t.update(__builtins__={k: v for k, v in _PRISTINE.items() if k not in _SHADOW},
          __name__="__main__", __nanoseek_check__=__nanoseek_check__)
exec(compile(_TEST, "test.py", "exec"), _t)
_emit({"done": True})
"""


def _decode(x: Any, depth: int = 0) -> Any:
    """A slot value from its tagged JSON form into plain built-in data; EvalFailure otherwise."""
    if depth > 120:
        raise EvalFailure("nested too deeply")
    if x is None or type(x) is bool:
        return x
    if type(x) is dict and len(x) == 1:
        (tag, v), = x.items()
        try:
            if tag == "i" and type(v) is str:
                return check_bounds(int(v))
            if tag == "f" and type(v) is str:
                return float(v)
            if tag == "c" and type(v) is list and len(v) == 2:
                return complex(float(v[0]), float(v[1]))
            if tag == "s" and type(v) is str:
                return v
            if tag == "b" and type(v) is str:
                return bytes.fromhex(v)
            if tag in ("S", "F") and type(v) is list and len(v) > MAX_HASHED:
                raise EvalFailure(f"set over {MAX_HASHED} elements")
            if tag == "d" and type(v) is list and len(v) > MAX_HASHED:
                raise EvalFailure(f"dict over {MAX_HASHED} elements")
            if tag in ("l", "t", "S", "F", "G") and type(v) is list:
                items = [_decode(e, depth + 1) for e in v]
                return {"l": list, "t": tuple, "S": set, "F": frozenset, "G": Materialised}[tag](items)
            if tag == "d" and type(v) is list:
                return {_decode(kv[0], depth + 1): _decode(kv[1], depth + 1) for kv in v
                        if type(kv) is list and len(kv) == 2}
            if tag == "r" and type(v) is list and len(v) == 3 and all(type(e) is str for e in v):
                return range(*(check_bounds(int(e)) for e in v))
            if tag == "Q" and type(v) is list and len(v) == 2 and all(type(e) is str for e in v):
                return check_bounds(fractions.Fraction(int(v[0]), int(v[1])))
            if tag == "D" and type(v) is str and len(v) <= 200:
                d = decimal.Decimal(v)
                if d.is_finite() and abs(d.adjusted()) > 10_000:
                    raise EvalFailure("Decimal exponent too large")
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
            raise EvalFailure(f"bad value: {type(e).__name__}") from None
    raise EvalFailure("not a tagged plain value")


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
    steps = eval_budget()
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
            held = bool(Evaluator(compiled.known, slots, steps).ev(checks[i].plan))
        except EvalFailure as e:
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

    compiled = _compiled(snippet, tuple(sorted(entry_point_names(entry_point))))
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


__all__ = ["REPORT_CAP_BYTES", "judge", "run_assert_test"]
