"""The `neco` package's import graph has no cycle.

The graph is built statically (`ast`, no import runs): an edge A -> B for every `import neco.B`,
`from neco.B import x`, `from neco import B` or relative import in A. Imports at module level and imports inside
functions are kept apart: a module-level cycle fails at import time in some orders; a function-level one hides a
design tangle (two modules that each need the other). Both must be acyclic.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neco"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute module named by a `from ... import` (relative levels resolved against the importer)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def closest_module(name: str, modules: set[str]) -> str | None:
    """`neco.a.b.c` -> the longest prefix that is a module of the package (a name imported from a module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def targets(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = resolve(importer, is_package, node)
        # `from neco.x import y` may import the submodule neco.x.y or a name defined in neco.x
        names = [f"{base}.{alias.name}" for alias in node.names]
    found = {closest_module(name, modules) for name in names if name.split(".")[0] == "neco"}
    edges = set()
    for module in filter(None, found):
        # importing neco.a.b runs neco/a/__init__.py first, unless the importer already lives inside neco.a
        parts = module.split(".")
        for end in range(1, len(parts) + 1):
            package = ".".join(parts[:end])
            if not (importer == package or importer.startswith(package + ".")):
                edges.add(package)
    return edges


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) of every module under `package` (neco/)."""
    files = {module_name(path, package.parent): path for path in package.rglob("*.py")}
    modules = set(files)
    top: dict[str, set[str]] = {name: set() for name in modules}
    inner: dict[str, set[str]] = {name: set() for name in modules}

    def visit(name, is_package, node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never imported at run time
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top)[name] |= targets(name, is_package, child, modules)
            visit(name, is_package, child, nested)

    for name, path in files.items():
        visit(name, path.name == "__init__.py", ast.parse(path.read_text(), str(path)), False)
    return top, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a module chain (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(name):
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = walk(target)
                if cycle:
                    return cycle
        stack.pop()
        state[name] = 2
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for name in sorted(graph):
        if name not in state:
            cycle = walk(name)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_known_edges():
    top, inner = import_graph()
    assert "neco.errors" in top["neco.cli"]  # a module-level import
    assert "neco.engine.trainer" in inner["neco.train"]  # an import inside a function (kept out of --help)


def test_a_cycle_through_a_function_level_relative_import_is_found(tmp_path):
    package = tmp_path / "neco"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from neco.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from ..a import other\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from neco import a\n")
    top, inner = import_graph(package)
    assert top["neco.a"] == {"neco.sub", "neco.sub.b"} and inner["neco.sub.b"] == {"neco.a"}
    assert top["neco.c"] == set()  # annotation-only imports never run
    assert find_cycle(top) is None
    assert find_cycle({name: top[name] | inner[name] for name in top}) == ["neco.a", "neco.sub.b", "neco.a"]


def test_module_level_imports_have_no_cycle():
    top, _ = import_graph()
    cycle = find_cycle(top)
    assert cycle is None, "import cycle at module level: " + " -> ".join(cycle)


def test_imports_inside_functions_close_no_cycle():
    top, inner = import_graph()
    combined = {name: top[name] | inner[name] for name in top}
    cycle = find_cycle(combined)
    assert cycle is None, "import cycle through imports inside functions: " + " -> ".join(cycle)
