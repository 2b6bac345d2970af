"""The package's layering, checked from source: no import cycles, no library code importing the CLI,
lower layers never importing higher ones, and ``nanoseek --help`` starting without torch.

Every module under ``nanoseek/`` is parsed with ``ast``; every import counts, at module level and
inside functions (a function-level import is still a dependency, just a lazy one), and relative
imports are resolved against the importing module's package. ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module, else of ``pkg``. Only edges between modules of the
package are kept; the graph is then searched for cycles (Tarjan's strongly connected components).

Layers (:data:`LAYERS`, bottom up; a module may import only its own layer or lower ones): the
ground floor (errors, atomic writes, output folders) < ``model/`` < ``limits``, ``estimate/`` <
``data/``, ``tasks/``, ``tools/`` < ``train/`` < ``infer/`` < ``post/``, ``eval/``, ``export/`` < ``serve/`` < the jobs
(speedrun, ablate, demo) < the command line. Siblings that must stay apart (:data:`APART`):
``eval/`` and ``post/`` import nothing of each other; ``tasks/`` uses ``data/``'s tokenizer but
not the corpus and preparation built on top of the tasks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "nanoseek"

# The layers of the package, bottom up (README "Architecture map"): a module imports only modules
# of its own layer or lower ones. Modules not listed are a finding of the test.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("nanoseek", "nanoseek.errors", "nanoseek.atomic", "nanoseek.claims", "nanoseek.outdir")),
    ("model", ("nanoseek.model", "nanoseek.model.v4")),
    ("over the model", ("nanoseek.limits", "nanoseek.estimate")),
    ("data, tasks and tools", ("nanoseek.data", "nanoseek.tasks", "nanoseek.tools")),
    ("train", ("nanoseek.train",)),
    ("infer", ("nanoseek.infer",)),
    ("post-training, evaluation and export", ("nanoseek.post", "nanoseek.eval", "nanoseek.export")),
    ("serve", ("nanoseek.serve",)),
    ("jobs", ("nanoseek.speedrun", "nanoseek.speedrun_recipe", "nanoseek.speedrun_machine", "nanoseek.ablate",
              "nanoseek.demo")),
    ("command line", ("nanoseek.cli", "nanoseek.__main__")),
]
# Siblings in one layer that must not import each other: (importer prefix, forbidden prefixes).
APART = [
    ("nanoseek.eval", ("nanoseek.post",)),
    ("nanoseek.post", ("nanoseek.eval",)),
    ("nanoseek.tasks", ("nanoseek.data.corpus", "nanoseek.data.prepare", "nanoseek.data.prepare_cli",
                        "nanoseek.data.tokenizer_cli")),
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


def layer_of(mod: str) -> int | None:
    """Index in :data:`LAYERS` of the most specific prefix that holds ``mod``."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or (p != "nanoseek" and mod.startswith(p + "."))) and len(p) > length:
                best, length = i, len(p)
    return best


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_lower_layers_do_not_import_higher_ones():
    graph = import_graph()
    bad = [f"{mod} ({LAYERS[layer_of(mod)][0]}) -> {dep} ({LAYERS[layer_of(dep)][0]})"
           for mod, deps in sorted(graph.items()) for dep in sorted(deps)
           if layer_of(mod) is not None and layer_of(dep) is not None and layer_of(dep) > layer_of(mod)]
    assert not bad, "a module imports a higher layer:\n" + "\n".join(bad)


def test_layer_check_catches_an_upward_import():
    assert layer_of("nanoseek.model.moe") < layer_of("nanoseek.train.loop") < layer_of("nanoseek.post.grpo")
    assert layer_of("nanoseek.model.v4.transformer") == layer_of("nanoseek.model.moe")
    assert layer_of("nanoseek.errors") == 0 and layer_of("nanoseek.cli") == len(LAYERS) - 1


@pytest.mark.parametrize("importer,forbidden", APART, ids=[r[0] for r in APART])
def test_siblings_stay_apart(importer, forbidden):
    graph = import_graph()
    bad = [f"{mod} -> {dep}" for mod, deps in sorted(graph.items()) if _is_under(mod, importer)
           for dep in sorted(deps) if any(_is_under(dep, f) for f in forbidden)]
    assert not bad, f"{importer} imports what it must not:\n" + "\n".join(bad)


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
