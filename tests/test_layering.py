"""The package's layering, checked from source: no import cycles, no library code importing the CLI,
lower layers never importing higher ones, and ``nanoseek --help`` starting without torch.

Every module under ``nanoseek/`` is parsed with ``ast``; every import counts, at module level and
inside functions (a function-level import is still a dependency, just a lazy one), and relative
imports are resolved against the importing module's package. ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module, else of ``pkg``. Only edges between modules of the
package are kept; the graph is then searched for cycles (Tarjan's strongly connected components).

Layers (a module may import only its own layer or below):

- ``model/`` imports nothing from the rest of the package except the ground floor
  (``nanoseek.errors``, ``nanoseek.limits``, ``nanoseek.atomic``, ``nanoseek.claims``);
- ``tasks/`` imports nothing from ``post/``, ``eval/``, ``infer/``, ``serve/``;
- ``eval/`` imports nothing from ``post/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "nanoseek"

# Modules every layer may import: the ground floor.
GROUND = {"nanoseek", "nanoseek.errors", "nanoseek.limits", "nanoseek.atomic", "nanoseek.claims"}
# (importing package prefix, forbidden prefixes, allowed exceptions)
LAYER_RULES = [
    ("nanoseek.model", ("nanoseek.",), GROUND | {"nanoseek.model"}),
    ("nanoseek.tasks", ("nanoseek.post", "nanoseek.eval", "nanoseek.infer", "nanoseek.serve"), set()),
    ("nanoseek.eval", ("nanoseek.post",), set()),
]
CLI_IMPORTERS = {"nanoseek.cli", "nanoseek.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                base_name = ".".join(base)
                target = f"{base_name}.{node.module}" if node.module else base_name
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    out = set()
    for mod in found:
        # `import nanoseek.model.moe` names a module; keep the longest known prefix.
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.add(mod)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
    return "cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(edges)


def _is_under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".") or (prefix.endswith(".") and mod.startswith(prefix))


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # function-level, relative: estimate/cli.py imports `.estimate` inside a function
    assert "nanoseek.estimate.estimate" in graph["nanoseek.estimate.cli"]
    # __main__ imports the CLI at module level
    assert "nanoseek.cli" in graph["nanoseek.__main__"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles in nanoseek/:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_library_code_does_not_import_the_cli():
    graph = import_graph()
    bad = sorted(f"{m} imports nanoseek.cli" for m, deps in graph.items()
                 if "nanoseek.cli" in deps and m not in CLI_IMPORTERS)
    assert not bad, "library code must take UserError from nanoseek.errors, not nanoseek.cli:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer,forbidden,allowed", LAYER_RULES, ids=[r[0] for r in LAYER_RULES])
def test_lower_layers_do_not_import_higher_ones(layer, forbidden, allowed):
    graph = import_graph()
    bad = []
    for mod, deps in sorted(graph.items()):
        if not _is_under(mod, layer):
            continue
        for dep in sorted(deps):
            if dep in allowed or any(_is_under(dep, a) for a in allowed if a != "nanoseek"):
                continue
            if any(_is_under(dep, f) for f in forbidden):
                bad.append(f"{mod} -> {dep}")
    assert not bad, f"{layer} imports a higher layer:\n" + "\n".join(bad)


def test_help_does_not_import_torch():
    code = (
        "import sys, io, contextlib\n"
        "sys.argv = ['nanoseek', '--help']\n"
        "import runpy\n"
        "out = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        runpy.run_module('nanoseek', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'usage' in out.getvalue().lower(), out.getvalue()\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "TORCH False", "`nanoseek --help` imported torch: keep the CLI's imports lazy"
