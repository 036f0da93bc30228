"""The oldest Python the package promises (setup.cfg's python_requires, 3.10: the Python of the Jetson image's
L4T base) against what the suite runs on (3.11): every source parses as 3.10 grammar, and no module uses a
standard-library name that 3.10 lacks outside a guarded import."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SOURCES = sorted(p for folder in ("pipeline", "models", "targets", "tests", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py"))
# names added to the standard library in 3.11 that a 3.10 interpreter would fail on at import or call time
NEW_IN_311 = {"tomllib": "tomllib", "datetime.UTC": r"\bdatetime\.UTC\b|from datetime import .*\bUTC\b",
              "typing.Self": r"from typing import .*\bSelf\b|\btyping\.Self\b", "enum.StrEnum": r"\bStrEnum\b",
              "ExceptionGroup": r"\bExceptionGroup\b|except\*", "contextlib.chdir": r"\bcontextlib\.chdir\b",
              "hashlib.file_digest": r"\bfile_digest\b", "asyncio.TaskGroup": r"\bTaskGroup\b"}


def test_python_requires_is_the_version_checked_here():
    assert "python_requires = >=3.10" in (ROOT / "setup.cfg").read_text()


def test_every_source_parses_as_python_3_10():
    assert len(SOURCES) > 50
    for path in SOURCES:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))


def unguarded_tomllib_imports(tree: ast.AST) -> list[int]:
    """Lines importing tomllib outside a try whose handler catches ImportError/ModuleNotFoundError."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    def imports_tomllib(node) -> bool:
        if isinstance(node, ast.Import):
            return "tomllib" in [a.name for a in node.names]
        return isinstance(node, ast.ImportFrom) and node.module == "tomllib"

    return [node.lineno for node in ast.walk(tree) if imports_tomllib(node) and id(node) not in guarded]


def test_no_standard_library_name_newer_than_3_10_is_used_unguarded():
    found = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}:{line}: tomllib" for line in unguarded_tomllib_imports(ast.parse(text))]
        for name, pattern in NEW_IN_311.items():
            if name != "tomllib" and path.name != "test_python_versions.py" and re.search(pattern, text):
                found.append(f"{path.relative_to(ROOT)}: {name}")
    assert not found, found


def test_the_checks_catch_what_they_look_for():
    with pytest.raises(SyntaxError):  # except* is 3.11 grammar
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))
    assert unguarded_tomllib_imports(ast.parse("import tomllib\n")) == [1]
    assert unguarded_tomllib_imports(ast.parse("try:\n    import tomllib\nexcept ImportError:\n    pass\n")) == []
