"""The tree shows the architecture: no import cycle among the project's modules, and no
module in ``serve/`` or ``ops/`` over 350 lines.

Pure and fast: imports are read from the source with ``ast`` (those inside functions
count too), nothing is imported. ``from pkg import name`` depends on ``pkg.name`` when
that is a module, else on ``pkg`` itself (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 350
PACKAGES = ("serve", "ops")  # size-checked; top-level *.py (train.py) joins the import graph


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for serve/, ops/ and the top-level scripts."""
    mods = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    for path in sorted(root.glob("*.py")):
        mods[path.stem] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The project module ``name`` lives in (``serve.batch.core.Totals`` -> serve.batch.core)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that ``module`` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [_owner(a.name, mods) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods
                       else _owner(source, mods) for a in node.names]
        else:
            continue
        deps.update(t for t in targets if t and t != module)
    return deps


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    mods = project_modules(root)
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete cycle through the smallest module of a strongly connected group."""
    start = min(group)
    paths, seen = [[start]], {start}
    while paths:  # breadth first: the shortest way back to start
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & group):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    raise AssertionError(f"no cycle in {group}")  # a strongly connected group has one


def oversized(root: Path = ROOT, limit: int = MAX_LINES) -> dict[str, int]:
    """Modules of serve/ and ops/ over ``limit`` lines, with their line counts."""
    sizes = {str(p.relative_to(root)): len(p.read_text().splitlines())
             for top in PACKAGES for p in sorted((root / top).rglob("*.py"))}
    return {p: n for p, n in sizes.items() if n > limit}


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_over_350_lines():
    big = oversized()
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{p} ({n})" for p, n in sorted(big.items()))


def test_the_checks_can_fail(tmp_path):
    """A planted cycle (through a package's __init__) and a planted long module are found."""
    pkg = tmp_path / "serve" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "ops").mkdir()
    (pkg / "__init__.py").write_text("from serve.pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from serve.pkg import g\n")
    (pkg / "b.py").write_text("from serve.pkg import a\n" + "x = 1\n" * MAX_LINES)
    (tmp_path / "ops" / "ok.py").write_text("import serve.pkg.b\n")
    graph = import_graph(tmp_path)
    assert graph["serve.pkg.b"] == {"serve.pkg.a"}  # a submodule, not the package
    assert import_cycles(graph) == [["serve.pkg", "serve.pkg.a", "serve.pkg"]]
    assert oversized(tmp_path) == {"serve/pkg/b.py": MAX_LINES + 1}
