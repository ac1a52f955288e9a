"""A/B behaviour check: every shipped recipe run small, its numbers recorded, two recordings compared exactly.

    python -m benchmarks.ab_behaviour record --out before.json --src /path/to/other/checkout   # that checkout's code
    python -m benchmarks.ab_behaviour record --out after.json                                  # this checkout's code
    python -m benchmarks.ab_behaviour record --out tiny.json --recipes tiny,kd-logits          # some recipes only
    python -m benchmarks.ab_behaviour compare before.json after.json                           # exit 0: no change

For code changes that must not change behaviour (moving code between modules, renames): record the code before
and after the change, then compare.

record: for each recipe of <src>/kdistill/recipes/*.yaml, one `python -m kdistill.cli run <recipe>.yaml --set ...
--out <tmp run dir>` with the overrides of OVERRIDES (small data, few steps: about a minute a recipe on a 2-core CPU,
the causal-LM recipes a few), in a subprocess whose `import kdistill` is <src>/kdistill (PYTHONPATH=<src>, run from
a directory without a kdistill package; checked once, printed as "kdistill"). Every recipe needs an entry in
OVERRIDES: a recipe without one stops the recording before anything runs. From each finished run dir it keeps:
  steps        every logged training step of every model (logs/history_<model>.json): the weighted total and
               each loss term
  validation   every validation of every model during training (the same files)
  tensorboard  every scalar of the TensorBoard event files (logs/<model>/), as (step, value) pairs
  metrics      metrics.json
  weights      sha256 of every tensor of every saved model (*.safetensors), name by name
Dropped everywhere, at recording and again at comparison: what measures the machine rather than the code, i.e.
every key that `ignored_key` names (times, latencies, throughputs, speed-ups, thread counts, the machine, dates,
paths, versions). Inside the kept strings the run dir, the source dir and the cache dir read <run>, <src>, <cache>.
Runs are made repeatable: one torch/OpenMP/MKL thread (torch's default is one a core, and the thread count decides
how float sums are split, hence their last bits: two machines would differ), PYTHONHASHSEED=0, no CUDA device, and
a fresh kdistill cache per run (the downloaded assets are shared; teacher signals and logit caches are not, so every
run computes them instead of reading another run's).
A recipe that fails is recorded with its error, and `compare` reports it as a difference.
Writes one JSON file {recipe: {"overrides", "steps", "validation", "tensorboard", "metrics", "weights",
"wall_s"}}; prints one JSON line per recipe and a summary line on stdout (the runs' own logs go to a file per
recipe in the work dir, --work to keep them).

compare: per recipe one JSON line: identical or not, how many numbers and strings were compared, the max absolute
difference of the numbers, and the first differing keys with both values. Equality is exact (the max absolute
difference is there for a reader to judge, never a tolerance). Exit 0 only when every recipe is in both files,
recorded without error, and every kept value is equal; else 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------- what runs

COMMON = ["eval.repeats=1", "eval.warmup=0"]
"""Every recipe: one timed repeat (the timings are not compared)."""


def encoder(limit: int = 64, steps: int = 6, every: int = 3) -> list[str]:
    """An encoder recipe's size: `limit` rows a split, `steps` student steps (6 at batch 16 cross an epoch end),
    validation every `every` steps (keeping the best weights)."""
    return [f"data.limit={limit}", f"train.max_steps={steps}", f"train.eval_every={every}"]


OVERRIDES: dict[str, list[str]] = {
    "alternating": encoder(steps=4, every=2) + ["teacher.epochs=1"],  # the teacher learns along: 2 models a step
    "chinese": encoder() + ["teacher.epochs=2"],  # batch 32: 2 teacher steps an epoch
    "chinese-transfer": encoder() + ["teacher.epochs=2", "data.labeled_limit=32"],
    "default": encoder() + ["teacher.epochs=1", "data.labeled_limit=32"],
    "embedding": encoder(),  # the teacher is the pretrained encoder, not trained; the ONNX export stays
    "instruct": ["data.limit=6", "data.labeled_limit=3", "train.max_steps=2", "train.eval_every=2",
                 "eval.samples=2"],  # Qwen2.5-0.5B answers 3 prompts and 6 test prompts; SmolLM2 student
    "instruct-entities": ["data.limit=6", "data.labeled_limit=3", "data.held_out_limit=3", "teacher.shots=1",
                          "train.max_steps=2", "train.eval_every=2", "eval.samples=2"],
    "instruct-sentiment": ["data.limit=6", "data.labeled_limit=3", "data.held_out_limit=3", "train.max_steps=2",
                           "train.eval_every=2", "eval.samples=2"],
    "kd-attention": encoder() + ["teacher.epochs=1"],
    "llm-teacher": encoder(limit=16) + ["data.labeled_limit=8"],  # Qwen2.5-0.5B scores 16 + 16 + 16 texts
    "llm-teacher-chinese": encoder(limit=16) + ["data.labeled_limit=8"],  # 16 + 16 + 16 reviews; student from scratch
    "kd-hidden": encoder() + ["teacher.epochs=1"],
    "kd-logits": encoder() + ["teacher.epochs=1"],
    "kd-minilm": encoder() + ["teacher.epochs=1"],
    "lm": ["data.limit=4", "train.max_steps=2"],  # 4 documents a split; SmolLM2-135M teacher
    "lm-cross": ["data.limit=2", "train.max_steps=2"],  # Qwen2.5-0.5B teacher: the slowest recipe (~4 min)
    "lm-depth": ["data.limit=4", "train.max_steps=2"],
    "mutual": encoder(steps=4, every=2) + ["teacher.epochs=1"],  # the teacher learns along: 2 models a step
    "ner": encoder() + ["teacher.epochs=1"],  # 64 sentences + 64 transfer sentences; the ONNX export stays
    "ner-chinese": encoder() + ["teacher.epochs=1"],
    "newsgroups": encoder(limit=32) + ["teacher.epochs=1", "data.labeled_limit=16"],  # mpnet-base teacher: 2 steps
    "small": encoder() + ["teacher.epochs=1", "data.labeled_limit=32"],  # a pruned, vocabulary-trimmed student
    "tiny": encoder() + ["teacher.epochs=1"],
}
"""Recipe -> its `--set` overrides (after COMMON). One entry per shipped recipe: a recipe without one is an error."""

THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""}

# ------------------------------------------------------------------------------------------- what is kept

IGNORED_WORDS = {"time", "times", "timing", "timestamp", "latency", "throughput", "speed", "speedup", "seconds",
                 "secs", "s", "ms", "elapsed", "duration", "wall", "machine", "host", "hostname", "thread",
                 "threads", "date", "path", "paths", "dir", "cwd", "version", "versions", "pid"}
"""A key is dropped when one of its words (split at _ and spaces) is one of these: `train_wall_time_s`,
`latency_ms_batch1`, `throughput_per_s`, `ms_per_token_batch1`, `speedup_vs_teacher`, `machine`, `threads`, `path`."""

IGNORED_PARTS = ("time", "latency", "throughput", "speed")
"""... or when it contains one of these anywhere (`runtime`, `wall_time`, `latency_ms`)."""

LABEL_KEYED = {"per_class", "per_type"}
"""Dicts whose keys are the data's label names (`comp.os.ms-windows.misc`): those keys are never dropped."""


