"""The architecture contract of pyproject.toml ([tool.importlinter]): imports point down the layers, and no modules
of a package import each other in a cycle (function-local imports included: import-linter reads them all)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers_and_form_no_cycle():
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    assert lint, "lint-imports not installed: pip install -e '.[test]'"
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout
