"""Peer textbrewer: TextBrewer 0.2.1's GeneralDistiller, set up as benchmarks/distill_speed.py sets it up
(worker_textbrewer.py imports it from there), on kdistill's default recipe: the same teacher, student, rows and
budget as hf-trainer-kd."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.common import Peer, Setup, classifier_system
from benchmarks.peers.hf_trainer_kd import kd_job

PACKAGES = ("textbrewer==0.2.1", "transformers==5.25.0")


def systems(setup: Setup, out: Path, result: dict) -> dict:
    label = f"TextBrewer {result['versions']['textbrewer']} GeneralDistiller"
    return {"textbrewer": (classifier_system(setup, out, result, label), out / "model")}


PEER = Peer(name="textbrewer", table="peers-kd", packages=PACKAGES, worker="worker_textbrewer.py", job=kd_job,
            systems=systems, timeout_s=2 * 3600,
            note="**TextBrewer**: `GeneralDistiller` with kd loss 'ce' weighted T²·kd (the gradient of T²·KL) and "
                 "the hard labels' CE over each batch's labeled rows weighted ce, every text padded to max_length "
                 "as in its examples, AdamW with linear warmup and decay, a checkpoint per epoch as its loop writes.")
