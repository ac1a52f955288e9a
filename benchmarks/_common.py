"""What the benchmark scripts share: mean ± spread over seeds, and keeping stdout for the one JSON line."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


TEACHER_SLICE_STUDENT = ["student.model=null", "data.labeled_limit=null", "distill.temperature=4"]
"""Overrides on the default recipe that give the student these benchmarks compare: 2 layers copied from the
teacher's (not the general-purpose MiniLM-L6 the default recipe cuts its student from), every training label,
T = 4: the setting whose numbers docs/results.md reports for these benchmarks."""


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


@contextlib.contextmanager
def stdout_to_stderr():
    """Keep stdout for the one JSON line: libraries' own output (e.g. the WordPiece trainer's progress, written by
    Rust straight to file descriptor 1) goes to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_seeds(name: str, args, run_seed, shown=lambda row: row) -> tuple[list[dict], Path]:
    """`run_seed(args, seed, out)` for each of args.seeds, in args.out (default: a new temp dir, kept), each row
    logged to stderr (`shown`: the part of it to log) while stdout is kept for the one JSON line. Returns the rows
    and the dir."""
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"kdistill-{name.replace('_', '-')}-"))
    print(f"{name}: runs in {out}", file=sys.stderr)
    rows = []
    with stdout_to_stderr():
        for seed in args.seeds:
            rows.append(run_seed(args, seed, out))
            print(f"{name}: seed {seed}: {json.dumps(shown(rows[-1]))}", file=sys.stderr)
    return rows, out
