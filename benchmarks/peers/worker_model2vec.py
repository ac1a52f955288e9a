"""The model2vec worker (its venv: torch, model2vec with its distill and quantization extras): model2vec's
`distill`, which makes a static embedding model from the teacher alone (no training texts: every vocabulary token
through the teacher, PCA to `pca_dims`, SIF weighting); a sentence's vector is the mean of its tokens' vectors.
And the speed mode of a model2vec dir.

train job: teacher (a sentence-transformers dir), pca_dims, data (the exported JSONL dir), max_length (tokens
read per text, as every system of the table reads), out. Writes out/model and out/vectors.npz (its vectors of the
train and test texts, in order).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import main, read_jsonl, speed_job, use_threads, versions  # noqa: E402


def encode(model, texts: list[str], max_length: int):
    # one process: the harness gives every system the same threads
    return model.encode(texts, max_length=max_length, use_multiprocessing=False)


def train(job: dict) -> dict:
    import numpy as np
    from model2vec.distill import distill

    use_threads(job["threads"])
    data, out = Path(job["data"]), Path(job["out"])
    started = time.perf_counter()
    model = distill(model_name=job["teacher"], pca_dims=job["pca_dims"], device="cpu")
    wall = time.perf_counter() - started
    model.save_pretrained(out / "model")
    np.savez(out / "vectors.npz",
             **{split: encode(model, [row["text"] for row in read_jsonl(data / f"{split}.jsonl")], job["max_length"])
                for split in ("train", "test")})
    return {"train_wall_time_s": wall, "versions": versions("torch", "transformers", "model2vec")}


def static_call(model_dir: str, job: dict):
    """Text -> vectors of a model2vec dir: StaticModel.encode."""
    from model2vec import StaticModel

    model = StaticModel.from_pretrained(model_dir)
    return lambda texts: encode(model, texts, job["max_length"])


if __name__ == "__main__":
    main({"train": train, "speed": lambda job: speed_job(job, static_call)})
