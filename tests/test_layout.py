"""The package's shape, read from its source with `ast`: no import cycle (type-only imports
included), no import of the package inside a function, only the CLI starts the daemon, and no
mention of documents that live outside the repository.

Each check is a function of a directory, so the synthetic packages below prove it can fail."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "blastd"
# Entry points import lazily so `blastd --help` stays fast: their inner imports are allowed.
ENTRY_POINTS = frozenset({"cli", "demo", "__main__"})
# Documents a reader of the repository cannot open: the repository must say it in its own words.
OUTSIDE_DOCUMENTS = re.compile(r"seed 00[0-9]|DESIGN §|shared/providers|\.\./shared")


@dataclass(frozen=True)
class InnerImport:
    path: Path
    line: int
    target: str


@dataclass
class ImportGraph:
    """Module -> the package's modules it imports, and the imports made inside functions."""

    edges: dict[str, set[str]] = field(default_factory=dict)
    inner: list[InnerImport] = field(default_factory=list)

    def cycles(self) -> list[list[str]]:
        """Every group of modules that import one another, directly or through others."""
        reach = {module: reachable(self.edges, module) for module in self.edges}
        groups = {
            tuple(sorted(other for other in reach[module] if module in reach[other]))
            for module in self.edges
            if module in reach[module]
        }
        return sorted(list(group) for group in groups)

    def importers_of(self, target: str) -> list[str]:
        return sorted(module for module, targets in self.edges.items() if target in targets)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for following in edges.get(todo.pop(), set()):
            if following not in seen:
                seen.add(following)
                todo.append(following)
    return seen


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class ImportFinder(ast.NodeVisitor):
    """The package's modules one file imports, each with its line and whether a function
    body makes the import (`if TYPE_CHECKING:` blocks are walked like any other)."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.package = module.split(".") if is_package else module.split(".")[:-1]
        self.module = module
        self.modules = modules
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parent = self.package[: len(self.package) - (node.level - 1)]
            base = ".".join([*parent, *([node.module] if node.module else [])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self.add(submodule if submodule in self.modules else base, node.lineno)

    def add(self, target: str, line: int) -> None:
        if target in self.modules and target != self.module:
            self.found.append((target, line, self.depth > 0))


def import_graph(root: Path) -> ImportGraph:
    """The import graph of the package in directory `root` (its name is the directory's)."""
    paths = {module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    entry_points = {f"{root.name}.{name}" for name in ENTRY_POINTS}
    graph = ImportGraph()
    for module, path in paths.items():
        finder = ImportFinder(module, path.name == "__init__.py", set(paths))
        finder.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        graph.edges[module] = {target for target, _, _ in finder.found}
        graph.inner += [
            InnerImport(path, line, target)
            for target, line, inside in finder.found
            if inside and module not in entry_points
        ]
    return graph


def cycle_report(graph: ImportGraph) -> list[str]:
    return [" <-> ".join(group) for group in graph.cycles()]


def inner_import_report(graph: ImportGraph) -> list[str]:
    return [f"{i.path}:{i.line} imports {i.target} inside a function" for i in graph.inner]


def daemon_importers(graph: ImportGraph, root: Path) -> list[str]:
    """Modules other than the CLI that import the daemon."""
    allowed = f"{root.name}.cli"
    return [m for m in graph.importers_of(f"{root.name}.daemon") if m != allowed]


def source_files(paths: Iterable[Path]) -> Iterator[Path]:
    """The files given and those under the directories given, bytecode caches left out (a
    stale one would keep text the source no longer has)."""
    for path in paths:
        if path.is_dir():
            found = sorted(path.rglob("*"))
            yield from (p for p in found if p.is_file() and "__pycache__" not in p.parts)
        elif path.is_file():
            yield path


def shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def outside_references(paths: Iterable[Path]) -> list[str]:
    """Each line naming a document outside the repository, as `file:line: text`."""
    found = []
    for path in source_files(paths):
        raw = path.read_bytes()
        if b"\0" in raw:
            continue  # binary, e.g. the example spreadsheet
        text = raw.decode("utf-8", errors="ignore")
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_DOCUMENTS.search(line):
                found.append(f"{shown(path)}:{number}: {line.strip()}")
    return found


# --- blastd itself ---------------------------------------------------------------------------


def test_blastd_has_no_import_cycle() -> None:
    cycles = cycle_report(import_graph(PACKAGE))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_blastd_imports_no_module_of_its_own_inside_a_function() -> None:
    inner = inner_import_report(import_graph(PACKAGE))
    assert not inner, "\n".join(inner)


def test_only_the_cli_imports_the_daemon() -> None:
    graph = import_graph(PACKAGE)
    assert graph.importers_of("blastd.daemon") == ["blastd.cli"]
    importers = daemon_importers(graph, PACKAGE)
    assert not importers, "blastd.daemon imported by: " + ", ".join(importers)


def test_package_and_readme_mention_no_document_outside_the_repository() -> None:
    found = outside_references([PACKAGE, REPO / "README.md"])
    assert not found, f"{len(found)} mentions:\n" + "\n".join(found)


# --- the checks catch what they are for ------------------------------------------------------


def write_package(root: Path, modules: dict[str, str]) -> Path:
    """A package named `blastd` under `root`, one file per entry (dotted name -> source)."""
    package = root / "blastd"
    for name, source in {"__init__": "", **modules}.items():
        path = package.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return package


def test_a_cycle_through_a_type_only_import_is_named(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "a": "from blastd import b\n",
            "b": "import typing\nif typing.TYPE_CHECKING:\n    from blastd.c import C\n",
            "c": "from . import a\n",
            "d": "import blastd.a\n",
        },
    )
    assert cycle_report(import_graph(package)) == ["blastd.a <-> blastd.b <-> blastd.c"]


def test_a_cycle_through_relative_imports_in_a_sub_package_is_named(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "video.__init__": "from .runner import run\n",
            "video.runner": "from ..ledger import Pool\n",
            "ledger": "from blastd.video import runner\n",
        },
    )
    assert cycle_report(import_graph(package)) == ["blastd.ledger <-> blastd.video.runner"]


