"""Peer model2vec: a static embedding model distilled from kdistill's embedding teacher by model2vec
(worker_model2vec.py), scored by kdistill's embedding metrics against the same teacher."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.common import Peer, Setup, vector_system

PACKAGES = ("model2vec[distill,quantization]==0.10.0", "transformers==5.3.0", "skeletoken==0.6.1",
            "scikit-learn==1.9.1")
PCA_DIMS = 256
"""model2vec's default output width."""


def job(setup: Setup) -> dict:
    return {"teacher": str(setup.teacher_dir), "pca_dims": PCA_DIMS, "data": str(setup.data_dir),
            "max_length": setup.cfg.data.max_length}


def systems(setup: Setup, out: Path, result: dict) -> dict:
    label = f"model2vec {result['versions']['model2vec']} (static, distilled from the teacher, {PCA_DIMS} dims)"
    return {"model2vec": (vector_system(setup, out, result, label), out / "model")}


PEER = Peer(name="model2vec", table="peers-embedding", packages=PACKAGES, worker="worker_model2vec.py", job=job,
            systems=systems, timeout_s=3600,
            note=f"**model2vec**: `model2vec.distill` of the teacher (its defaults: PCA to {PCA_DIMS} dims, SIF "
                 "weighting, float16 weights); it reads no training texts, so its train wall time is the "
                 "distillation's. A text's vector is the mean of its first max_length tokens' vectors.")
