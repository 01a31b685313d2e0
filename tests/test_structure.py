"""The package's layout (read from its source with ``ast``, nothing imported): no import circle, and no
module that takes another's ``_private`` names. Imports inside functions count like those at the top: a
circle that only a late import keeps from failing is still a circle."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "companion" / "llama_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import of the package's own modules."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "llama_jax"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "llama_jax":
                continue
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:  # `from . import convert`: the module itself
                    found.append((f"{target}.{alias.name}", None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    """module -> the modules it imports (a submodule's import runs its subpackage's __init__ too; the
    top package's __init__, which every module runs, is left out, as is a module's own subpackage)."""
    edges = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in imports(name):
            parts = target.split(".")
            for end in range(2, len(parts) + 1):
                parent = ".".join(parts[:end])
                if parent in MODULES and parent != name and not name.startswith(parent + "."):
                    edges[name].add(parent)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_the_package():
    edges = graph()
    assert {"llama_jax.weights", "llama_jax.checkpoints", "llama_jax.convert.gguf"} <= edges.keys()
    assert "llama_jax.weights" in edges["llama_jax.checkpoints"]  # the entry sits above the loader
    assert "llama_jax.config" in edges["llama_jax.convert.gguf"]


def test_no_import_circle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_from_another_module(name):
    """A module that needs another's helper is asking for a public seam: name it and export it."""
    taken = [f"line {line}: {target}.{n}" for target, n, line in imports(name) if n and is_private(n)]
    tree = ast.parse(MODULES[name].read_text())
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("llama_jax"))
        for alias in node.names
    }
    taken += [
        f"line {node.lineno}: {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and is_private(node.attr)
    ]
    assert not taken, f"{name} takes private names: {taken}"


def test_model_knows_nothing_of_loading_sharding_or_generation():
    allowed = {"llama_jax.config", "llama_jax.rope"}
    assert graph()["llama_jax.model"] <= allowed
