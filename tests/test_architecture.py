"""The shape of the library: the product package stands alone (no benchmark dependencies), its modules import
each other without circles, each imports on its own, no function is too long to read at a glance, and no module
of the library or the benchmarks is too long to read in one sitting."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "adaptsoup"
BENCH_ONLY = ("imagecorruptions", "sklearn", "cv2", "adaptsoup_bench")  # what `pip install .[bench]` adds
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400  # every .py file under adaptsoup/ and benchmarks/ (issue #24)
# Modules over MAX_MODULE_LINES that are still to be split (issue #24); each entry is to be removed once its
# module is split, and nothing may be added here.
MODULES_TO_SPLIT: set[str] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this checkout's packages."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def imported_modules(node: ast.AST, importer: str) -> set[str]:
    """The ``adaptsoup`` modules an import statement names (``from pkg import mod`` counts ``pkg.mod`` when it is one)."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module for alias in node.names}
    elif isinstance(node, ast.ImportFrom):  # relative: resolve against the importer's package
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([node.module] if node.module else []))
        names = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    else:
        return set()
    return {name for name in names if name in MODULES}


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """Module -> the adaptsoup modules it imports: at module level only, or anywhere (functions included)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if top_level_only:
            nodes = [n for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     for n in ast.walk(stmt)]
        else:
            nodes = list(ast.walk(tree))
        graph[name] = set().union(*(imported_modules(n, name) for n in nodes)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_sees_the_imports():
    graph = import_graph(top_level_only=True)
    assert "adaptsoup.core.models" in graph["adaptsoup.deploy.onnx"]  # (adaptsoup/__init__ imports it lazily: issue #15)
    assert "adaptsoup.tta.adapter" in graph["adaptsoup.tta.stream"]


def test_no_import_circles_at_module_level():
    cycle = find_cycle(import_graph(top_level_only=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_function_level_imports_stay_inside_adaptsoup():
    """Imports deferred into functions may point anywhere in adaptsoup, but never at the benchmarks or the CLI."""
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in ("adaptsoup_bench", "adaptsoup_cli"), f"{name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in ("adaptsoup_bench", "adaptsoup_cli"), f"{name} imports {alias.name}"


def test_the_library_needs_no_benchmark_dependency():
    """``pip install .`` (no extras) must be enough: importing every adaptsoup module pulls none of the bench deps."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {BENCH_ONLY!r} if m in sys.modules)))\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_each_module_imports_on_its_own():
    """Every module imports first, with no other adaptsoup module loaded yet (an order-dependent circle would fail)."""
    code = (
        "import importlib, json, sys, traceback\n"
        "import torch, timm  # loaded once: the test is about adaptsoup's own modules\n"
        "failed = {}\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'adaptsoup' or m.startswith('adaptsoup.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc(limit=3)\n"
        "print(json.dumps(failed))\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module:function (N lines)`` for every function or method of adaptsoup longer than ``limit`` lines."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{name}:{node.name} ({lines} lines)")
    return found


def test_no_function_over_80_lines():
    assert long_functions() == []


def test_the_base_install_leaves_the_benchmark_dependencies_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = " ".join(project["dependencies"]).lower()
    for dep in ("imagecorruptions", "scikit-learn", "sklearn", "opencv"):
        assert dep not in base, f"{dep} is a base dependency; it belongs in the [bench] extra"
    bench = " ".join(project["optional-dependencies"]["bench"]).lower()
    assert "imagecorruptions" in bench and "scikit-learn" in bench


def long_modules(limit: int = MAX_MODULE_LINES) -> list[str]:
    """``path (N lines)`` for every .py file under adaptsoup/ and benchmarks/ longer than ``limit`` lines."""
    found = []
    for folder in ("adaptsoup", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > limit:
                found.append(f"{path.relative_to(ROOT).as_posix()} ({lines} lines)")
    return found


def test_long_modules_finds_them():
    assert long_modules(limit=0)  # every module has a line
    assert any(entry.startswith("benchmarks/shift.py ") for entry in long_modules(limit=10))


def test_no_module_over_400_lines():
    over = [entry for entry in long_modules() if entry.split(" (")[0] not in MODULES_TO_SPLIT]
    assert over == [], "split these modules by concern: " + ", ".join(over)
    # an allowed module that shrank below the limit leaves the list
    still_over = {entry.split(" (")[0] for entry in long_modules()}
    assert MODULES_TO_SPLIT <= still_over, f"no longer over {MAX_MODULE_LINES} lines, remove from MODULES_TO_SPLIT: {sorted(MODULES_TO_SPLIT - still_over)}"


def test_the_shift_benchmark_keeps_its_names():
    """``adaptsoup_bench.shift`` runs the benchmark from its parts and re-exports their names: what other modules
    and scripts import from it keeps working."""
    done = run_python(
        "import adaptsoup_bench.shift as shift\n"
        "missing = [n for n in shift.__all__ if not hasattr(shift, n)]\n"
        "needed = ['BenchConfig', 'C10CConfig', 'ShiftData', 'PROTOCOLS', 'SPLITS', 'ROW_NAMES', 'INTER_SETTINGS', 'VANILLA_SETTINGS',\n"
        "          'prepare_c10c', 'inter_encoders', 'write_task_vector_soup', 'bench_work_dir', 'results_stem', 'run_c10c',\n"
        "          'run_shift_benchmark', 'run_imagenet_c', 'clean_indices', 'split_pool', 'sanity_checks', 'paired_bootstrap',\n"
        "          'paired_from_work', 'markdown_table', 'mean_or_nan', 'score_row', 'sar_base_lr', 'share_trained', 'shared_dir']\n"
        "print(missing + [n for n in needed if n not in shift.__all__])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
