"""Compiling an assertion test for the code reward: its shape (where every assert sits, which must
run and how often), the load check, and the :class:`CompiledTest` a run is judged against.

:func:`compile_assert_test` parses a test, plans every assert with :mod:`.assert_plan` and
rewrites each into a call of the harness's check with its slots; the result does not depend on
the code under test. It refuses (ValueError, one line) a test that does not parse, has no
assert that must run, or has an assert that does not depend on the code;
:func:`check_assert_test` is that check as datasets run it when they load a record
(:func:`nanoseek.tasks.rewards.check_code_tests`), with ``exposed`` set when an assert compares
two values the sandbox computes. Overview: :mod:`nanoseek.tasks.code_reward`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from .assert_values import MATH, PARENT_FUNCS, PARENT_VALUES
from .assert_eval import SLOT
from .assert_plan import Compiler, UnrollLoops, free_names, propagate_constants, scan_bindings

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


def entry_point_names(entry_point: Any) -> set[str]:
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
    owned = entry_point_names(entry_point)
    rebound, imported = scan_bindings(tree)
    known: dict[str, Any] = {k: v for k, v in {**PARENT_FUNCS, **PARENT_VALUES}.items()
                             if k not in owned and k not in rebound}
    if "math" not in owned and "math" not in rebound:
        known["math"] = MATH
    known.update(imported)  # the test's own import wins over whatever the model bound
    compiler = Compiler(known)
    propagate_constants(tree, compiler)
    tree = ast.fix_missing_locations(UnrollLoops(compiler).visit(tree))
    # a loop over what only the model's code computes (``for x in f(1)``: no name the test binds)
    # may run 0 times, unless no other model-dependent assert must run (then an empty answer
    # would pass the whole test, so such a loop must still run)
    def model_iter(it: ast.expr) -> bool:
        names = free_names(it)
        return not (names & rebound) and not compiler.parent_ok(it)

    sites = list(_assert_sites(tree.body, model_iter=model_iter))
    strict = list(_assert_sites(tree.body))
    if not any(not c and free_names(n.test) - set(known) for n, c, _ in sites):
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
                any(isinstance(m, ast.Name) and m.id.startswith(SLOT) for m in ast.walk(side))
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


def check_assert_test(snippet: str, entry_point: Any = None) -> CompiledTest:
    """The compiled test; ValueError when an assertion test cannot score code (see
    :func:`compile_assert_test`). Its ``exposed`` says an assert compares two values the sandbox
    computes (``assert candidate(*i) == r`` in a test-defined ``check``, ``f(x) == brute(x)``):
    the code can read or recompute that expected side."""
    return compile_assert_test(snippet, entry_point)


__all__ = ["Check", "CompiledTest", "compile_assert_test", "check_assert_test", "entry_point_names"]
