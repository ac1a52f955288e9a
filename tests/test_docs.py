"""The docs: the site builds strictly (every link and anchor resolves, every generated page renders from the code),
docs/results.md is what benchmarks/render_results.py renders from docs/results/*.json, the README stays short and
its links resolve, and no file speaks of the project's working history instead of the product."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import render_results

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HISTORY_TALK = re.compile(r"session [0-9]|issue [0-9]+", re.IGNORECASE)
SCANNED = ("README.md", "docs", "kdistill", "tests", "benchmarks")


def test_docs_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[test]' installs it)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert 'id="kdistill-run"' in cli and 'id="kdistill-serve"' in cli
    config = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    assert "distill.temperature" in config and "train.batch_size" in config
    recipes = (site / "reference" / "recipes" / "index.html").read_text(encoding="utf-8")
    for recipe in sorted((ROOT / "kdistill" / "recipes").glob("*.yaml")):
        assert f'id="{recipe.stem}"' in recipes, recipe.name
    assert (site / "results" / "index.html").is_file() and (site / "changelog" / "index.html").is_file()


def test_results_page_is_what_the_script_renders():
    rendered = render_results.render(render_results.load_results())
    assert render_results.RESULTS_MD.read_text(encoding="utf-8") == rendered, \
        "docs/results.md is out of date: run python -m benchmarks.render_results"


def test_every_result_names_its_command_commit_and_machine():
    results = render_results.load_results()
    assert results, "no summary files in docs/results/"
    for result in results:
        assert result["command"].strip() and result["commit"].strip() and result["machine"].strip(), result["id"]
        assert result["rows"], result["id"]


def test_readme_is_at_most_300_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|#|mailto:", t)]
    assert targets, "README.md links nowhere into the docs"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def _text_files(root: Path):
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    for path in paths:
        if not path.is_file() or ".git" in path.relative_to(ROOT).parts:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary


def test_no_history_talk_in_docs_code_or_tests():
    found = []
    for name in SCANNED:
        for path, text in _text_files(ROOT / name):
            for number, line in enumerate(text.splitlines(), 1):
                if HISTORY_TALK.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "say what the product does, not when it was built:\n" + "\n".join(found)