def ignored_key(key: str) -> bool:
    """Whether a key holds a measurement of the machine (timing, speed, threads, host, dates, paths, versions)."""
    low = key.lower()
    return any(part in low for part in IGNORED_PARTS) or bool(set(re.split(r"[_\s]+", low)) & IGNORED_WORDS)


def strip(value, replace: dict[str, str] | None = None, labels: bool = False):
    """`value` without the ignored keys (at every depth), with the given prefixes replaced inside strings.
    labels: `value`'s keys are label names (kept)."""
    if isinstance(value, dict):
        return {k: strip(v, replace, k in LABEL_KEYED) for k, v in value.items() if labels or not ignored_key(str(k))}
    if isinstance(value, list):
        return [strip(v, replace) for v in value]
    if isinstance(value, str) and replace:
        for old, new in replace.items():
            value = value.replace(old, new)
    return value


# ------------------------------------------------------------------------------------------------ record

def shipped_recipes(src: Path) -> list[str]:
    return sorted(p.stem for p in (src / "kdistill" / "recipes").glob("*.yaml"))


def run_env(src: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDISTILL_", "PYTHON"))}
    return {**env, **THREADS_ENV, "PYTHONPATH": str(src), "KDISTILL_CACHE_DIR": str(cache)}


def shared_assets() -> Path:
    """Where downloaded assets live (kdistill.assets.cache_root() / "assets"), shared by every recorded run."""
    base = os.environ.get("KDISTILL_CACHE_DIR")
    path = (Path(base) if base else Path.home() / ".cache" / "kdistill") / "assets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_cache(where: Path) -> Path:
    """A kdistill cache dir of its own for one run, whose assets/ is the shared one."""
    where.mkdir(parents=True)
    (where / "assets").symlink_to(shared_assets(), target_is_directory=True)
    return where


def imported_from(src: Path, work: Path) -> str:
    """The kdistill a run subprocess imports; SystemExit unless it is <src>/kdistill."""
    probe = subprocess.run([sys.executable, "-c", "import kdistill; print(kdistill.__file__)"], cwd=work,
                           env=run_env(src, work / "probe-cache"), capture_output=True, text=True)
    where = probe.stdout.strip()
    if probe.returncode or Path(where).resolve().parent != (src / "kdistill").resolve():
        raise SystemExit(f"the run subprocess imports kdistill from {where or probe.stderr.strip()!r}, "
                         f"not {src / 'kdistill'}")
    return where


def read_histories(logs: Path) -> tuple[dict, dict]:
    steps, validation = {}, {}
    for f in sorted(logs.glob("history_*.json")):
        history = json.loads(f.read_text(encoding="utf-8"))
        steps[history["name"]] = strip(history["steps"])
        validation[history["name"]] = strip(history["evals"])
    return steps, validation


def read_tensorboard(logs: Path) -> dict:
    """{run: {tag: [[step, value], ...]}} of every event file under logs/<run>/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run in sorted(p for p in logs.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*"))):
        events = EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        out[run.name] = {tag: [[e.step, e.value] for e in events.Scalars(tag)]
                         for tag in sorted(events.Tags()["scalars"])}
    return out


def weight_digests(run_dir: Path) -> dict:
    """{file: sha256 over its tensors' names, dtypes, shapes and bytes, in name order} of every saved model."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(run_dir.rglob("*.safetensors")):
        digest = hashlib.sha256()
        with safe_open(str(f), framework="pt") as tensors:
            for name in sorted(tensors.keys()):
                t = tensors.get_tensor(name).contiguous()
                digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        out[str(f.relative_to(run_dir))] = digest.hexdigest()
    return out


def collect(run_dir: Path, replace: dict[str, str]) -> dict:
    steps, validation = read_histories(run_dir / "logs")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"steps": steps, "validation": validation, "tensorboard": read_tensorboard(run_dir / "logs"),
            "metrics": strip(metrics, replace), "weights": weight_digests(run_dir)}


def record_one(recipe: str, src: Path, work: Path, timeout: float) -> dict:
    here = work / recipe
    here.mkdir(parents=True)
    run_dir, cache = here / "run", fresh_cache(here / "cache")
    overrides = COMMON + OVERRIDES[recipe]
    cmd = [sys.executable, "-m", "kdistill.cli", "run", str(src / "kdistill" / "recipes" / f"{recipe}.yaml"),
           *[a for o in overrides for a in ("--set", o)], "--out", str(run_dir)]
    started = time.perf_counter()
    with open(here / "run.log", "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(cmd, cwd=here, env=run_env(src, cache), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
    wall = time.perf_counter() - started
    entry = {"overrides": overrides}
    if rc != 0:
        tail = (here / "run.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        return {**entry, "error": f"exit {rc}: " + "\n".join(tail), "wall_s": wall}
    replace = {str(run_dir): "<run>", str(cache): "<cache>", str(shared_assets()): "<cache>/assets",
               str(src): "<src>", str(here): "<work>"}
    return {**entry, **collect(run_dir, replace), "wall_s": wall}


def record(args) -> int:
    src = Path(args.src).resolve() if args.src else REPO
    available = shipped_recipes(src)
    missing = [r for r in available if r not in OVERRIDES]
    if missing:
        raise SystemExit(f"no entry in benchmarks/ab_behaviour.py OVERRIDES for recipe(s) {', '.join(missing)}: add "
                         "one (small data, few steps) so that every recipe is recorded")
    recipes = args.recipes.split(",") if args.recipes else available
    unknown = [r for r in recipes if r not in available]
    if unknown:
        raise SystemExit(f"no recipe {', '.join(unknown)} in {src / 'kdistill' / 'recipes'}")
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="ab-behaviour-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty")
    started = time.perf_counter()
    try:
        where = imported_from(src, work)
        print(json.dumps({"src": str(src), "kdistill": where, "recipes": recipes}), flush=True)
        out = {}
        for recipe in recipes:  # one at a time: each run has the machine's cores to itself
            out[recipe] = record_one(recipe, src, work, args.timeout)
            print(json.dumps({"recipe": recipe, "ok": "error" not in out[recipe],
                              "wall_s": round(out[recipe]["wall_s"], 1),
                              **({"error": out[recipe]["error"]} if "error" in out[recipe] else {})}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r, e in out.items() if "error" in e]
    print(json.dumps({"out": str(args.out), "recipes": len(out), "failed": failed,
                      "wall_s": round(time.perf_counter() - started, 1)}), flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- compare

def flatten(value, prefix: str = "", labels: bool = False) -> dict:
    """{"a/b/0/c": leaf} of a JSON value, without the ignored keys (labels: as in `strip`)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if labels or not ignored_key(str(k)):
                out.update(flatten(v, f"{prefix}{k}/", k in LABEL_KEYED))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}/"))
        return out if value else {prefix.rstrip("/"): []}
    return {prefix.rstrip("/"): value}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def same(a, b) -> bool:
    if _number(a) and _number(b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def compare_recipe(before: dict | None, after: dict | None, shown: int = 5) -> dict:
    """One recipe's comparison: identical, values compared, max abs difference, the first differences."""
    if before is None or after is None:
        return {"identical": False, "problem": f"missing in {'before' if before is None else 'after'}"}
    errors = {side: e["error"] for side, e in (("before", before), ("after", after)) if "error" in e}
    if errors:
        return {"identical": False, "problem": "run failed", **errors}
    a, b = flatten(before), flatten(after)
    differences, max_diff, compared = [], 0.0, 0
    for key in [*a, *(k for k in b if k not in a)]:
        if key not in a or key not in b:
            differences.append({"key": key, "before": a.get(key, "<missing>"), "after": b.get(key, "<missing>")})
            continue
        compared += 1
        x, y = a[key], b[key]
        if _number(x) and _number(y) and not same(x, y):
            max_diff = max(max_diff, abs(x - y)) if not (math.isnan(x) or math.isnan(y)) else math.inf
        if not same(x, y):
            differences.append({"key": key, "before": x, "after": y})
    return {"identical": not differences, "compared": compared, "max_abs_diff": max_diff,
            "differences": len(differences), "first": differences[:shown]}


def compare(args) -> int:
    before = json.loads(Path(args.before).read_text(encoding="utf-8"))
    after = json.loads(Path(args.after).read_text(encoding="utf-8"))
    differing = []
    for recipe in sorted(set(before) | set(after)):
        result = compare_recipe(before.get(recipe), after.get(recipe))
        print(json.dumps({"recipe": recipe, **result}, default=str), flush=True)
        if not result["identical"]:
            differing.append(recipe)
    print(json.dumps({"identical": not differing, "recipes": len(set(before) | set(after)),
                      "differing": differing}), flush=True)
    return 1 if differing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    rec = verbs.add_parser("record", help="run every recipe small and record its numbers")
    rec.add_argument("--out", required=True, help="JSON file to write")
    rec.add_argument("--src", help="checkout whose kdistill runs (default: this one)")
    rec.add_argument("--recipes", help="comma-separated recipe names (default: every shipped recipe)")
    rec.add_argument("--work", help="empty dir to keep the run dirs and logs in (default: a temp dir, removed)")
    rec.add_argument("--timeout", type=float, default=3600, help="seconds a recipe may take")
    cmp = verbs.add_parser("compare", help="compare two recordings; exit 0 when identical")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args(argv)
    return record(args) if args.verb == "record" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
