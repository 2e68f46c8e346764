"""House rules that keep minidist readable."""
import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "minidist").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_stays_under_300_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 300, f"{path.relative_to(ROOT)} has {lines} lines: split it by responsibility"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_technique_code_is_device_agnostic(path):
    text = path.read_text()
    allowed = {"launch.py"}  # the launcher is where devices are chosen
    if path.name not in allowed:
        assert "torch.cuda" not in text and ".cuda(" not in text


def test_the_readme_states_the_tolerance_policy():
    readme = (ROOT / "README.md").read_text()
    assert "## Tolerance policy" in readme


# ---- the layout: a folder per technique, no import cycles (issue 20) -------------------------------------------

def _module_names() -> dict[str, Path]:
    """minidist's modules by dotted name (a package by its folder's name, from its __init__.py)."""
    names = {}
    for path in MODULES:
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_main_block(node) -> bool:
    """`if __name__ == "__main__":`: it runs only when the file is the script, as another module object (__main__),
    so its imports make no cycle with the module's own name."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _imports(tree: ast.AST):
    """Every import statement in `tree`, at any depth (imports inside functions run too, later), except in a
    __main__ block."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack += [child for child in ast.iter_child_nodes(node) if not _is_main_block(child)]


def import_graph() -> dict[str, set[str]]:
    """module -> the minidist modules it imports, read from the source (nothing is imported).

    Importing a.b.c runs a/__init__.py and a/b/__init__.py first, so the packages above the imported module count,
    except the packages the importing module is in itself (they are being imported already when it runs)."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else node.module
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in found:
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    ancestor = ".".join(parts[:k])
                    if ancestor in modules and ancestor != name and not (name + ".").startswith(ancestor + "."):
                        targets.add(ancestor)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_one_that_imports_it_back():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (each line: modules that import each other, directly or through others):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_cycles_through_packages_and_lazy_imports():
    graph = {"minidist.a": {"minidist.b"}, "minidist.b": {"minidist.c"}, "minidist.c": {"minidist.a"},
             "minidist.d": {"minidist.a"}}
    assert import_cycles(graph) == [["minidist.a", "minidist.b", "minidist.c"]]
    graph = import_graph()
    assert "minidist.comm" in graph["minidist.launch"]         # launch imports comm.flight: comm/__init__ runs first
    assert "minidist.comm.ring" in graph["minidist.comm.collectives"]   # an import inside a function counts
    assert "minidist.tensor_parallel" not in graph["minidist.tensor_parallel.plans"]  # its own package does not


def test_at_most_25_modules_directly_in_the_package():
    top = sorted(p.name for p in (ROOT / "minidist").glob("*.py"))
    assert len(top) <= 25, f"{len(top)} modules directly in minidist/ (give a technique of several files a folder): {top}"


def test_the_readme_module_map_names_every_folder():
    readme = (ROOT / "README.md").read_text()
    folders = sorted(p.parent.name for p in (ROOT / "minidist").glob("*/__init__.py"))
    missing = [f for f in folders if f"minidist/{f}/" not in readme]
    assert not missing, f"the README's module map does not show {missing}"
