"""Causal-LM KD vs no-KD: the `lm` recipe's student distilled from SmolLM2-135M against the same student (same
init, same data order, same steps) trained on the LM loss only, over several seeds.

    python benchmarks/lm_kd.py                         # the lm recipe as shipped, seeds 42 and 43 (~40 min, 2 cores)
    python benchmarks/lm_kd.py --seeds 1 2 3 --set train.max_steps=120
    python benchmarks/lm_kd.py --smoke                 # data.limit=4, 3 steps: minutes, proves the plumbing only

Each seed is one `kdistill.pipeline.run` of the recipe with `train.seed` set (the data split, `data.seed`, stays
fixed, so the teacher's top-k cache is built by the first seed and reused by the others: the teacher scores the
training set once). Within a run the KD student and the baseline train in turn and are evaluated on the same test
blocks; speed is measured interleaved. Reported: test perplexity of the teacher, the KD student and the no-KD
student per seed (mean, std, values), whether KD was better on every seed, the block-parameter ratio, and wall
times. Wall times come from a shared machine: compare them within one run. Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kdistill, installed or not
from benchmarks._common import run_seeds, spread  # noqa: E402

SMOKE = ["data.limit=4", "train.max_steps=3", "eval.repeats=1", "eval.warmup=0"]


def run_seed(args, seed: int, out: Path) -> dict:
    from kdistill.config import load_config
    from kdistill.pipeline import run

    cfg = load_config(args.recipe, (SMOKE if args.smoke else []) + list(args.set) + [
        f"train.seed={seed}", "distill.baseline=true", f"name=lm-kd-seed{seed}"])
    if args.threads:
        cfg.train.num_threads = cfg.eval.num_threads = args.threads
    started = time.perf_counter()
    run_dir = run(cfg, out / cfg.name)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    models = metrics["models"]
    return {
        "teacher_ppl": models["teacher"]["perplexity"],
        "kd_ppl": models["student"]["perplexity"],
        "nokd_ppl": models["baseline"]["perplexity"],
        "kd_train_s": models["student"]["train_wall_time_s"],
        "nokd_train_s": models["baseline"]["train_wall_time_s"],
        "run_wall_s": time.perf_counter() - started,
        "cache": (metrics.get("teacher_cache") or {}).get("status"),
        "cache_s": (metrics.get("teacher_cache") or {}).get("seconds"),
        "block_param_ratio": metrics["student_shape"]["block_param_ratio"],
        "speedup_generate": models["student"]["speedup_vs_teacher"],
        "steps": cfg.train.max_steps,
        "test_tokens": models["student"]["n_test_tokens"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lm", help="recipe name or file (default: the shipped lm recipe)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="train.seed values")
    parser.add_argument("--threads", type=int, help="torch threads for training and evaluation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--smoke", action="store_true", help="tiny data and 3 steps: checks the plumbing only")
    parser.add_argument("--out", help="where the runs go (default: a new temp dir, kept)")
    args = parser.parse_args(argv)

    import torch

    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows, out = run_seeds("lm_kd", args, run_seed)
    kd, nokd = [r["kd_ppl"] for r in rows], [r["nokd_ppl"] for r in rows]
    line = {
        "benchmark": "lm_kd",
        "recipe": args.recipe,
        "overrides": (SMOKE if args.smoke else []) + list(args.set),
        "seeds": args.seeds,
        "teacher_ppl": rows[0]["teacher_ppl"],
        "kd_ppl": spread(kd),
        "nokd_ppl": spread(nokd),
        "kd_over_nokd_ppl": statistics_ratio(kd, nokd),
        "kd_better_every_seed": all(a < b for a, b in zip(kd, nokd)),
        "block_param_ratio": rows[0]["block_param_ratio"],
        "steps": rows[0]["steps"],
        "test_tokens": rows[0]["test_tokens"],
        "speedup_generate_vs_teacher": spread([r["speedup_generate"] for r in rows]),
        "kd_train_s": spread([r["kd_train_s"] for r in rows]),
        "nokd_train_s": spread([r["nokd_train_s"] for r in rows]),
        "run_wall_s": [r["run_wall_s"] for r in rows],
        "cache": [r["cache"] for r in rows],
        "cache_s": [r["cache_s"] for r in rows],
        "total_wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "out": str(out),
    }
    print(json.dumps(line))
    return line


def statistics_ratio(kd: list[float], nokd: list[float]) -> float:
    """Geometric mean over seeds of KD / no-KD perplexity (< 1: KD better)."""
    return math.exp(sum(math.log(a / b) for a, b in zip(kd, nokd)) / len(kd))


if __name__ == "__main__":
    main()
