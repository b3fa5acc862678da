"""The package's layout is its architecture: commands on top, libraries in folders, imports flowing one way.

Parses every module of `rdro_cli` (imports inside functions too) and checks that
- there is no import cycle between modules (a lazy import inside a function counts: it only hides a cycle);
- no library module (anything in a folder) imports a command module, and no command imports another;
- the library folders are layered: store/ (what is on disk) imports no other library; lm/, dataprep/ and
  losses/ build on store/; training/, evaluation/ and reporting/ on those (reporting reads eval's scoring);
- the frame (`cli`, `recipe`, `errors`, `progress`) imports no command and no library but what it names
  here, so `rdro validate` and `--help` stay free of torch;
- no module is longer than its limit unless its docstring says why it reads best whole.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rdro_cli"
COMMANDS = {"prepare", "logprobs", "train", "merge", "eval", "report", "verify"}
FRAME = {"cli", "recipe", "errors", "progress", "__init__", "__main__"}
FOLDERS = {"store", "lm", "dataprep", "losses", "evaluation", "reporting", "training"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The rdro_cli modules `path` imports (resolving `from rdro_cli.x import y` to x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if not name.startswith("rdro_cli"):
                continue
            name = name.removeprefix("rdro_cli").lstrip(".")
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        own_package = name if path.name == "__init__.py" else None
        graph[name] = {m for m in _imports(path, modules) if m != name and m != own_package}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_finder_finds_a_cycle():  # the check above must be able to fail
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_flow_down_from_the_commands():
    graph = _graph()
    problems = []
    for name, imported in graph.items():
        top = name.split(".")[0]
        for target in imported:
            if target in COMMANDS and name != target:
                if top in FOLDERS:
                    problems.append(f"library {name} imports command {target}")
                elif name in COMMANDS:
                    problems.append(f"command {name} imports command {target}")
                elif name != "cli":
                    problems.append(f"{name} imports command {target}")
    assert not problems, problems


# the library folders (and the frame) each folder may import, besides itself
LAYERS = {"store": {"errors"},
          "lm": {"store", "errors", "progress", "recipe"},
          "dataprep": {"store", "errors", "progress", "recipe"},
          "losses": {"errors"},
          "training": {"store", "lm", "dataprep", "losses", "errors", "progress", "recipe"},
          "evaluation": {"store", "lm", "dataprep", "losses", "errors", "progress", "recipe"},
          "reporting": {"store", "evaluation", "losses", "errors", "progress", "recipe"}}


def test_library_folders_are_layered():
    problems = []
    for name, imported in _graph().items():
        folder = name.split(".")[0]
        if folder not in LAYERS:
            continue
        for target in imported:
            other = target.split(".")[0]
            if other != folder and other not in LAYERS[folder]:
                problems.append(f"{name} imports {target}")
    assert not problems, problems


def test_every_module_is_a_command_the_frame_or_in_a_library_folder():
    for name in _modules():
        top = name.split(".")[0]
        assert name in COMMANDS or name in FRAME or top in FOLDERS, f"{name}: where does it belong?"


def test_the_frame_stays_light():
    """recipe, errors and progress import nothing heavy of ours; recipe may read the (torch-free) loss registry."""
    graph = _graph()
    allowed = {"recipe": {"errors", "losses.registry"}, "errors": set(), "progress": set(),
               "losses.registry": set()}
    for name, may in allowed.items():
        assert graph[name] <= may, f"{name} imports {graph[name] - may}"


def test_modules_stay_short_unless_they_say_why():
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "reads best whole" in doc, f"{name}: {lines} lines; split it or say why it reads best whole"
