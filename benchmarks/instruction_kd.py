"""Instruction distillation, KD vs no-KD over seeds: one run of an instruction recipe per train.seed, the distilled
student's task score against the same student fine-tuned on the gold responses alone, in each run.

    python -m benchmarks.instruction_kd --recipe instruct --seeds 1 2 --out runs/instruct-seeds
    python -m benchmarks.instruction_kd --recipe instruct-entities --seeds 1 2 --out runs/instruct-entities-seeds \
        --table docs/results/instruct-entities.json
    python -m benchmarks.instruction_kd --recipe instruct --smoke      # tiny data, 2 steps: the plumbing only

Each seed is one `kdistill.pipeline.run` of the recipe with `train.seed` set, in OUT/<recipe>-seed<S>. The data split
(`data.seed`) stays fixed, so the teacher answers the transfer prompts and the test prompts once, in the first run
(its one-off pass, timed in that run's metrics), and every later run reads its stored responses back. A seed whose
run dir already holds a finished run of the same config is read back, not run again. Reported per seed: the task
score of the teacher, the KD student, the no-KD baseline and the untrained student, agreement with the teacher, the
training and run wall times; over seeds: mean and spread, the gap, and whether every KD seed beat every no-KD seed.
Prints one JSON line on stdout; --table also writes the docs/results table (render with benchmarks.render_results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kdistill, installed or not
from benchmarks._common import run_seeds, spread  # noqa: E402
from benchmarks.peers.common import git_commit, machine_line  # noqa: E402

SMOKE = ["data.limit=6", "data.labeled_limit=3", "data.held_out_limit=3", "train.max_steps=2", "train.eval_every=2",
         "teacher.model=smollm2-135m", "teacher.shots=1", "eval.samples=1"]
ROLES = ("teacher", "student", "baseline", "untrained")


def finished(run_dir: Path, cfg) -> bool:
    """Whether `run_dir` holds a finished run (metrics.json) of `cfg` (its config fingerprint)."""
    from kdistill.rundir import MANIFEST, run_fingerprint

    try:
        saved = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))["fingerprint"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (run_dir / "metrics.json").is_file() and saved == run_fingerprint(cfg, None)["config"]


def run_seed(args, seed: int, out: Path) -> dict:
    from kdistill.config import load_config
    from kdistill.pipeline import run

    cfg = load_config(args.recipe, (SMOKE if args.smoke else []) + list(args.set) + [f"train.seed={seed}"])
    if cfg.task != "instruction":
        raise SystemExit(f"--recipe {args.recipe}: task {cfg.task}; this benchmark compares instruction recipes")
    run_dir = out / f"{cfg.name}-seed{seed}"
    reused = finished(run_dir, cfg)
    if not reused:
        run(cfg, run_dir, overwrite=True)
    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    models = m["models"]
    answers = m.get("teacher_responses") or {}
    return {
        "seed": seed, "run_dir": str(run_dir), "read_back": reused,
        **{f"{role}_score": models[role]["task_score"] for role in ROLES if role in models},
        **{f"{role}_agreement": models[role]["agreement_with_teacher"] for role in ROLES if role in models},
        "student_train_s": models["student"]["train_wall_time_s"],
        "baseline_train_s": models["baseline"]["train_wall_time_s"],
        "steps": models["student"]["training"]["steps_run"],
        "run_wall_s": m["total_wall_time_s"],
        "teacher_pass": {"prompts": answers.get("prompts"), "calls": answers.get("calls"),
                         "seconds": answers.get("generate_seconds")},
        "teacher_test_calls": models["teacher"].get("calls"),
        "generate_tokens_per_s": {role: models[role]["generate_tokens_per_s"] for role in ROLES if role in models},
        "params": {role: models[role]["params"] for role in ROLES if role in models},
        "data": m["data"], "losses": m["losses"], "on_policy_fraction": m["on_policy_fraction"],
        "teacher": m["teacher"], "teacher_shots": m.get("teacher_shots"), "scorer": m["scorer"],
        "threads": m["machine"]["torch_threads"],
    }


def summarise(args, rows: list[dict], started: float) -> dict:
    kd, nokd = [r["student_score"] for r in rows], [r["baseline_score"] for r in rows]
    return {
        "benchmark": "instruction_kd", "recipe": args.recipe,
        "overrides": (SMOKE if args.smoke else []) + list(args.set), "seeds": args.seeds,
        **{f"{role}_score": spread([r[f"{role}_score"] for r in rows]) for role in ROLES},
        "kd_minus_nokd_points": spread([100 * (a - b) for a, b in zip(kd, nokd)]),
        "kd_above_every_nokd": min(kd) > max(nokd),
        "total_wall_s": time.perf_counter() - started,
        "machine": platform.processor() or platform.machine(),
        "per_seed": rows,
    }


def pct(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def tokens_per_s(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"  # None: read from the store (the teacher's), not generated


def mean_std(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def table(line: dict, args) -> dict:
    """The docs/results table of one benchmark line: a row per model, task score per seed and over seeds."""
    rows, first = line["per_seed"], line["per_seed"][0]
    d = first["data"]
    seeds = " / ".join(str(s) for s in line["seeds"])
    terms = ", ".join(f"{t} {w:g}" for t, w in first["losses"].items() if w)
    later = [r["run_wall_s"] for r in rows if not (r["teacher_pass"]["calls"] or r["teacher_test_calls"])]
    teacher_pass = next((r["teacher_pass"] for r in rows if r["teacher_pass"]["calls"]), None)
    test_calls = next((r["teacher_test_calls"] for r in rows if r["teacher_test_calls"]), 0)
    labels = {"teacher": f"teacher: {first['teacher']}" + (f", {first['teacher_shots']} gold rows in context"
                                                           if first["teacher_shots"] else ""),
              "student": f"distilled student ({terms})",
              "baseline": "the same student fine-tuned on the gold responses alone, as many steps",
              "untrained": "the student before training"}
    body = []
    for role in ROLES:
        s = line[f"{role}_score"]
        train = ("–" if role in ("teacher", "untrained") else
                 " / ".join(f"{r[f'{role}_train_s']:.0f}" for r in rows))
        body.append([labels[role], pct(s["values"]), mean_std(s), pct([r[f"{role}_agreement"] for r in rows]),
                     train, f"{first['params'][role]:,}",
                     " / ".join(tokens_per_s(r["generate_tokens_per_s"][role]) for r in rows)])
    gap = line["kd_minus_nokd_points"]
    won = "wins" if gap["mean"] > 0 else "loses"
    notes = [
        f"Data: {d['source']}: {d['gold_rows']:,} gold rows and {d['transfer_prompts']:,} transfer prompts the teacher "
        f"answered; {d['sizes']['test']:,} test prompts, scored by `{first['scorer']}` on greedy responses of at most "
        f"{d['max_response_tokens']} tokens. {first['steps']} steps per phase; seeds {seeds} (`train.seed`; the data "
        "split is fixed).",
        f"Distillation {won} by {abs(gap['mean']):.1f} ± {gap['std']:.1f} points against the no-KD baseline "
        f"(per seed: {' / '.join(f'{v:+.1f}' for v in gap['values'])}); every KD seed above every no-KD seed: "
        f"{'yes' if line['kd_above_every_nokd'] else 'no'}.",
        "Cost: the teacher's answers to the transfer prompts "
        + (f"took {teacher_pass['seconds']:.0f} s ({teacher_pass['calls']:,} calls) in the first run" if teacher_pass
           else "were read from the store (made by an earlier run)")
        + "; its answers to the test prompts " + (f"were made in the first run ({test_calls:,} calls)" if test_calls
                                                   else "were read from the store")
        + "; both stay stored for every later run. A whole run (both students trained, every model answering the "
        "test prompts) took " + " / ".join(f"{r['run_wall_s'] / 60:.1f}" for r in rows) + " min"
        + (f" ({' / '.join(f'{w / 60:.1f}' for w in later)} min with the teacher's answers read back)" if later
           else "") + ".",
        *args.note,
    ]
    return {"id": Path(args.table).stem, "order": args.order, "title": args.title or f"Instruction distillation: "
            f"recipe {args.recipe}, KD vs no-KD over seeds", "recipe": args.recipe,
            "command": f"python -m benchmarks.instruction_kd --recipe {args.recipe} --seeds "
                       f"{' '.join(map(str, line['seeds']))}" + "".join(f" --set {s}" for s in args.set),
            "commit": git_commit(), "machine": args.machine or machine_line(first["threads"]),
            "date": datetime.date.today().isoformat(),
            "source": "benchmarks.instruction_kd --table", "notes": notes,
            "columns": ["model", "task score %, seeds", "mean ± std", "agrees with teacher %, seeds",
                        "train time (s), seeds", "parameters", "generate tokens/s, seeds"],
            "rows": body}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="instruct", help="an instruction recipe, name or file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="train.seed values")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 2 steps: checks the plumbing only")
    parser.add_argument("--out", help="where the runs go (default: a new temp dir, kept)")
    parser.add_argument("--table", help="also write the results table here (docs/results/<id>.json)")
    parser.add_argument("--order", type=int, default=35, help="the table's place on the results page")
    parser.add_argument("--title", help="the table's title")
    parser.add_argument("--note", action="append", default=[], help="a paragraph to add to the table's notes")
    parser.add_argument("--machine", help="the machine, in words, for the table (default: this one's CPU model, "
                                          "cores and torch threads)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    rows, _ = run_seeds("instruction_kd", args, run_seed, lambda row: {k: v for k, v in row.items() if "score" in k})
    line = summarise(args, rows, started)
    if args.table:
        Path(args.table).write_text(json.dumps(table(line, args), indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
