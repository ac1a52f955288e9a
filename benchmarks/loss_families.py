"""Loss families and student init, side by side: same teacher, student shape, data and budget, several seeds.

    python benchmarks/loss_families.py --recipe chinese --teacher runs/chinese/teacher --seeds 3
    python benchmarks/loss_families.py --recipe default --teacher runs/default/teacher --variants logits no-kd
    python benchmarks/loss_families.py --recipe chinese --limit 200 --epochs 0.2 --seeds 1     # smoke run

Variants (each one `kdistill.pipeline.run` of the recipe with `teacher.path` set and the overrides below):
  no-kd          labels only (the control: same shape, same teacher-layer init)
  logits         kd + ce                                   (Hinton 2015)
  hidden         kd + ce + hidden_mse + embedding_mse      (FitNets / TinyBERT)
  attention      kd + ce + attention_kl                    (TinyBERT)
  minilm         kd + ce + minilm_qq/kk/vv relations       (MiniLMv2)
  logits-random  kd + ce from a randomly initialised student (init control)
  no-kd-random   labels only, random init
Variants take turns within each seed, so machine drift hits all alike. Prints one JSON line: per variant the
student's test accuracy and macro-F1 (mean, sample std, values) and the training wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kdistill, installed or not
from benchmarks._common import spread, stdout_to_stderr  # noqa: E402

KD = {"kd": 1.0, "ce": 0.5}
VARIANTS = {
    "no-kd": ({"ce": 1.0}, "teacher-layers"),
    "logits": (KD, "teacher-layers"),
    "hidden": ({**KD, "hidden_mse": 1.0, "embedding_mse": 1.0}, "teacher-layers"),
    "attention": ({**KD, "attention_kl": 1.0}, "teacher-layers"),
    "minilm": ({**KD, "minilm_qq": 1.0, "minilm_kk": 1.0, "minilm_vv": 1.0}, "teacher-layers"),
    "logits-random": (KD, "random"),
    "no-kd-random": ({"ce": 1.0}, "random"),
}


def run_variant(args, name: str, seed: int, teacher: Path, out: Path) -> dict:
    from kdistill.config import load_config
    from kdistill.pipeline import run

    losses, init = VARIANTS[name]
    items = [f"teacher.path={teacher}", f"distill.losses={json.dumps(losses)}", f"train.seed={seed}",
             "distill.baseline=false", "eval.repeats=3", "eval.warmup=1", f"name={name}-seed{seed}"]
    if init == "random":
        # pruning needs the teacher's weights; a random student of the same shape keeps the widths, not the init
        items.append("student.init=random")
    if args.epochs:
        items.append(f"train.epochs={args.epochs}")
    if args.limit:
        items.append(f"data.limit={args.limit}")
    cfg = load_config(args.recipe, items + list(args.set))
    run_dir = run(cfg, out / cfg.name)
    student = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["models"]["student"]
    return {k: student[k] for k in ("accuracy", "macro_f1", "train_wall_time_s", "params")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="chinese", help="recipe giving data, student shape and training budget")
    parser.add_argument("--teacher", help="trained teacher dir (default: train one with the recipe first)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["no-kd", "logits", "hidden", "attention", "minilm", "logits-random"])
    parser.add_argument("--seeds", type=int, default=3, help="train.seed = 1..N")
    parser.add_argument("--epochs", type=float, help="student epochs (default: the recipe's)")
    parser.add_argument("--limit", type=int, help="cap on examples per split (data.limit)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--out", help="where the runs go (default: a new temp dir, kept)")
    args = parser.parse_args(argv)

    import torch

    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdistill-families-"))
    print(f"loss_families: runs in {out}", file=sys.stderr)
    with stdout_to_stderr():
        teacher = Path(args.teacher) if args.teacher else _train_teacher(args, out)
        rows = {v: [] for v in args.variants}
        for seed in range(1, args.seeds + 1):
            for variant in args.variants:
                rows[variant].append(run_variant(args, variant, seed, teacher, out))
    line = {
        "benchmark": "loss_families", "recipe": args.recipe, "teacher": str(teacher), "seeds": args.seeds,
        "limit": args.limit, "epochs": args.epochs,
        "variants": {v: {"accuracy": spread([r["accuracy"] for r in rs]),
                         "macro_f1": spread([r["macro_f1"] for r in rs]),
                         "train_wall_time_s": spread([r["train_wall_time_s"] for r in rs]),
                         "params": rs[0]["params"]} for v, rs in rows.items()},
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(line))
    return line


def _train_teacher(args, out: Path) -> Path:
    from kdistill.cli import train_teacher

    items = [f"data.limit={args.limit}"] if args.limit else []
    return train_teacher(args.recipe, set=items + list(args.set), out=out / "teacher-run")


if __name__ == "__main__":
    main()
