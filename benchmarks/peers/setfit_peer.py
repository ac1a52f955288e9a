"""Peer setfit: SetFit, the tool built for few labels (worker_setfit.py), on kdistill's default recipe: SetFit on the
same labeled rows from the pretrained encoder kdistill's teacher starts from, then SetFit's DistillationTrainer
from that model into kdistill's student body (the same layers of the same encoder) on every training text, for as
many optimizer steps as kdistill's student takes."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.peers.common import Peer, Setup, score_predictions, system_numbers

PACKAGES = ("setfit==1.2.0", "sentence-transformers[train]==6.3.0", "transformers==5.25.0", "datasets==5.2.0",
            "scikit-learn==1.9.1")
NUM_ITERATIONS = 20
"""Pairs drawn per labeled text and per side (SetFit's paper setting: 20 x 2 x 200 = 8,000 pairs, one epoch)."""
BATCH_SIZE = 16
"""SetFit's default pair batch, also its distillation's."""
QUICK_STEPS = 4


def job(setup: Setup) -> dict:
    metrics = json.loads((setup.run_dir / "metrics.json").read_text(encoding="utf-8"))
    kdistill_steps = metrics["models"]["student"]["training"]["planned_steps"]
    return {"body": str(setup.base_dir), "student_body": str(setup.student_dir),
            "student_layers": setup.student_layers, "data": str(setup.data_dir),
            "max_length": setup.cfg.data.max_length, "seed": setup.cfg.train.seed, "batch_size": BATCH_SIZE,
            "num_iterations": NUM_ITERATIONS, "max_steps": QUICK_STEPS if setup.quick else None,
            "distill_steps": kdistill_steps}


def systems(setup: Setup, out: Path, result: dict) -> dict:
    predicted = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    version = result["versions"]["setfit"]
    layers = ", ".join(map(str, setup.student_layers))
    labels = {"setfit": f"SetFit {version} ({setup.cfg.teacher.model} body, labeled rows)",
              "setfit-distilled": f"SetFit {version} distilled (layers {layers} of {setup.cfg.student.model or 'it'})"}
    return {name: (system_numbers(labels[name], score_predictions(setup, predicted[name]),
                                  {**result[name], "versions": result["versions"]}, out / name), out / name)
            for name in predicted}


PEER = Peer(name="setfit", table="peers-fewlabel", packages=PACKAGES, worker="worker_setfit.py", job=job,
            systems=systems, timeout_s=4 * 3600,
            note=f"**SetFit**: `setfit.Trainer` on the labeled rows from the pretrained encoder the teacher starts "
                 f"from: its defaults (CosineSimilarityLoss on pairs, body lr 2e-5, a logistic-regression head) "
                 f"with {NUM_ITERATIONS} pair iterations, batch {BATCH_SIZE}, one epoch; then `DistillationTrainer` "
                 "into kdistill's student body on every training text (labels unused), for as many steps as "
                 "kdistill's student takes, its head fitted to the SetFit model's predictions. The distilled "
                 "row's train wall time is the distillation's alone, as kdistill's student's excludes its teacher.")
