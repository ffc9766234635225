"""Layering of the package, read from the source with `ast` (nothing is imported):

- no import cycle among workbench modules (kernels/ counts as `workbench.kernels`), counting imports inside
  functions too (a lazy import still ties two modules together) but not those under `if TYPE_CHECKING:`;
- the core (everything but workbench.ui, workbench.commands, workbench.cli) never imports the UI or the CLI;
- no core module imports a private name (`_x`) of another workbench module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONT = ("workbench.ui", "workbench.commands", "workbench.cli")


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT / "workbench", "workbench"), (ROOT / "kernels", "workbench.kernels")):
        for path in base.rglob("*.py"):
            parts = [prefix, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST, package: str):
    """(imported module, imported names) of every import statement outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{pkg}.{base}" if base else pkg
            yield base, [alias.name for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Edges module -> workbench modules it imports, and (importer, module, name) of private-name imports."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for base, names in _imports(ast.parse(path.read_text()), package):
            targets = [base] + [f"{base}.{n}" for n in names]
            edges[mod].update(t for t in targets if t in mods and t != mod)
            if base in mods and base != mod:
                private += [(mod, base, n) for n in names if n.startswith("_") and not n.startswith("__")]
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(edges):
        if start in state:
            continue
        path, iters = [start], [iter(sorted(edges[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(edges.get(nxt, ()))))
    return None


def _is_front(mod: str) -> bool:
    return any(mod == f or mod.startswith(f + ".") for f in FRONT)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_lazy_imports():
    edges, _ = import_graph()
    # runtime/qlinear.py imports the kernel checks inside a function only
    assert "workbench.kernels.checks" in edges["workbench.runtime.qlinear"]
    assert "workbench.quant.registry" in edges["workbench.quant.spec"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_never_imports_the_ui_or_the_cli():
    edges, _ = import_graph()
    bad = [(m, t) for m, ts in edges.items() if not _is_front(m) for t in ts if _is_front(t)]
    assert not bad, f"core modules importing ui/commands/cli: {bad}"


def test_core_imports_no_private_names():
    _, private = import_graph()
    bad = [p for p in private if not _is_front(p[0])]
    assert not bad, f"private names imported across modules: {bad}"
