"""The bounded evaluator of the code reward: evaluates a plan (an expression whose model-dependent
parts are slot names) in this trusted process, over the values the sandbox reported.

Used twice (overview: :mod:`nanoseek.tasks.code_reward`): when a test compiles, to fold its
parent-evaluable parts once (:mod:`.assert_plan`), and when a run is judged, on the decoded
slot values (:func:`nanoseek.tasks.code_reward.judge`). Every node and comprehension step counts
against :data:`MAX_EVAL_STEPS` per run and the run's CPU time against :data:`MAX_EVAL_CPU_S`
(:func:`eval_budget`); every operation goes through the bounded values of :mod:`.assert_values`.
A slot is a name ``SLOT + index`` (:data:`SLOT` starts with a space, so no test can write it).
"""

from __future__ import annotations

import ast
import decimal
import fractions
import time
from collections import ChainMap
from typing import Any

from .assert_values import (
    BINOPS, BOUNDED_CALLS, COMPARE_OPS, MATH, MAX_HASHED, MAX_LEN, MODULES, UNARY_OPS, EvalFailure,
    Materialised, call_method, check_bounds, iterable_of,
)

MAX_EVAL_STEPS = 200_000  # plan nodes and comprehension steps evaluated per run of a test
MAX_EVAL_CPU_S = 2.0     # CPU seconds this process spends judging one run of a test
SLOT = " slot"          # plan nodes are Name(id=" slot<k>"): never a valid identifier


# ----------------------------------------------------------------------------- parent evaluation