def test_an_import_inside_a_function_is_named_with_file_and_line(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "a": "import json\n\n\ndef f() -> None:\n    import json as j\n",
            "b": "async def g() -> None:\n    x = 1\n    from blastd import a\n",
            "cli": "def main() -> None:\n    from blastd import daemon\n",
            "daemon": "",
            "sandbox.__main__": "def main() -> None:\n    from blastd.sandbox import cli\n",
            "sandbox.cli": "",
        },
    )
    graph = import_graph(package)
    assert inner_import_report(graph) == [
        f"{package / 'b.py'}:3 imports blastd.a inside a function",
        f"{package / 'sandbox' / '__main__.py'}:2 imports blastd.sandbox.cli inside a function",
    ]
    assert cycle_report(graph) == []


def test_a_daemon_import_outside_the_cli_is_named(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "cli": "from blastd import daemon\n",
            "daemon": "",
            "video.runner": "from blastd.daemon import run\n",
        },
    )
    assert daemon_importers(import_graph(package), package) == ["blastd.video.runner"]


def test_a_mention_of_an_outside_document_is_named(tmp_path: Path) -> None:
    stale = tmp_path / "stale.py"
    stale.write_text("x = 1\n# as DESIGN §4 says, see ../shared/notes\n")
    fine = tmp_path / "fine.md"
    fine.write_text("seed 7, design notes in docs/\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    (cache / "stale.cpython-311.pyc").write_bytes(b"DESIGN \xc2\xa74")
    found = outside_references([tmp_path])
    shown = stale.relative_to(REPO) if stale.is_relative_to(REPO) else stale
    assert found == [f"{shown}:2: # as DESIGN §4 says, see ../shared/notes"]
