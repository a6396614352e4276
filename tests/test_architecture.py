"""Guard the package seams (docs/architecture.md, "Packages and their rules"), by reading the
source (AST), so that a violation fails here with the file and line instead of in review:

* ``wire/``, ``store/``, ``producer/``, ``consumers/``, ``processors/`` never import ``gateway/``;
* ``gateway/`` never imports ``processors/`` (delivery never waits on the pipeline);
* ``wire/`` never imports ``store/`` (the event model does not know Redis);
* no RESP framing outside ``store/`` (no ``\\r\\n`` bytes, no ``send_packed_command``);
* no import circle inside a package (imports under ``TYPE_CHECKING`` and inside functions count).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "src" / "tokenbridge"

NEVER_IMPORTS = [
    ("wire", "gateway"),
    ("store", "gateway"),
    ("producer", "gateway"),
    ("consumers", "gateway"),
    ("processors", "gateway"),
    ("gateway", "processors"),
    ("wire", "store"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    return {
        module_name(path): (path, ast.parse(path.read_text(), str(path)))
        for path in sorted(ROOT.rglob("*.py"))
    }


MODULES = modules()


def imports(name: str, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """Every tokenbridge module ``name`` imports, anywhere in the file, with its line."""
    package = name if MODULES[name][0].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in MODULES else base), node.lineno


def area(module: str) -> str:
    """``tokenbridge.gateway.sse`` -> ``gateway``; top-level modules are their own area."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_of(module: str) -> str:
    path = MODULES[module][0]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


@pytest.mark.parametrize(("source", "target"), NEVER_IMPORTS, ids=lambda x: str(x))
def test_package_never_imports(source: str, target: str) -> None:
    bad = [
        f"{MODULES[name][0].relative_to(ROOT)}:{line} imports {imported}"
        for name, (_, tree) in MODULES.items()
        if area(name) == source
        for imported, line in imports(name, tree)
        if imported.startswith("tokenbridge.") and area(imported) == target
    ]
    assert bad == [], f"{source}/ must not import {target}/"


def test_no_resp_framing_outside_store() -> None:
    bad = []
    for name, (path, tree) in MODULES.items():
        if area(name) == "store":
            continue
        for node in ast.walk(tree):
            framed = isinstance(node, ast.Constant) and isinstance(node.value, bytes)
            if framed and b"\r\n" in node.value:  # type: ignore[attr-defined]
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} RESP bytes")
            if isinstance(node, ast.Attribute) and node.attr == "send_packed_command":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} send_packed_command")
    assert bad == []


def test_no_import_circle_inside_a_package() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, (_, tree) in MODULES.items():
        for imported, _line in imports(name, tree):
            inside = imported in MODULES and package_of(imported) == package_of(name)
            if inside and imported != name:
                graph[name].add(imported)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_guard_sees_the_imports_it_checks() -> None:
    """The rules above would pass vacuously if the walker missed imports: it does not."""
    seen = {imported for imported, _ in imports("tokenbridge.gateway.sse", MODULES[
        "tokenbridge.gateway.sse"][1])}  # fmt: skip
    assert "tokenbridge.gateway.streaming" in seen
    consumer = "tokenbridge.consumers.stream_consumer"
    assert "tokenbridge.consumers.reclaim" in {
        i for i, _ in imports(consumer, MODULES[consumer][1])
    }
