"""The package's layout rules (README "Layout"): no library module over 400 lines, no function over 60 lines but
the engine's run loop, and no import circle between modules at import time."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "skipviz"
#: written inline on purpose: a helper per block measured 6-10 µs slower per batch-1 forward (engine/network.py)
LONG_FUNCTIONS_ALLOWED = {("engine/network.py", "run")}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports when it is imported: module-level statements only (not inside
    functions, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod in known:
                    found.add(mod)
                for a in node.names:  # ``from . import x`` imports the submodule x
                    if f"{mod}.{a.name}" in known:
                        found.add(f"{mod}.{a.name}")

    visit(tree.body)
    found.discard(name)
    return found


def test_no_library_module_over_400_lines_and_no_function_over_60():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                key = (str(path.relative_to(PACKAGE)), node.name)
                if n > 60 and key not in LONG_FUNCTIONS_ALLOWED:
                    long_functions.append(f"{key[0]}:{node.name}: {n} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_no_import_circle_between_modules():
    mods = _modules()
    known = set(mods)
    graph = {name: _top_level_imports(name, path, known) for name, path in mods.items()}
    # a package's __init__ re-exporting its submodules is not a circle with them; a submodule that imports a
    # package above it (its __init__, which imports the submodule back) is
    upward = [f"{name} imports {d}" for name, deps in graph.items() for d in deps if name.startswith(d + ".")]
    assert not upward, upward
    for name in graph:
        graph[name] = {d for d in graph[name] if not (d.startswith(name + ".") and (PACKAGE.parent / Path(
            *name.split("."))).is_dir())}
    circles, state = [], {}

    def dfs(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                dfs(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [])
    assert not circles, circles
