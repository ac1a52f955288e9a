"""The textbrewer worker (its venv: torch, transformers, textbrewer 0.2.1): TextBrewer's GeneralDistiller as
benchmarks/distill_speed.py sets it up (its textbrewer_distiller, padded_loader, grouped_params: imported from
there, so both benchmarks run the same TextBrewer), here on the recipe's labeled and transfer rows.

train job: as worker_hf_trainer_kd's (teacher, student_source, student_layers, label_names, data, out, budget). The
objective has the gradient of hf-trainer-kd's loss: TextBrewer's kd loss 'ce' at T weighted T²·kd, and the hard
labels' CE over the labeled rows of each batch, weighted ce; every text padded to max_length, as in TextBrewer's
examples. Writes out/model and out/predictions.json; speed mode: worker_hf_trainer_kd's (an HF classifier dir).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))  # the repo: benchmarks.distill_speed (its imports are lazy: stdlib here)
from benchmarks.distill_speed import (  # noqa: E402
    grouped_params,
    padded_loader,
    textbrewer_adaptor,
    textbrewer_distiller,
)
from timing import main, read_jsonl, speed_job, use_threads  # noqa: E402
from worker_hf_trainer_kd import UNLABELED, classifier_call, cut_student, finish, label_ids  # noqa: E402


class Columns(dict):
    """A split's columns (name -> list), read as distill_speed.padded_loader reads a datasets.Dataset."""

    @property
    def column_names(self) -> list[str]:
        return list(self)


def labeled_adaptor(batch, outputs) -> dict:
    """distill_speed's adaptor with the hard-label loss over the labeled rows only: the model's own loss is the
    NaN of an empty mean on a batch of transfer rows alone."""
    import torch.nn.functional as F

    out = textbrewer_adaptor(batch, outputs)
    labels = batch["labels"]
    labeled = labels != UNLABELED
    out["losses"] = (F.cross_entropy(outputs.logits[labeled], labels[labeled]) if labeled.any()
                     else outputs.logits.sum() * 0.0)
    return out


def train(job: dict) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    use_threads(job["threads"])
    b = job["budget"]
    rows = read_jsonl(Path(job["data"]) / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(job["teacher"])
    teacher = AutoModelForSequenceClassification.from_pretrained(job["teacher"])
    student = cut_student(job["student_source"], job["student_layers"], job["label_names"], b["seed"])
    split = Columns(text=[row["text"] for row in rows], label=label_ids(rows, job["label_names"]))
    loader = padded_loader(split, tokenizer, b["max_length"], b["batch_size"], b["seed"])
    steps = math.ceil(len(loader) * b["epochs"])
    with tempfile.TemporaryDirectory(prefix="peers-textbrewer-") as tmp:
        distiller = textbrewer_distiller(student, teacher, weights=b["losses"], temperature=b["temperature"],
                                         pairs=[], device="cpu", output_dir=tmp)
        distiller.adaptor_S = labeled_adaptor
        distiller.t_config.ckpt_steps = len(loader)  # one checkpoint per epoch, as its epoch loop writes
        optimizer = torch.optim.AdamW(grouped_params(student, b["weight_decay"]), lr=b["lr"])
        started = time.perf_counter()
        with distiller:
            distiller.train(optimizer, loader, num_steps=steps, max_grad_norm=b["max_grad_norm"],
                            scheduler_class=get_linear_schedule_with_warmup,
                            scheduler_args={"num_warmup_steps": int(b["warmup_ratio"] * steps),
                                            "num_training_steps": steps})
        wall = time.perf_counter() - started
    taken = int(optimizer.state[next(student.parameters())]["step"])
    return finish(job, student, tokenizer, wall, taken, len(rows) * b["epochs"], "textbrewer")


if __name__ == "__main__":
    main({"train": train, "speed": lambda job: speed_job(job, classifier_call)})
