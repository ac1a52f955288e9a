"""Peer hf-trainer-kd: the classic KD people write by hand, a Hugging Face `Trainer` subclass whose compute_loss adds
the teacher's soft targets (worker_hf_trainer_kd.py), on kdistill's default recipe: its fine-tuned teacher, its
student (the same layers of the same pretrained encoder), its labeled and transfer rows, epochs, batch size, lr,
temperature and loss weights."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.common import Peer, PeerFailed, Setup, budget, classifier_system

PACKAGES = ("transformers==5.25.0", "accelerate==1.16.0")
LOSSES = {"kd", "ce"}
"""The loss terms both hand-written KD peers implement: soft targets and hard labels."""


def kd_job(setup: Setup) -> dict:
    """The train job of a hand-written KD peer (hf-trainer-kd, textbrewer): the run's teacher and student."""
    b = budget(setup)
    if set(b["losses"]) - LOSSES:
        raise PeerFailed(f"distill.losses: {', '.join(sorted(set(b['losses']) - LOSSES))} not implemented here "
                         f"(only {', '.join(sorted(LOSSES))})")
    b["losses"] = {term: b["losses"].get(term, 0.0) for term in sorted(LOSSES)}
    return {"teacher": str(setup.teacher_dir), "student_source": str(setup.student_dir),
            "student_layers": setup.student_layers, "label_names": setup.data.label_names,
            "data": str(setup.data_dir), "budget": b}


def systems(setup: Setup, out: Path, result: dict) -> dict:
    label = f"Trainer subclass with a KD loss (transformers {result['versions']['transformers']})"
    return {"hf-trainer-kd": (classifier_system(setup, out, result, label), out / "model")}


PEER = Peer(name="hf-trainer-kd", table="peers-kd", packages=PACKAGES, worker="worker_hf_trainer_kd.py",
            job=kd_job, systems=systems, timeout_s=2 * 3600,
            note="**Trainer subclass**: `transformers.Trainer` with `compute_loss` = kd · T²·KL(p_T ‖ p_S) + "
                 "ce · CE on the labeled rows, the teacher run under no_grad every step; the Trainer's defaults "
                 "otherwise (fused AdamW, linear warmup and decay, dynamic padding).")
