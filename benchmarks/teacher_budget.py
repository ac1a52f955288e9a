"""Does the `ner` recipe's teacher budget follow the data? Its teacher on a small NER set given as files, under the
recipe's budget (a step cap, validation often, patience), under a fixed 2 epochs, and trained long with the best
validation score kept (the reference), for each seed.

    python -m benchmarks.teacher_budget make-data --out DIR [--sentences 2000]
    python -m benchmarks.teacher_budget run --data DIR [--seeds 1 2] [--reference-epochs 40] [--budgets ...]

`make-data` writes DIR/train.txt (whole CoNLL-2003 training documents, from the first, until --sentences
sentences: real newswire text ~7x smaller than the set the recipe was sized for) and DIR/test.txt (the CoNLL-2003
test file). `run` trains each teacher with `kdistill train-teacher ner` on those files (validation: the recipe's
own seeded draw from train.txt), reads each one's test entity F1 and prints one JSON object. ~1 hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import spread, stdout_to_stderr

BUDGETS = {
    "recipe": [],
    "fixed 2 epochs": ["teacher.epochs=2", "teacher.max_steps=null", "teacher.patience=null"],
}
"""Overrides on the ner recipe per budget; the reference (`--reference-epochs`, no cap, no patience, the best
validation weights kept) is added to them."""


def make_data(out: Path, sentences: int) -> dict:
    from kdistill.assets import CONLL2003, fetch
    from kdistill.data.readers import read_conll

    out.mkdir(parents=True, exist_ok=True)
    src = fetch(CONLL2003)
    lines, count, in_sentence = [], 0, False
    for line in (src / "train.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("-DOCSTART-"):
            if count >= sentences:
                break  # whole documents only: the text stays as written
        elif not line.strip():
            count += in_sentence
            in_sentence = False
        else:
            in_sentence = True
        lines.append(line)
    (out / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "test.txt").write_text((src / "test.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return {"train_sentences": len(read_conll(out / "train.txt")), "test_sentences": len(read_conll(out / "test.txt"))}


def train_one(data: Path, seed: int, overrides: list[str]) -> dict:
    import kdistill

    with tempfile.TemporaryDirectory() as tmp, stdout_to_stderr():
        sets = [f"data.train_file={data / 'train.txt'}", f"data.test_file={data / 'test.txt'}", "data.dataset=null",
                "data.unlabeled_file=null", f"train.seed={seed}", *overrides]
        started = time.perf_counter()
        kdistill.train_teacher("ner", set=sets, out=Path(tmp) / "run")
        seconds = time.perf_counter() - started
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text(encoding="utf-8"))
    teacher = metrics["models"]["teacher"]
    return {"entity_f1": teacher["entity_f1"], "training": teacher.get("training"), "seconds": seconds}


def run(data: Path, seeds: list[int], reference_epochs: float, only: list[str] | None = None) -> dict:
    budgets = {**BUDGETS, "reference": [f"teacher.epochs={reference_epochs}", "teacher.max_steps=null",
                                        "teacher.patience=null"]}
    results = {}
    for name, overrides in budgets.items():
        if only and name not in only:
            continue
        runs = []
        for seed in seeds:
            runs.append(train_one(data, seed, overrides))
            print(f"{name}, seed {seed}: entity F1 {runs[-1]['entity_f1']:.4f}, {runs[-1]['training']}, "
                  f"{runs[-1]['seconds']:.0f} s", file=sys.stderr)
        results[name] = {"entity_f1": spread([r["entity_f1"] for r in runs]), "runs": runs}
    return {"seeds": seeds, "reference_epochs": reference_epochs, "budgets": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    make = sub.add_parser("make-data")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--sentences", type=int, default=2000)
    go = sub.add_parser("run")
    go.add_argument("--data", type=Path, required=True)
    go.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    go.add_argument("--reference-epochs", type=float, default=40)
    go.add_argument("--budgets", nargs="+", choices=[*BUDGETS, "reference"], help="only these (default: all)")
    args = parser.parse_args()
    if args.cmd == "make-data":
        print(json.dumps(make_data(args.out, args.sentences)))
    else:
        print(json.dumps(run(args.data, args.seeds, args.reference_epochs, args.budgets)))


if __name__ == "__main__":
    main()
