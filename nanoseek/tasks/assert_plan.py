"""Planning an assertion test of the code reward: which names the test binds, which parts of an
assert this process can evaluate, and the rewrites that leave the sandbox only what needs the code.

:class:`Compiler` splits an assert's expression into a *plan* evaluated here and *slots*, the
sub-expressions that need the model's code (overview: :mod:`nanoseek.tasks.code_reward`);
:func:`propagate_constants` folds names the test binds once to a parent-evaluable value,
:class:`UnrollLoops` unrolls ``for`` loops over parent-evaluable data (at most
:data:`MAX_UNROLL` copies per test) and :func:`scan_bindings` finds the names a test binds and
the modules it genuinely imports. :mod:`.assert_compile` drives these over a whole test.
"""

from __future__ import annotations

import ast
import copy
from typing import Any

from .assert_values import ALL_METHODS, MODULES, EvalFailure, iterable_of
from .assert_eval import SLOT, Evaluator, bind_target

MAX_UNROLL = 2_000       # loop iterations and comprehension elements unrolled per test


# ----------------------------------------------------------------------------- scanning names


def scan_bindings(tree: ast.AST) -> tuple[set[str], dict[str, Any]]:
    """(names the test binds itself, names it imports from :data:`MODULES` genuinely)."""
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
                if a.asname is None and a.name in MODULES:
                    imported[a.name] = MODULES[a.name]
                else:
                    bound.add((a.asname or a.name).split(".")[0])
        elif isinstance(n, ast.ImportFrom):
            for a in n.names:
                if n.module in MODULES and a.name in MODULES[n.module]:
                    imported[a.asname or a.name] = MODULES[n.module][a.name]
                else:
                    bound.add(a.asname or a.name)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    return bound - set(imported), imported


# ----------------------------------------------------------------------------- planning


def free_names(node: ast.AST) -> set[str]:
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


class _Substitute(ast.NodeTransformer):
    def __init__(self, values: dict[str, ast.expr]):
        self.values = values

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.values:
            return copy.deepcopy(self.values[node.id])
        return node


class Compiler:
    def __init__(self, known: dict[str, Any]):
        self.known = known          # parent-known names and their values
        self.budget = MAX_UNROLL

    def parent_ok(self, node: ast.AST, extra: set[str] = frozenset()) -> bool:
        return all(isinstance(n, _PLANNABLE) for n in ast.walk(node)) and \
            free_names(node) <= set(self.known) | extra

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
            bound |= free_names(g.target)
            if not all(self.parent_ok(c, bound) for c in g.ifs):
                return None
        elts = (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)
        if not all(self.parent_ok(e, bound) for e in elts):
            return None
        new = copy.deepcopy(node)
        new.generators[0].iter = self.plan(gens[0].iter, slots)
        return new

    def evaluate(self, node: ast.AST) -> Any:
        return Evaluator(self.known).ev(node)

    def bindings(self, target: ast.AST, iter_node: ast.AST) -> list[dict[str, ast.expr]] | None:
        """One substitution per iteration of a parent-evaluable loop, or None."""
        if not self.parent_ok(iter_node):
            return None
        try:
            items = list(iterable_of(self.evaluate(iter_node)))
        except (EvalFailure, Exception):
            return None
        if len(items) > self.budget:
            return None
        out = []
        for item in items:
            b: dict[str, Any] = {}
            if not bind_target(target, item, b):
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
                    except (EvalFailure, Exception):
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
            except Exception:  # EvalFailure or the test's own error: it fails the same way when judged
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
                    f.value.id in MODULES and f.value.id in self.known:
                decomposable = True
            elif isinstance(f, ast.Attribute) and f.attr in ALL_METHODS:
                new = copy.copy(node)
                new.func = ast.Attribute(self.plan(f.value, slots), f.attr, ast.Load())
                new.args = [self.plan(a, slots) for a in node.args]
                new.keywords = [ast.keyword(k.arg, self.plan(k.value, slots)) for k in node.keywords]
                return new
        if not decomposable:
            slots.append(_FoldInSlot(self).visit(copy.deepcopy(node)))
            return ast.Name(f"{SLOT}{len(slots) - 1}", ast.Load())
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


def propagate_constants(tree: ast.Module, compiler: Compiler) -> None:
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
                except Exception:  # EvalFailure, or the test's own error: leave it to the sandbox
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

    def __init__(self, compiler: Compiler):
        self.compiler = compiler

    def visit(self, node):
        if isinstance(node, ast.expr) and not isinstance(node, (ast.Constant, ast.Starred)) and \
                self.compiler.parent_ok(node):
            try:
                literal = _to_ast(self.compiler.evaluate(node))
            except Exception:  # EvalFailure or the test's own error: the sandbox meets it as written
                literal = None
            if literal is not None:
                return literal
        return self.generic_visit(node)


class UnrollLoops(ast.NodeTransformer):
    def __init__(self, compiler: Compiler):
        self.compiler = compiler

    def visit_For(self, node):
        body_stores = {n.id for st in node.body for n in ast.walk(st)
                       if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        targets = free_names(node.target)
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


__all__ = ["MAX_UNROLL", "Compiler", "UnrollLoops", "propagate_constants", "scan_bindings", "free_names"]
