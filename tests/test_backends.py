"""Every runtime behind one interface: the registry, no runtime-name comparisons outside pipeline/backends/, and no
import circles between export, verify and the backends."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edgecompress import backends, targets
from edgecompress.backends.base import Backend

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


def test_registry_holds_one_backend_per_runtime_a_profile_may_name():
    assert set(backends.BACKENDS) == set(targets.RUNTIMES)
    for name in targets.names():
        target = targets.load(name)
        backend = backends.for_target(target)
        assert backend.name == target.runtime and target.precision in backend.precisions
        if target.precision == "int8":
            assert backends.scheme_for(target).precision == "int8"


def test_registry_refuses_a_second_backend_of_a_name():
    class Again(Backend):
        name = "onnxruntime"

    with pytest.raises(ValueError, match="registered twice"):
        backends.register(Again())
    with pytest.raises(ValueError, match="registered twice"):
        backends.register_qdq_edit("tensorrt-residual-adds", lambda model: 0)


def _sources() -> dict[Path, ast.Module]:
    """Every module of the installed code outside pipeline/backends/ (pipeline/, models/, targets/)."""
    found = {}
    for folder in ("pipeline", "models", "targets"):
        for path in (ROOT / folder).rglob("*.py"):
            if "backends" not in path.relative_to(ROOT).parts:
                found[path] = ast.parse(path.read_text())
    return found


def _mentions_runtime(node: ast.AST) -> bool:
    """`x.runtime`, `x["runtime"]` or a name `runtime`: an expression that is a target's runtime name."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr == "runtime" or isinstance(sub, ast.Name) and sub.id == "runtime":
            return True
        if isinstance(sub, ast.Subscript) and isinstance(sub.slice, ast.Constant) and sub.slice.value == "runtime":
            return True
    return False


def test_no_code_outside_the_backends_chooses_behaviour_by_runtime_name():
    """Comparisons (==, !=, in) and startswith/endswith on a runtime name are the backends' business; elsewhere
    the code asks backends.for_target(target). Validating that a profile's runtime is a known name is not a choice."""
    offenders = []
    for path, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(_mentions_runtime(side) for side in [node.left, *node.comparators]):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("startswith", "endswith") and _mentions_runtime(node.func.value)):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Subscript) and _mentions_runtime(node.slice) and not isinstance(node.slice,
                                                                                                 ast.Constant):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} (a table indexed by runtime)")
    assert offenders == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(["edgecompress", *[p for p in parts if p != "__init__"]])


def _imports(path: Path, tree: ast.Module, modules: set[str]) -> set[str]:
    """Modules of edgecompress this one imports, at the top or inside functions (`from package import module`
    counts as importing that module; a package's own __init__ importing its modules is how Python packages work)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("edgecompress")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if not base.startswith("edgecompress"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def test_export_verify_and_the_backends_import_each_other_in_no_circle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path, ast.parse(path.read_text()), set(modules)) if m in modules and m != name}
             for name, path in modules.items()}
    watched = {m for m in modules if m in ("edgecompress.export", "edgecompress.verify")
               or m.startswith("edgecompress.backends")}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    circles = sorted(f"{a} <-> {b}" for a in watched for b in graph[a] if b in modules and reaches(b, a))
    assert circles == []
