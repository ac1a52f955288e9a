"""The st-distill worker (its venv: torch, sentence-transformers with its training extras): sentence-transformers'
own model distillation (its documented recipe, examples/.../distillation/model_distillation.py): the student is the
teacher with only some of its layers kept, trained by SentenceTransformerTrainer with MSELoss to reproduce the
teacher's embeddings; and the speed mode of every sentence-transformers dir (kdistill's encoders are timed by it
too, in kdistill's venv).

train job: teacher (a sentence-transformers dir), student_layers, data (the exported JSONL dir: the student learns
the train and unlabeled texts, as kdistill's student does), out, budget (common.budget). The teacher's embeddings
are computed first, inside the timed training, as kdistill's cache pass is. Writes out/model (a
sentence-transformers dir) and out/vectors.npz (the student's vectors of the train and test texts, in order).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import main, read_jsonl, speed_job, use_threads, versions  # noqa: E402


def load_encoder(model_dir: str, max_length: int):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = max_length
    return model


def texts_of(path: Path) -> list[str]:
    return [row["text"] for row in read_jsonl(path)]


def train(job: dict) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses

    use_threads(job["threads"])
    b = job["budget"]
    data, out = Path(job["data"]), Path(job["out"])
    train_texts, test_texts = texts_of(data / "train.jsonl"), texts_of(data / "test.jsonl")
    fit_texts = train_texts + texts_of(data / "unlabeled.jsonl")
    teacher = load_encoder(job["teacher"], b["max_length"])
    student = load_encoder(job["teacher"], b["max_length"])
    encoder = student[0].auto_model.encoder
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in job["student_layers"]])
    student[0].auto_model.config.num_hidden_layers = len(job["student_layers"])
    started = time.perf_counter()
    targets = teacher.encode(fit_texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    teacher_s = time.perf_counter() - started
    dataset = Dataset.from_dict({"sentence": fit_texts, "label": targets.tolist()})
    with tempfile.TemporaryDirectory(prefix="peers-st-distill-") as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=b["epochs"], per_device_train_batch_size=b["batch_size"],
            learning_rate=b["lr"], warmup_steps=b["warmup_ratio"], weight_decay=b["weight_decay"],
            max_grad_norm=b["max_grad_norm"], seed=b["seed"], save_strategy="no", report_to="none",
            logging_steps=50, use_cpu=True, disable_tqdm=True)
        trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset,
                                             loss=losses.MSELoss(student))
        trainer.train()
    wall = time.perf_counter() - started
    student.save(str(out / "model"))
    np.savez(out / "vectors.npz",
             train=student.encode(train_texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False),
             test=student.encode(test_texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False))
    examples = len(fit_texts) * b["epochs"]
    return {"train_wall_time_s": wall, "teacher_embeddings_s": teacher_s, "steps": trainer.state.global_step,
            "examples": examples, "samples_per_s": examples / wall,
            "versions": versions("torch", "transformers", "sentence-transformers")}


def encoder_call(model_dir: str, job: dict):
    """Text -> vectors of a sentence-transformers dir: SentenceTransformer.encode, all texts in one batch."""
    model = load_encoder(model_dir, job["max_length"])
    return lambda texts: model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)


if __name__ == "__main__":
    main({"train": train, "speed": lambda job: speed_job(job, encoder_call)})
