"""Peer st-distill: sentence-transformers' own model distillation (worker_st_distill.py) on kdistill's embedding
recipe: the teacher with only the layers kdistill's student keeps, trained with MSELoss to reproduce the teacher's
embeddings of the same texts, for the same epochs, batch size and learning rate."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.common import Peer, Setup, budget, vector_system

PACKAGES = ("sentence-transformers[train]==6.3.0", "transformers==5.25.0", "accelerate==1.16.0", "datasets==5.2.0")


def job(setup: Setup) -> dict:
    return {"teacher": str(setup.teacher_dir), "student_layers": setup.student_layers, "data": str(setup.data_dir),
            "budget": budget(setup)}


def systems(setup: Setup, out: Path, result: dict) -> dict:
    layers = ", ".join(map(str, setup.student_layers))
    label = (f"sentence-transformers {result['versions']['sentence-transformers']} MSELoss (teacher layers "
             f"{layers}, full FFN)")
    return {"st-distill": (vector_system(setup, out, result, label), out / "model")}


PEER = Peer(name="st-distill", table="peers-embedding", packages=PACKAGES, worker="worker_st_distill.py", job=job,
            systems=systems, timeout_s=4 * 3600,
            note="**sentence-transformers**: its model-distillation recipe: the student is the teacher with only "
                 "kdistill's student's layers kept (full feed-forward width: it has no pruning step), "
                 "`SentenceTransformerTrainer` with `MSELoss` on the teacher's embeddings of the train and "
                 "unlabeled texts (computed first, inside the timed training), the recipe's epochs, batch size, "
                 "lr and warmup.")