def _is_slot(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id.startswith(SLOT)


def eval_budget() -> list:
    """The evaluation budget of one run: MAX_EVAL_STEPS steps and MAX_EVAL_CPU_S CPU seconds."""
    return [MAX_EVAL_STEPS, time.process_time() + MAX_EVAL_CPU_S]


def bind_target(target: ast.AST, value: Any, out: dict) -> bool:
    if isinstance(target, ast.Name):
        out[target.id] = value
        return True
    if isinstance(target, (ast.Tuple, ast.List)) and not any(isinstance(e, ast.Starred) for e in target.elts):
        try:
            values = list(iterable_of(value))
        except EvalFailure:
            return False
        if len(values) != len(target.elts):
            return False
        return all(bind_target(t, v, out) for t, v in zip(target.elts, values))
    return False


class Evaluator:
    """Evaluates a plan (an expression AST whose model-dependent parts are slot names) here,
    with every operation bounded. ``names`` maps each parent-known name to its value."""

    def __init__(self, names: Any, slots: list | None = None, steps: list | None = None):
        self.names = names
        self.slots = slots or []
        # [steps left, CPU deadline]: shared with children
        self.steps = steps if steps is not None else eval_budget()

    def ev(self, node: ast.AST) -> Any:
        self.steps[0] -= 1
        if self.steps[0] < 0:
            raise EvalFailure(f"evaluation over {MAX_EVAL_STEPS} steps")
        if self.steps[0] & 255 == 0 and time.process_time() > self.steps[1]:
            raise EvalFailure(f"evaluation over {MAX_EVAL_CPU_S} s of CPU")
        m = getattr(self, "_" + type(node).__name__, None)
        if m is None:
            raise EvalFailure(f"{type(node).__name__} is not evaluated here")
        return m(node)

    def _Constant(self, n):
        return n.value

    def _Name(self, n):
        if n.id.startswith(SLOT):
            ok, value = self.slots[int(n.id[len(SLOT):])]
            if not ok:
                raise EvalFailure(f"raised {value}")
            return value
        if n.id in self.names:
            return self.names[n.id]
        raise EvalFailure(f"name {n.id} is not evaluated here")

    def _List(self, n):
        return check_bounds([self.ev(e) for e in self._elts(n.elts)])

    def _Tuple(self, n):
        return check_bounds(tuple(self.ev(e) for e in self._elts(n.elts)))

    def _Set(self, n):
        return check_bounds({self.ev(e) for e in self._elts(n.elts)})

    def _elts(self, elts):
        out = []
        for e in elts:
            if isinstance(e, ast.Starred):
                raise EvalFailure("starred element is not evaluated here")
            out.append(e)
        return out

    def _Dict(self, n):
        if any(k is None for k in n.keys):
            raise EvalFailure("** in a dict display is not evaluated here")
        return check_bounds({self.ev(k): self.ev(v) for k, v in zip(n.keys, n.values)})

    def _BoolOp(self, n):
        value = None
        for v in n.values:
            value = self.ev(v)
            if bool(value) != isinstance(n.op, ast.And):
                return value
        return value

    def _UnaryOp(self, n):
        return check_bounds(UNARY_OPS[type(n.op)](self.ev(n.operand)))

    def _BinOp(self, n):
        op = BINOPS.get(type(n.op))
        if op is None:
            raise EvalFailure(f"{type(n.op).__name__} is not evaluated here")
        return check_bounds(op(self.ev(n.left), self.ev(n.right)))

    def _Compare(self, n):
        left = self.ev(n.left)
        for op, c in zip(n.ops, n.comparators):
            right = self.ev(c)
            if not COMPARE_OPS[type(op)](left, right):
                return False
            left = right
        return True

    def _IfExp(self, n):
        return self.ev(n.body) if self.ev(n.test) else self.ev(n.orelse)

    def _Subscript(self, n):
        value = self.ev(n.value)
        if not isinstance(value, (str, bytes, list, tuple, dict, range)):
            raise EvalFailure(f"subscript of {type(value).__name__} is not evaluated here")
        return check_bounds(value[self.ev(n.slice)])

    def _comprehension(self, n):
        out: list = []
        dict_comp = isinstance(n, ast.DictComp)
        hashed = dict_comp or isinstance(n, ast.SetComp)

        def walk(i: int, ev: "Evaluator") -> None:
            if i == len(n.generators):
                out.append((ev.ev(n.key), ev.ev(n.value)) if dict_comp else ev.ev(n.elt))
                return
            g = n.generators[i]
            for item in iterable_of(ev.ev(g.iter)):
                self.steps[0] -= 1
                if self.steps[0] < 0 or len(out) > MAX_LEN:
                    raise EvalFailure(f"evaluation over {MAX_EVAL_STEPS} steps")
                if hashed and len(out) > MAX_HASHED:
                    raise EvalFailure(f"set/dict over {MAX_HASHED} elements")
                b: dict[str, Any] = {}
                if not bind_target(g.target, item, b):
                    raise EvalFailure("cannot unpack a comprehension item")
                child = Evaluator(ChainMap(b, ev.names), self.slots, self.steps)
                if all(child.ev(c) for c in g.ifs):
                    walk(i + 1, child)

        walk(0, self)
        if dict_comp:
            return check_bounds(dict(out))
        if isinstance(n, ast.SetComp):
            return check_bounds(set(out))
        return check_bounds(out) if isinstance(n, ast.ListComp) else Materialised(out)

    _ListComp = _SetComp = _GeneratorExp = _DictComp = _comprehension

    def _Slice(self, n):
        return slice(*(None if p is None else self.ev(p) for p in (n.lower, n.upper, n.step)))

    def _Attribute(self, n):
        if isinstance(n.value, ast.Name) and isinstance(self.names.get(n.value.id), dict) and \
                n.value.id in MODULES and n.attr in self.names[n.value.id]:
            return self.names[n.value.id][n.attr]
        raise EvalFailure(f"attribute .{n.attr} is not evaluated here")

    def _Call(self, n):
        if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
            raise EvalFailure("*args/**kwargs are not evaluated here")
        args = [self.ev(a) for a in n.args]
        kw = {k.arg: self.ev(k.value) for k in n.keywords}
        if isinstance(n.func, ast.Attribute) and not (isinstance(n.func.value, ast.Name) and
                                                      n.func.value.id in MODULES and
                                                      n.func.value.id in self.names):
            return call_method(self.ev(n.func.value), n.func.attr, args, kw)
        fn = self.ev(n.func)
        if fn in (fractions.Fraction, decimal.Decimal):
            for a in args:
                if isinstance(a, str) and len(a) > 200:
                    raise EvalFailure("numeric string too long")
            value = fn(*args, **kw)
            if type(value) is decimal.Decimal and value.is_finite() and abs(value.adjusted()) > 10_000:
                raise EvalFailure("Decimal exponent too large")
            return check_bounds(value)
        try:
            wrapped = BOUNDED_CALLS.get(fn) or (fn if fn in _MATH_FUNCS else None)
        except TypeError:  # unhashable
            wrapped = None
        if wrapped is None:
            raise EvalFailure("call is not evaluated here")
        return check_bounds(wrapped(*args, **kw))


_MATH_FUNCS = {v for v in MATH.values() if callable(v)}


__all__ = ["MAX_EVAL_STEPS", "MAX_EVAL_CPU_S", "SLOT", "Evaluator", "eval_budget", "bind_target"]
