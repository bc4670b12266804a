"""The package's import rules (docs/ARCHITECTURE.md, Layout), read from the source: no cycle, each layer imports only
the layers below it, nothing in the product imports research/, scripts/ or bench/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moshi_ttt"
# What each part of the package may import from moshi_ttt (besides itself); None: anything in the package.
ALLOWED = {
    "moshi_ttt.config": {"moshi_ttt.options"},  # the mini-batch cap
    "moshi_ttt.options": set(),
    "moshi_ttt.compat": set(),
    "moshi_ttt.ttt": {"moshi_ttt.config", "moshi_ttt.options", "moshi_ttt.compat"},
    "moshi_ttt.data": {"moshi_ttt.config", "moshi_ttt.options", "moshi_ttt.compat", "moshi_ttt.ttt"},
    "moshi_ttt.scoring": {
        "moshi_ttt.config",
        "moshi_ttt.options",
        "moshi_ttt.compat",
        "moshi_ttt.ttt",
        "moshi_ttt.data",
    },
    # Minimal pairs: read data, score, write reports; only the CLI imports them.
    "moshi_ttt.benchmarks": {"moshi_ttt.config", "moshi_ttt.options", "moshi_ttt.compat", "moshi_ttt.ttt"}
    | {"moshi_ttt.scoring", "moshi_ttt.data", "moshi_ttt.reports"},
}
FORBIDDEN_ROOTS = ("research", "scripts", "bench", "app", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (anywhere in it, also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = _module_name(path).split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # "from pkg import submodule"
    return names


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of `graph` (module -> imported modules) as a path, or None; a package and its own submodules
    (the __init__ re-exports) do not count."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) == ["p.a", "p.b", "p.c", "p.a"]
    assert _cycle({"p": {"p.a"}, "p.a": {"p"}}) is None  # a package re-exporting its submodule


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(part):
    graph = _graph()
    for module, imported in graph.items():
        if _part(module) != part:
            continue
        outside = {_part(m) for m in imported if _part(m) != part and m != "moshi_ttt"}
        assert outside <= ALLOWED[part], f"{module} imports {sorted(outside - ALLOWED[part])}"


def test_nothing_in_the_product_imports_research_scripts_or_bench():
    for path in [*PACKAGE.rglob("*.py"), ROOT / "app.py"]:
        for name in _imports(path):
            assert name.split(".")[0] not in FORBIDDEN_ROOTS, f"{path.relative_to(ROOT)} imports {name}"
