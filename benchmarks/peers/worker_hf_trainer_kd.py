"""The hf-trainer-kd worker (its venv: torch, transformers, accelerate): the distillation people write by hand, a
Hugging Face `Trainer` subclass whose compute_loss adds the frozen teacher's soft targets; and the speed mode of
every Hugging Face classifier dir (kdistill's own classifiers are timed by it too, in kdistill's venv).

train job: teacher (HF classifier dir), student_source (the pretrained encoder the student is cut from),
student_layers, label_names, data (the exported JSONL dir), out, budget (common.budget: epochs, batch_size, lr,
warmup_ratio, weight_decay, max_grad_norm, seed, max_length, temperature, losses {kd, ce}). Per batch:
    loss = kd · T²·KL(p_T ‖ p_S) at T, averaged over the rows  +  ce · CE(student, labels) over the labeled rows
(a transfer row, label null, adds to the first term only), the Trainer's defaults otherwise (AdamW, linear warmup
and decay, dynamic padding by DataCollatorWithPadding). Writes out/model and out/predictions.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import main, read_jsonl, speed_job, use_threads, versions  # noqa: E402

UNLABELED = -100
"""The label id of a transfer row: the ignore_index of torch's cross-entropy, as in kdistill."""


def cut_student(source: str, layers: list[int], label_names: list[str], seed: int):
    """The student as a user builds it: `source`'s sequence classifier (a new head, drawn from `seed`) keeping only
    the encoder `layers`, in order (a BERT-style encoder: base_model.encoder.layer)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)})
    encoder = model.base_model.encoder
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    return model


def label_ids(rows: list[dict], label_names: list[str]) -> list[int]:
    return [UNLABELED if row["label"] is None else label_names.index(row["label"]) for row in rows]


def predict(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> list[str]:
    """The predicted class name of each text, in order."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
            out += [model.config.id2label[i] for i in model(**inputs).logits.argmax(-1).tolist()]
    return out


def finish(job: dict, student, tokenizer, wall: float, steps: int, examples: float, *packages: str) -> dict:
    """Save the student, write its test predictions, and return the train job's result."""
    out = Path(job["out"])
    student.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    texts = [row["text"] for row in read_jsonl(Path(job["data"]) / "test.jsonl")]
    predictions = predict(student, tokenizer, texts, job["budget"]["max_length"])
    (out / "predictions.json").write_text(json.dumps(predictions) + "\n", encoding="utf-8")
    return {"train_wall_time_s": wall, "steps": steps, "examples": examples, "samples_per_s": examples / wall,
            "versions": versions("torch", "transformers", *packages)}


def train(job: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    use_threads(job["threads"])
    b = job["budget"]
    rows = read_jsonl(Path(job["data"]) / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(job["teacher"])
    teacher = AutoModelForSequenceClassification.from_pretrained(job["teacher"]).eval()
    student = cut_student(job["student_source"], job["student_layers"], job["label_names"], b["seed"])
    encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=b["max_length"])
    dataset = [{**{k: v[i] for k, v in encoded.items()}, "labels": y}
               for i, y in enumerate(label_ids(rows, job["label_names"]))]
    t, weights = b["temperature"], b["losses"]

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            kd = F.kl_div(F.log_softmax(outputs.logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                          log_target=True, reduction="batchmean") * t * t
            labeled = labels != UNLABELED
            # a batch of transfer rows alone has no hard labels: its CE term is 0, not the NaN of an empty mean
            ce = F.cross_entropy(outputs.logits[labeled], labels[labeled]) if labeled.any() else kd * 0.0
            loss = weights["kd"] * kd + weights["ce"] * ce
            return (loss, outputs) if return_outputs else loss

    with tempfile.TemporaryDirectory(prefix="peers-hf-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=b["epochs"], per_device_train_batch_size=b["batch_size"],
            learning_rate=b["lr"], warmup_steps=b["warmup_ratio"], weight_decay=b["weight_decay"],
            max_grad_norm=b["max_grad_norm"], seed=b["seed"], save_strategy="no", report_to="none",
            logging_steps=50, use_cpu=True, disable_tqdm=True)
        trainer = KDTrainer(model=student, args=args, train_dataset=dataset,
                            data_collator=DataCollatorWithPadding(tokenizer))
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    return finish(job, student, tokenizer, wall, trainer.state.global_step, len(rows) * b["epochs"], "accelerate")


def classifier_call(model_dir: str, job: dict):
    """Text -> predicted class ids of a Hugging Face classifier dir: its tokenizer (padding to the longest, cut at
    max_length), then the model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def call(texts: list[str]):
        with torch.inference_mode():
            inputs = tokenizer(texts, padding=True, truncation=True, max_length=job["max_length"],
                               return_tensors="pt")
            return model(**inputs).logits.argmax(-1)

    return call


if __name__ == "__main__":
    main({"train": train, "speed": lambda job: speed_job(job, classifier_call)})
