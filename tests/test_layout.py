"""The package's layout: modules stay small enough to read, functions short enough to follow; a module or a
function over the limit says why in its docstring ("Why one module" / "Why one long function" / "Why long")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdistill"
MODULE_LINES = 600
FUNCTION_LINES = 80


def _sources():
    return {p: p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_modules_are_at_most_600_lines_or_say_why():
    too_long = [f"{p.relative_to(PACKAGE)}: {len(src.splitlines())} lines" for p, src in _sources().items()
                if len(src.splitlines()) > MODULE_LINES and "Why one module" not in (ast.get_docstring(ast.parse(src))
                                                                                      or "")]
    assert too_long == []


def test_functions_are_at_most_80_lines_or_say_why():
    too_long = []
    for p, src in _sources().items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > FUNCTION_LINES and "Why long" not in doc and "Why one long function" not in doc:
                    too_long.append(f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_the_packages_mirror_the_concepts():
    """A task is a module, a strategy is a file, the stages and the losses are packages of their jobs."""
    for folder in ("tasks", "strategies", "pipeline", "data", "losses", "training", "student", "cache", "deploy"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    assert {p.stem for p in (PACKAGE / "strategies").glob("*.py")} >= {"explicit", "mutual", "alternating", "causal"}
    assert {p.stem for p in (PACKAGE / "tasks").glob("*.py")} >= {"classification", "token_classification",
                                                                  "embedding", "causal_lm"}
