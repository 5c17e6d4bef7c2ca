"""The floor plan of mcs_batch (docs/ARCHITECTURE.md): imports only run downward, and nothing goes round.

An AST walk over every module (imports inside functions and under TYPE_CHECKING count too). A module
may import a module on a lower floor, or on its own floor when the rooms (top-level packages or modules)
of that floor stay acyclic; never one on a higher floor. A new module must be placed on a floor here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import mcs_batch

PACKAGE = Path(mcs_batch.__file__).parent

# The allowed order, top to bottom, written once. Each entry: floor name, module prefixes on it
# (relative to mcs_batch; the longest matching prefix places a module).
# fmt: off
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("cli", "cli_common", "eval.cli", "train.cli")),
    ("apps", ("pipeline", "archive", "explain", "scan", "query", "report", "eval", "train", "testdata", "cluster",
              "telemetry")),
    ("stages", ("stages",)),
    ("outputs", ("outputs",)),
    ("config", ("config",)),
    ("models", ("models",)),
    ("io", ("io",)),
    ("vocabulary", ("records", "rows", "errors", "seeding", "faults", "yaml_config")),
)
# fmt: on


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(name: str, known: set[str]) -> str | None:
    """'mcs_batch.a.b.c' -> the longest known module it names ('a.b' when c is an attribute)."""
    parts = name.removeprefix("mcs_batch").lstrip(".").split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules if m}
    for module, path in modules.items():
        if not module:
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("mcs_batch")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = package.split(".") if package else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    absolute = ".".join(["mcs_batch", *base, *([node.module] if node.module else [])])
                else:
                    absolute = node.module or ""
                if absolute.startswith("mcs_batch"):
                    targets = [f"{absolute}.{a.name}" for a in node.names] or [absolute]
            for target in targets:
                resolved = _resolve(target, known)
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def floor_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"mcs_batch.{module} is on no floor: place it in FLOORS (tests/test_architecture.py)")
    return best


def room_of(module: str) -> str:
    return module.split(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_on_a_floor():
    for module in import_graph():
        floor_of(module)


def test_imports_only_run_downward():
    upward = [
        f"mcs_batch.{a} ({FLOORS[floor_of(a)][0]}) -> mcs_batch.{b} ({FLOORS[floor_of(b)][0]})"
        for a, targets in sorted(import_graph().items())
        for b in sorted(targets)
        if floor_of(b) < floor_of(a)
    ]
    assert not upward, "imports running up the floor plan:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules_or_rooms():
    graph = import_graph()
    assert not cycles(graph), f"import cycles: {cycles(graph)}"
    rooms: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        for b in targets:
            if room_of(a) != room_of(b) and floor_of(a) == floor_of(b):
                rooms[room_of(a)].add(room_of(b))
    assert not cycles(rooms), f"cycles between rooms of one floor: {cycles(rooms)}"


def test_the_checks_catch_what_they_guard():
    """The walk sees the arrows it must forbid (so a passing test means something)."""
    graph = import_graph()
    assert "config" in graph["stages.load"]  # downward, allowed
    assert floor_of("stages.load") < floor_of("config") < floor_of("models.sam") < floor_of("io.dicom")
    assert floor_of("eval.cli") == 0 and floor_of("eval.evaluate") == 1
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_help_and_config_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from mcs_batch.cli import build_parser\n"
        "from mcs_batch.config import load_config\n"
        "from mcs_batch.errors import ConfigError\n"
        "build_parser().format_help()\n"
        "try:\n"
        "    load_config(overrides=['clip.resize=crop'])\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print('torch' in sys.modules, 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["clip.resize: 'crop' is not one of resize, pad", "False False"]
