"""The shape of the code, checked so that it stays: no import circle, inference that does
not import training, a result format (and a service) that load without torch, short
functions, and stage functions with few parameters (docs/architecture.md, "Rules of the
house"). Pure static analysis plus one subprocess: no Blender, no clips."""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the dotted package it is
PACKAGES = {"backend": "avface", "models": "avface.models", "blender_addon": "avface_blender"}
MAX_LINES = 80
MAX_STAGE_PARAMETERS = 8
#: Functions allowed past MAX_LINES, each with its reason (docs/architecture.md repeats them).
LONG_FUNCTIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources():
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts and "_vendor" not in path.parts:
                yield path


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (never executed, so not an import edge)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every module ``module`` imports, at any depth of the file (lazy imports count: they
    run too), resolved to the modules of ``known``. A package's ``__init__`` that a submodule
    import runs first is not counted: it is a circle only where the ``__init__`` itself
    imports back, which its own edges show."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import name``: the submodule pkg.name where there is one, else pkg itself
            found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names)
    edges = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            edges.add(name)
    edges.discard(module)
    return edges


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    """Each module's imports (parsed once for the whole file's tests)."""
    paths = {_module_name(p): p for p in _sources()}
    known = set(paths)
    return {m: _imports(p, m, known) for m, p in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_backend_models_or_the_addon():
    graph = _graph()
    assert len(graph) > 100, "the source walk found too few modules"
    assert "avface.stages.fit" in graph["avface.stages.camera"]  # the edges are real
    assert _cycles(graph) == []


def test_inference_does_not_import_training():
    graph = _graph()
    offenders = {m: sorted(d for d in deps if d == "avface.train" or d.startswith("avface.train."))
                 for m, deps in graph.items() if m.startswith("avface.stages")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_backend_imports_are_absolute_except_in_what_the_addon_vendors():
    vendored = {ROOT / "backend" / "service" / "client.py"}
    relative = []
    for path in _sources():
        if path.parts[len(ROOT.parts)] == "blender_addon" or path in vendored or "result" in path.relative_to(ROOT).parts[:2]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                relative.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert relative == []


def test_the_result_format_and_the_service_load_without_torch():
    code = ("import sys, avface.result, avface.config, avface.service.server, avface.export.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _functions():
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


@pytest.mark.parametrize("folder", ["backend", "blender_addon"])
def test_no_function_is_over_80_lines(folder):
    long = {f"{path}:{node.name}": node.end_lineno - node.lineno + 1 for path, node in _functions()
            if path.parts[0] == folder and node.end_lineno - node.lineno + 1 > MAX_LINES}
    assert {k: v for k, v in long.items() if k not in LONG_FUNCTIONS} == {}


def test_stage_functions_take_few_parameters():
    wide = {}
    for path, node in _functions():
        if path.parts[:2] != ("backend", "stages"):
            continue
        a = node.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
        names = [n for n in names if n not in ("self", "cls")]
        if len(names) > MAX_STAGE_PARAMETERS:
            wide[f"{path}:{node.name}"] = len(names)
    assert wide == {}
