"""The package's architecture, checked: layers, import cycles, module sizes, invariants defined once.

These read the source (``ast`` and text), so they run in milliseconds and fail with the file and line
that broke a rule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "viq"

#: Packages below the application layers: they never import training, demo, CLI or LLM code.
CORE = ("viq._io", "viq.model", "viq.formats", "viq.store")
ABOVE_CORE = ("viq.train", "viq.demo", "viq.cli", "viq.data", "viq.mllm", "viq.extract")
#: Only the demo and the CLI may import the demo.
DEMO_USERS = ("viq.demo", "viq.cli")

MAX_LINES = 600
MAX_ROOT_MODULES = 8


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
BENCH_MODULES = sorted((ROOT / "bench").glob("*.py"))


def _resolve(name: str) -> str | None:
    """The viq module that ``import name`` loads (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, int]]:
    """Every viq module imported anywhere in ``module`` (top level or inside functions), with lines."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from viq.pkg import mod` imports the module viq.pkg.mod when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "viq" or name.startswith("viq."):
                target = _resolve(name)
                if target and target != module:
                    out.append((target, node.lineno))
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_core_never_imports_the_layers_above():
    bad = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {t}"
        for m, edges in GRAPH.items()
        if _within(m, CORE)
        for t, line in edges
        if _within(t, ABOVE_CORE)
    ]
    assert not bad, "\n".join(bad)


def test_only_the_demo_and_cli_import_the_demo():
    bad = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {t}"
        for m, edges in GRAPH.items()
        if not _within(m, DEMO_USERS)
        for t, line in edges
        if _within(t, ("viq.demo",))
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """Tarjan's strongly connected components over module-level and function-level imports alike
    (the package ``viq`` itself counts as the module ``viq/__init__.py``)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
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

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_modules_are_small():
    """One file per idea: no module of the package or of the benchmarks passes MAX_LINES (no waivers --
    a file that grows past it is split along its ideas)."""
    long = [
        f"{path.relative_to(ROOT)}: {path.read_text().count(chr(10))} lines"
        for path in [*MODULES.values(), *BENCH_MODULES]
        if path.read_text().count("\n") > MAX_LINES
    ]
    assert not long, f"over {MAX_LINES} lines:\n" + "\n".join(long)


def test_no_private_names_across_modules():
    """A name with a leading underscore is private to its module: no other module imports it (what two
    modules share is public, with a docstring)."""
    bad = []
    for path in [*MODULES.values(), *BENCH_MODULES]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("viq", "bench"):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not bad, "\n".join(bad)


def test_benchmarks_are_a_package():
    """The benchmarks run as ``python -m bench.<name>`` and import ``bench.common`` and the installed
    ``viq``; none edits ``sys.path``, so each runs the same from any folder, in the tests or by hand."""
    assert (ROOT / "bench" / "__init__.py").is_file()
    bad = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in [*BENCH_MODULES, *(ROOT / "tests").glob("*.py")]
        if path.name != "test_layout.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "sys.path.insert" in line
    ]
    assert not bad, "sys.path edited in " + ", ".join(bad)


def test_few_modules_at_the_package_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def _occurrences(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [
        f"{path.relative_to(SRC)}:{i}"
        for path in MODULES.values()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if regex.search(line)
    ]


@pytest.mark.parametrize(
    ("what", "pattern", "home"),
    [
        ("image extensions", r"^\s*IMAGE_EXTENSIONS\s*[:=]", "viq/formats/image.py"),
        ("temporary files of atomic writes", r"mkstemp\(", "viq/_io.py"),
        ("the progress bar", r"\btqdm\(", "viq/_progress.py"),
        (
            "the image-id rule (relative path, or the full path outside the root)",
            r"""startswith\(\s*["']\.\.""",
            "viq/store/ids.py",
        ),
        ("code-usage entropy", r"log2?\(p\)", "viq/formats/bits.py"),
        ("the stage table", r"^\s*STAGES\s*[:=]", "viq/train/stages.py"),
    ],
)
def test_invariant_defined_once(what, pattern, home):
    found = _occurrences(pattern)
    assert len(found) == 1 and found[0].startswith(home + ":"), f"{what}: expected once in {home}, found {found}"


def test_image_token_written_once():
    """The ``<image>`` placeholder is one constant; every other module imports it."""
    found = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in MODULES.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value == "<image>"
    ]
    assert len(found) == 1 and found[0].startswith("viq/mllm/chat.py:"), found


def test_evaluation_never_imports_training():
    """The layers, bottom up: core (model, formats, store) < data, mllm < eval < train < demo, cli.
    Evaluation answers with the chat model (viq.mllm.model) and scores with viq.eval.answers; training
    imports evaluation (its validation uses the same metrics), never the other way round."""
    bad = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {t}"
        for m, edges in GRAPH.items()
        if _within(m, ("viq.eval",))
        for t, line in edges
        if _within(t, ("viq.train", "viq.demo", "viq.cli"))
    ]
    assert not bad, "\n".join(bad)
    below_eval = ("viq.mllm", "viq.data", *CORE)
    bad = [
        f"{MODULES[m].relative_to(SRC)}:{line} imports {t}"
        for m, edges in GRAPH.items()
        if _within(m, below_eval)
        for t, line in edges
        if _within(t, ("viq.eval", "viq.train"))
    ]
    assert not bad, "\n".join(bad)


#: Modules that import viq modules inside functions on purpose: the command line (``viq --help`` and
#: every command start without importing what they do not run).
LAZY_IMPORTERS = ("viq.cli", "viq.__main__")


def _module_level_imports(module: str) -> set[str]:
    """The viq modules ``module`` imports when it is itself imported (statements outside functions)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    imports = (ast.Import, ast.ImportFrom)
    inside = {
        node.lineno
        for func in ast.walk(tree)
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(func)
        if isinstance(node, imports)
    }
    return {target for target, line in GRAPH[module] if line not in inside}


def _runtime_closure(module: str) -> set[str]:
    """Every viq module that runs when ``module`` is imported: its module-level imports and the
    ``__init__`` of each package on the way, transitively."""
    seen: set[str] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        stack += [".".join(parts[:i]) for i in range(1, len(parts))]
        stack += _module_level_imports(m)
    return seen


def test_viq_imports_are_at_module_level():
    """The dependency graph is read at the top of each module: an import of a viq module inside a
    function is allowed only in the command line (start-up time) or where importing it at module level
    would re-enter the module while Python initialises it (a package ``__init__`` that imports it)."""
    bad = []
    for module, path in MODULES.items():
        if _within(module, LAZY_IMPORTERS):
            continue
        top = _module_level_imports(module)
        for target, line in GRAPH[module]:
            if target in top or target == module:
                continue
            if module not in _runtime_closure(target):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)
