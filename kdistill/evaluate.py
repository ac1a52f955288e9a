"""Evaluation: quality (accuracy, precision/recall/F1, confusion matrix), size, CPU latency and throughput.

Timings are medians over `repeats` runs after `warmup` untimed runs, on real test inputs, with the thread count
and machine recorded: the machine is shared and noisy, so compare models measured in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from kdistill.config import EvalConfig
from kdistill.models import dir_size_mb
from kdistill.student import count_parameters


def quality_metrics(preds: list[int], labels: list[int], label_names: list[str]) -> dict:
    ids = list(range(len(label_names)))
    out = {"accuracy": sum(p == y for p, y in zip(preds, labels)) / max(len(labels), 1), "n_test": len(labels)}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=ids, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    out["per_class"] = classification_report(labels, preds, labels=ids, target_names=label_names,
                                             output_dict=True, zero_division=0)
    out["confusion_matrix"] = confusion_matrix(labels, preds, labels=ids).tolist()
    return out


@torch.no_grad()
def predict(model, encoded_split, tokenizer, batch_size: int = 64) -> list[int]:
    from kdistill.training import make_loader

    model.eval()
    loader = make_loader(encoded_split, tokenizer, batch_size, seed=0, shuffle=False)
    preds = [0] * len(encoded_split)
    order = [i for batch in loader.batch_sampler for i in batch]
    flat = []
    for batch in loader:
        batch.pop("labels", None)
        flat += model(**batch).logits.argmax(-1).tolist()
    for i, p in zip(order, flat):
        preds[i] = p
    return preds


def _inputs(encoded_split, tokenizer, idx: list[int]) -> dict:
    rows = [{k: encoded_split[i][k] for k in encoded_split.column_names if k != "labels"} for i in idx]
    return tokenizer.pad(rows, return_tensors="pt")


@torch.no_grad()
def compare_speed(models: dict, inputs: dict, cfg: EvalConfig) -> dict[str, dict]:
    """Batch-1 latency (ms) and batch-N throughput (examples/s) of several models on the same real inputs.

    inputs: model name -> (encoded split, tokenizer), the same examples in each model's own tokenization.

    Models take turns input by input (A, B, C, A, B, C, ...), so a slow phase of the shared machine hits all of
    them alike; each number is the median of `repeats` timed runs after `warmup` untimed ones.
    """
    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    bs = cfg.throughput_batch_size
    n_batches = max(3, cfg.repeats // 4)
    singles, batches = {}, {}
    for name, (encoded_split, tokenizer) in inputs.items():
        n = len(encoded_split)
        singles[name] = [_inputs(encoded_split, tokenizer, [i % n]) for i in range(cfg.repeats + cfg.warmup)]
        batches[name] = [_inputs(encoded_split, tokenizer, [(j * bs + k) % n for k in range(bs)])
                         for j in range(n_batches + 1)]
    times = {name: {"single": [], "batch": []} for name in models}
    try:
        for m in models.values():
            m.eval()
        for i in range(cfg.repeats + cfg.warmup):
            for name, m in models.items():
                seconds = _time_call(m, singles[name][i])
                if i >= cfg.warmup:
                    times[name]["single"].append(seconds)
        for j in range(n_batches + 1):
            for name, m in models.items():
                seconds = _time_call(m, batches[name][j])
                if j >= 1:
                    times[name]["batch"].append(seconds)
    finally:
        torch.set_num_threads(threads_before)
    return {
        name: {
            "latency_ms_batch1": statistics.median(t["single"]) * 1000,
            "throughput_per_s": bs / statistics.median(t["batch"]),
            "throughput_batch_size": bs,
            "mean_tokens_per_example": float(statistics.mean(int(s["attention_mask"].sum()) for s in singles[name])),
            "threads": cfg.num_threads or threads_before,
        }
        for name, t in times.items()
    }


def _time_call(model, inputs) -> float:
    start = time.perf_counter()
    model(**inputs)
    return time.perf_counter() - start


def machine_info() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def evaluate_model(model, tokenizer, encoded_test, label_names: list[str], cfg: EvalConfig,
                   model_dir: str | Path | None = None, *, speed: bool = True) -> dict:
    """Every number of one model on one test split: quality, size, latency, throughput."""
    preds = predict(model, encoded_test, tokenizer)
    out = quality_metrics(preds, list(encoded_test["labels"]), label_names)
    out["params"] = count_parameters(model)
    out["size_mb"] = dir_size_mb(model_dir) if model_dir else out["params"] * 4 / 2**20
    if speed:
        out.update(compare_speed({"model": model}, {"model": (encoded_test, tokenizer)}, cfg)["model"])
    return out
