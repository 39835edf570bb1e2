"""The import rules of docs/architecture.md, checked on the source with `ast`.

1. No module imports an underscored NAME of another module (`from .x import _y`,
   `from anyckpt.x import _y`, or `x._y` where `x` is an imported anyckpt module). A module
   whose own name starts with `_` (`_proto`, `_concurrency`, `formats/_arrays`, `cli/_ls`, ...)
   is internal to its package by design and may be imported anywhere within anyckpt.
2. No import cycle between modules, counting module-level and function-level (lazy) imports
   alike; only imports under `if TYPE_CHECKING:` do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "anyckpt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _nodes(tree: ast.AST, *, in_type_checking: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node, with whether it sits in the body of an `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, in_type_checking
            for stmt in child.body:
                yield stmt, True
                yield from _nodes(stmt, in_type_checking=True)
            for stmt in child.orelse:
                yield stmt, in_type_checking
                yield from _nodes(stmt, in_type_checking=in_type_checking)
            continue
        yield child, in_type_checking
        yield from _nodes(child, in_type_checking=in_type_checking)


@dataclass
class ModuleImports:
    edges: set[str] = field(default_factory=set)  # modules imported (outside TYPE_CHECKING)
    private: list[str] = field(default_factory=list)  # rule 1 violations, one line each


def _resolve_from(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def scan(module: str) -> ModuleImports:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = ModuleImports()
    aliases: dict[str, str] = {}  # local name -> anyckpt module it is bound to
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node, type_only in _nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "anyckpt":
                    continue
                if not type_only:
                    found.edges.add(alias.name)
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases[alias.name.split(".")[0]] = "anyckpt"
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, path, node)
            if target.split(".")[0] != "anyckpt":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # a module: `from anyckpt.formats import v2`
                    aliases[alias.asname or alias.name] = sub
                    if not type_only:
                        found.edges.add(sub)
                    continue
                if not type_only:
                    found.edges.add(target)
                if _is_private(alias.name):
                    found.private.append(
                        f"{where}:{node.lineno}: imports {alias.name} from {target}"
                    )
    # attribute use of an imported module's private name: `v2_index._Template`
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        parts = _dotted(node.value)
        if parts is None or parts[0] not in aliases:
            continue
        owner = ".".join([aliases[parts[0]], *parts[1:]])
        if owner in MODULES and owner != module:
            found.private.append(f"{where}:{node.lineno}: uses {owner}.{node.attr}")
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge met by a depth-first search (each cycle listed once)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in graph:
                continue
            if colour[nxt] == GREY:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif colour[nxt] == WHITE:
                visit(nxt)
        stack.pop()
        colour[node] = BLACK

    for node in sorted(graph):
        if colour[node] == WHITE:
            visit(node)
    return cycles


def test_the_scan_sees_the_package() -> None:
    assert "anyckpt.tensors" in MODULES
    assert "anyckpt.manager.core" in MODULES
    assert any(scan(m).edges for m in MODULES)


def test_find_cycles_reports_the_circle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]


def test_the_scan_finds_private_names_and_lazy_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from anyckpt.codecs import table\n"
        "from anyckpt.tensors import _hidden\n"
        "if TYPE_CHECKING:\n"
        "    from anyckpt import tree\n"
        "def f():\n"
        "    from anyckpt import meta\n"
        "    return table._secret\n"
    )
    MODULES["anyckpt._probe"] = tmp_path / "probe.py"
    (tmp_path / "probe.py").write_text(source, encoding="utf-8")
    try:
        result = scan("anyckpt._probe")
    finally:
        del MODULES["anyckpt._probe"]
    assert result.edges == {"anyckpt.codecs.table", "anyckpt.tensors", "anyckpt.meta"}
    assert len(result.private) == 2
    assert "_hidden" in result.private[0]
    assert "anyckpt.codecs.table._secret" in result.private[1]


def test_no_module_imports_an_underscored_name_of_another() -> None:
    problems = [line for module in MODULES for line in scan(module).private]
    assert not problems, "private names imported across modules:\n" + "\n".join(problems)


def test_no_import_cycle() -> None:
    graph = {module: scan(module).edges - {module} for module in MODULES}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def foreign_private_accesses(source: str) -> list[str]:
    """`x._name` where `x` is not `self`/`cls` and no class or function of this source
    defines `_name`: an underscored attribute of another module's object."""
    tree = ast.parse(source)
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            own.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    return [
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and _is_private(node.attr)
        and node.attr not in own
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]


def test_the_private_access_scan_finds_reaching_in() -> None:
    assert foreign_private_accesses("def f(m):\n    return m._last_step\n") == [
        "line 2: ._last_step"
    ]
    assert foreign_private_accesses("class A:\n    def _x(self):\n        return B()._x\n") == []


def test_the_distributed_saver_reaches_no_private_name_of_the_manager() -> None:
    """issue 14: manager.distributed is built on the public methods of CheckpointDirectory and
    SaveQueue; manager.core reaches into neither (nor into PendingSave)."""
    for module in ("anyckpt.manager.distributed", "anyckpt.manager.core"):
        assert foreign_private_accesses(MODULES[module].read_text()) == [], module
