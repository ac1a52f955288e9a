"""The setfit worker (its venv: torch, setfit and what it pulls: sentence-transformers, datasets, scikit-learn):
SetFit on the labeled rows, then SetFit's DistillationTrainer from that model into a smaller body on every training
text (labels unused); and the speed mode of a SetFit dir.

train job: body (the pretrained sentence-transformers dir kdistill's teacher starts from), student_body +
student_layers (kdistill's student: those layers of that dir), data (the exported JSONL dir), out, max_length,
seed, batch_size, num_iterations, max_steps (None: SetFit's epochs decide), distill_steps (the distillation's
optimizer steps; 0: not run). Writes out/setfit and out/setfit-distilled (SetFit dirs: body + head) and
out/predictions.json ({system: class names of the test rows}).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import main, read_jsonl, speed_job, use_threads, versions  # noqa: E402


def arguments(job: dict, tmp: str, max_steps: int | None):
    """SetFit's TrainingArguments: its defaults (CosineSimilarityLoss on pairs, body lr 2e-5, a logistic-regression
    head), the job's batch size, pair iterations and step cap, nothing written outside `tmp`."""
    from setfit import TrainingArguments

    return TrainingArguments(output_dir=tmp, batch_size=job["batch_size"], num_epochs=1,
                             num_iterations=job["num_iterations"], max_steps=max_steps or -1, seed=job["seed"],
                             save_strategy="no", report_to="none", show_progress_bar=False)


def student_model(job: dict, labels: list[str]):
    """A SetFit model whose body is kdistill's student: student_body with only student_layers, in order."""
    import torch
    from sentence_transformers import SentenceTransformer
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    body = SentenceTransformer(job["student_body"], device="cpu")
    body.max_seq_length = job["max_length"]
    encoder = body[0].auto_model.encoder
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in job["student_layers"]])
    body[0].auto_model.config.num_hidden_layers = len(job["student_layers"])
    return SetFitModel(model_body=body, model_head=LogisticRegression(), labels=labels)


def predict(model, texts: list[str]) -> list[str]:
    return [str(y) for y in model.predict(texts, batch_size=64)]


def train(job: dict) -> dict:
    from datasets import Dataset
    from setfit import DistillationTrainer, SetFitModel, Trainer

    use_threads(job["threads"])
    data, out = Path(job["data"]), Path(job["out"])
    rows = read_jsonl(data / "train.jsonl")
    labeled = [row for row in rows if row["label"] is not None]
    texts = [row["text"] for row in rows] + [row["text"] for row in read_jsonl(data / "unlabeled.jsonl")]
    test = [row["text"] for row in read_jsonl(data / "test.jsonl")]
    labels = sorted({row["label"] for row in labeled})
    model = SetFitModel.from_pretrained(job["body"], labels=labels)
    model.model_body.max_seq_length = job["max_length"]
    result = {"versions": versions("torch", "transformers", "sentence-transformers", "setfit")}
    predictions = {}
    with tempfile.TemporaryDirectory(prefix="peers-setfit-") as tmp:
        trainer = Trainer(model=model, args=arguments(job, tmp, job["max_steps"]),
                          train_dataset=Dataset.from_dict({"text": [r["text"] for r in labeled],
                                                           "label": [r["label"] for r in labeled]}))
        started = time.perf_counter()
        trainer.train()
        result["setfit"] = {"train_wall_time_s": time.perf_counter() - started,
                            "steps": trainer.st_trainer.state.global_step, "examples": len(labeled)}
        model.save_pretrained(str(out / "setfit"))
        predictions["setfit"] = predict(model, test)
        if job["distill_steps"]:
            student = student_model(job, labels)
            distiller = DistillationTrainer(teacher_model=model, student_model=student,
                                            args=arguments(job, tmp, job["distill_steps"]),
                                            train_dataset=Dataset.from_dict({"text": texts}))
            started = time.perf_counter()
            distiller.train()
            result["setfit-distilled"] = {"train_wall_time_s": time.perf_counter() - started,
                                          "steps": distiller.st_trainer.state.global_step, "examples": len(texts)}
            student.save_pretrained(str(out / "setfit-distilled"))
            predictions["setfit-distilled"] = predict(student, test)
    (out / "predictions.json").write_text(json.dumps(predictions) + "\n", encoding="utf-8")
    return result


def setfit_call(model_dir: str, job: dict):
    """Text -> predicted class names of a SetFit dir: SetFitModel.predict, all texts in one batch."""
    from setfit import SetFitModel

    model = SetFitModel.from_pretrained(model_dir)
    model.model_body.max_seq_length = job["max_length"]
    return lambda texts: model.predict(texts, batch_size=len(texts))


if __name__ == "__main__":
    main({"train": train, "speed": lambda job: speed_job(job, setfit_call)})
