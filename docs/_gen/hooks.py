"""MkDocs hooks (mkdocs.yml `hooks:`): the pages and snippets generated from the code at every build.

- reference/config.md, reference/cli.md, reference/recipes.md: rendered by kdistill_docgen.PAGES;
- changelog.md: CHANGELOG.md at the repository root, as it is;
- `<!-- gen:NAME -->` in a hand-written page: replaced by kdistill_docgen.SNIPPETS[NAME]().

docs/results.md is not generated here: `python -m benchmarks.render_results` writes it from docs/results/*.json
and the file is committed (tests/test_docs.py checks that it is up to date).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import kdistill_docgen  # noqa: E402  (found through the path set just above)

_MARKER = re.compile(r"<!-- gen:([a-z-]+) -->")


def on_files(files, config):
    for path, render in kdistill_docgen.PAGES.items():
        files.append(File.generated(config, path, content=render()))
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=changelog))
    return files


def on_page_markdown(markdown, page, config, files):
    def snippet(match):
        name = match.group(1)
        if name not in kdistill_docgen.SNIPPETS:
            raise KeyError(f"{page.file.src_path}: unknown generated snippet '{name}' "
                           f"(known: {', '.join(kdistill_docgen.SNIPPETS)})")
        return kdistill_docgen.SNIPPETS[name]()

    return _MARKER.sub(snippet, markdown)
