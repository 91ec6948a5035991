"""Architecture rules, checked by static analysis (``ast``); nothing of the project is imported.

Run as a script to print the import graph: ``python tests/test_layout.py [--root /path/to/repo]``.

The graph holds every project import (module level, ``try:``/``if TYPE_CHECKING:`` blocks, and function level):
an import hidden in a function still makes a dependency, and rule 1 forbids it anyway. Importing ``a.b.c`` also runs
``a/__init__`` and ``a/b/__init__``, so it adds edges to those packages, except to the importer's own
ancestor packages (already running whenever the importer runs) unless it is ``from pkg import name`` of
a name defined in ``pkg/__init__`` itself.
"""

from __future__ import annotations

import argparse
import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("simulator", "actors", "analysis")
PROJECT = frozenset({"simulator", "actors", "analysis", "benchmarks"})
COMPOSITION_ROOTS = frozenset({"actors.cli", "actors.api"})  # may import simulator, actors and analysis
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    src: str  # importing module
    target: str  # absolute module name (a submodule where ``from X import Y`` names one)
    path: str  # file, relative to the root
    line: int
    nested: bool  # inside a def, async def or class body
    binds_contents: bool = False  # ``from pkg import name`` of a name that is not a submodule
    dynamic: bool = False  # ``importlib.import_module("...")`` / ``__import__("...")``

    @property
    def top(self) -> str:
        return self.target.partition(".")[0]

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Layout:
    root: Path
    files: dict[str, Path]  # module -> file
    lines: dict[str, int]  # module -> line count
    imports: tuple[Import, ...]  # every import statement, third-party included


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dynamic_name(call: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")``, ``import_module("x")`` or ``__import__``."""
    f = call.func
    named = getattr(f, "attr", None) == "import_module" or getattr(f, "id", None) in ("import_module", "__import__")
    if named and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        name = call.args[0].value
        return None if name.startswith(".") else name
    return None


def parse_imports(module: str, is_package: bool, tree: ast.AST, path: str, modules: set[str]) -> list[Import]:
    out: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def add(target: str, node: ast.AST, nested: bool, **kw: bool) -> None:
        out.append(Import(module, target, path, node.lineno, nested, **kw))

    def walk(node: ast.AST, nested: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, nested)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                if sub in modules:
                    add(sub, node, nested)
                else:
                    add(base, node, nested, binds_contents=True)
        elif isinstance(node, ast.Call) and (name := _dynamic_name(node)):
            add(name, node, nested, dynamic=True)
        inner = nested or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        for child in ast.iter_child_nodes(node):
            walk(child, inner)

    walk(tree, False)
    return list(dict.fromkeys(out))  # one per statement and target


@functools.cache
def scan(root: Path = ROOT) -> Layout:
    paths = sorted(p for top in SCANNED for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)
    files = {module_name(p.relative_to(root)): p for p in paths}
    imports: list[Import] = []
    lines: dict[str, int] = {}
    for module, path in files.items():
        text = path.read_text(encoding="utf-8")
        lines[module] = len(text.splitlines())
        tree = ast.parse(text, filename=str(path))
        rel = path.relative_to(root).as_posix()
        imports += parse_imports(module, path.name == "__init__.py", tree, rel, set(files))
    return Layout(root, files, lines, tuple(imports))


def project_imports(layout: Layout) -> list[Import]:
    return [i for i in layout.imports if i.top in PROJECT]


def graph(layout: Layout) -> dict[str, dict[str, Import]]:
    """module -> {imported module: first import making that edge}; all modules are keys."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in layout.files}
    for imp in project_imports(layout):
        own = {imp.src.rsplit(".", k)[0] for k in range(1, imp.src.count(".") + 1)}  # importer's ancestors
        parts = imp.target.split(".")
        implied = [".".join(parts[:k]) for k in range(1, len(parts))]
        targets = [] if imp.target in own and not imp.binds_contents else [imp.target]
        targets += [a for a in implied if a in layout.files and a not in own and a != imp.src]
        for t in targets:
            edges.setdefault(t, {})
            edges[imp.src].setdefault(t, imp)
    return edges


def strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm; components come dependencies first (depth is bounded by the module count)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(edges[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            cut = len(stack) - stack[::-1].index(node) - 1
            out.append(sorted(stack[cut:]))
            del stack[cut:]

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def cycles(layout: Layout) -> list[str]:
    """One line per import cycle: its modules, and the import making each edge inside it."""
    edges = graph(layout)
    found = []
    for comp in strongly_connected(edges):
        if len(comp) > 1 or comp[0] in edges[comp[0]]:
            inside = [f"{a} -> {b} ({edges[a][b].where})" for a in comp for b in sorted(edges[a]) if b in comp]
            found.append(" <-> ".join(comp) + "\n      " + "\n      ".join(inside))
    return found


def layers(layout: Layout) -> list[list[str]]:
    """Topological layers of the condensed graph: a module's imports all lie in earlier layers (a cycle shares one)."""
    edges = graph(layout)
    level: dict[str, int] = {}
    for comp in strongly_connected(edges):  # dependencies come first
        deps = [level[b] for a in comp for b in edges[a] if b not in comp]
        for m in comp:
            level[m] = 1 + max(deps, default=-1)
    return [sorted(m for m in level if level[m] == k) for k in range(max(level.values(), default=-1) + 1)]


def nested_project_imports(layout: Layout) -> list[str]:
    return [
        f"{i.where}: {i.src} imports {i.target}" + (" (importlib)" if i.dynamic else "")
        for i in project_imports(layout)
        if i.nested or i.dynamic
    ]


def simulator_violations(layout: Layout) -> list[str]:
    """Rule 3: simulator is the pure core; it never imports ray, actors or analysis (function level included)."""
    return [f"{i.where}: {i.src} imports {i.target}" for i in layout.imports
            if i.src.partition(".")[0] == "simulator" and i.top in ("ray", "actors", "analysis")]


def actors_analysis_violations(layout: Layout) -> list[str]:
    """Rule 4: analysis never imports actors; of actors, only the composition roots import analysis."""
    roots = ", ".join(sorted(COMPOSITION_ROOTS))
    return [f"{i.where}: {i.src} imports {i.target}" + ("" if i.top == "actors" else f" (only {roots} may)")
            for i in layout.imports
            if (i.src.partition(".")[0], i.top) == ("analysis", "actors")
            or ((i.src.partition(".")[0], i.top) == ("actors", "analysis") and i.src not in COMPOSITION_ROOTS)]


def oversized(layout: Layout) -> list[str]:
    return [f"{p.relative_to(layout.root).as_posix()}: {layout.lines[m]} lines"
            for m, p in layout.files.items() if layout.lines[m] > MAX_LINES]


def _report(title: str, problems: list[str]) -> str:
    return f"{len(problems)} {title}:\n  " + "\n  ".join(problems)


def test_no_function_level_project_imports() -> None:
    problems = nested_project_imports(scan())
    assert not problems, _report("project imports inside a def/class body or via importlib", problems)


def test_no_import_cycles() -> None:
    problems = cycles(scan())
    assert not problems, _report("import cycles", problems)


def test_simulator_imports_no_ray_actors_or_analysis() -> None:
    problems = simulator_violations(scan())
    assert not problems, _report("imports of ray/actors/analysis in simulator", problems)


def test_analysis_and_actors_stay_apart() -> None:
    problems = actors_analysis_violations(scan())
    assert not problems, _report("imports between analysis and actors outside the composition root", problems)


def test_file_sizes() -> None:
    problems = oversized(scan())
    assert not problems, _report(f"files over {MAX_LINES} lines", problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: %(default)s)")
    root = parser.parse_args().root.resolve()
    layout = scan(root)
    edges = graph(layout)
    print(f"root: {root}\n{len(layout.files)} modules\n\nimports (project only):")
    for m in sorted(edges):
        print(f"  {m}{'' if m in layout.files else ' (no file)'}: {', '.join(sorted(edges[m])) or '-'}")
    sections = [
        ("import cycles", cycles(layout)),
        ("function-level / importlib project imports", nested_project_imports(layout)),
        ("imports of ray/actors/analysis in simulator", simulator_violations(layout)),
        ("imports between analysis and actors outside the composition root", actors_analysis_violations(layout)),
        (f"files over {MAX_LINES} lines", oversized(layout)),
    ]
    for title, problems in sections:
        print("\n" + _report(title, problems) if problems else f"\n0 {title}")
    print("\nlayers (a module imports only from earlier layers; modules in one cycle share a layer):")
    for k, layer in enumerate(layers(layout)):
        print(f"  {k}: {', '.join(layer)}")


if __name__ == "__main__":
    main()
