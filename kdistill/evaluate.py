"""Evaluation: quality (accuracy, precision/recall/F1, confusion matrix; or perplexity), size, CPU latency and
throughput.

Timings are medians over `repeats` runs after `warmup` untimed runs, on real test inputs, with the thread count
and machine recorded: the machine is shared and noisy, so compare models measured in the same run. Every timing
runs with `eval.num_threads` torch threads (`torch_threads`).

Causal LMs. Held-out perplexity = exp(mean next-token NLL) over the test blocks (`perplexity`, from training.py:
the causal loop validates with it too). Speed, all models interleaved in one process: generation tokens/s at
batch 1 (greedy, SPEED_NEW_TOKENS new tokens after a SPEED_PROMPT_TOKENS-token prompt taken from the test blocks)
and scoring tokens/s (one forward over `eval.throughput_batch_size` blocks). Params: all, and those in the
transformer blocks alone (`block_parameters`: the embeddings are shared with the LM head and identical in size
for any depth). A few greedy generations from fixed prompts show what the perplexities mean.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support
from torch import Tensor

from kdistill.config import EvalConfig
from kdistill.data import LMBlocks
from kdistill.models import dir_size_mb
from kdistill.student import count_parameters, find_layer_list
from kdistill.training import make_loader, perplexity


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


SAMPLE_PROMPTS = (
    "The government has announced",
    "Shares in the technology company",
    "The England coach said",
)
"""Fixed prompts of the report's sample generations (news-like, to match the built-in corpus)."""
SAMPLE_NEW_TOKENS = 30
SPEED_PROMPT_TOKENS = 32
SPEED_NEW_TOKENS = 32


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with `n` torch CPU threads (None: unchanged), restoring the count afterwards; yields the
    count before."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def predict(model, encoded_split, tokenizer, batch_size: int = 64) -> list[int]:
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
    with torch_threads(cfg.num_threads) as threads_before:
        return _compare_speed(models, inputs, cfg, cfg.num_threads or threads_before)


@torch.no_grad()
def _compare_speed(models: dict, inputs: dict, cfg: EvalConfig, threads: int) -> dict[str, dict]:
    bs = cfg.throughput_batch_size
    n_batches = max(3, cfg.repeats // 4)
    singles, batches = {}, {}
    for name, (encoded_split, tokenizer) in inputs.items():
        n = len(encoded_split)
        singles[name] = [_inputs(encoded_split, tokenizer, [i % n]) for i in range(cfg.repeats + cfg.warmup)]
        batches[name] = [_inputs(encoded_split, tokenizer, [(j * bs + k) % n for k in range(bs)])
                         for j in range(n_batches + 1)]
    times = {name: {"single": [], "batch": []} for name in models}
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
    return {
        name: {
            "latency_ms_batch1": statistics.median(t["single"]) * 1000,
            "throughput_per_s": bs / statistics.median(t["batch"]),
            "throughput_batch_size": bs,
            "mean_tokens_per_example": float(statistics.mean(int(s["attention_mask"].sum()) for s in singles[name])),
            "threads": threads,
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


# ------------------------------------------------------------------------------------------------ causal LM

def block_parameters(model) -> int:
    """Parameters inside the transformer blocks (the layer list), excluding embeddings, final norm and head."""
    return sum(p.numel() for p in find_layer_list(model)[1].parameters())


def evaluate_lm_model(model, test_blocks: LMBlocks, cfg: EvalConfig) -> dict:
    """Quality and size of one causal LM on the test blocks: perplexity, NLL per token, predicted tokens, params."""
    ppl = perplexity(model, test_blocks, batch_size=max(1, cfg.throughput_batch_size))
    return {"perplexity": ppl["perplexity"], "nll_per_token": ppl["loss"], "n_test_tokens": ppl["tokens"],
            "params": count_parameters(model), "block_params": block_parameters(model)}


def _generate(model, input_ids: Tensor, new_tokens: int, pad_id: int) -> Tensor:
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                          num_beams=1, top_k=None, top_p=None, temperature=None)


@torch.no_grad()
def compare_lm_speed(models: dict, blocks: LMBlocks, cfg: EvalConfig, pad_id: int) -> dict[str, dict]:
    """Generation tokens/s (batch 1, greedy) and scoring tokens/s (a batch of blocks), models interleaved."""
    with torch_threads(cfg.num_threads) as threads_before:
        return _compare_lm_speed(models, blocks, cfg, pad_id, cfg.num_threads or threads_before)


@torch.no_grad()
def _compare_lm_speed(models: dict, blocks: LMBlocks, cfg: EvalConfig, pad_id: int, threads: int) -> dict:
    n = len(blocks)
    prompt_len = min(SPEED_PROMPT_TOKENS, blocks.input_ids.shape[1])
    times = {name: {"gen": [], "score": []} for name in models}
    bs = cfg.throughput_batch_size
    n_batches = max(1, cfg.repeats // 4)
    for m in models.values():
        m.eval()
    for i in range(cfg.warmup + cfg.repeats):
        prompt = blocks.input_ids[i % n, :prompt_len][None]
        for name, m in models.items():
            start = time.perf_counter()
            _generate(m, prompt.to(next(m.parameters()).device), SPEED_NEW_TOKENS, pad_id)
            if i >= cfg.warmup:
                times[name]["gen"].append(time.perf_counter() - start)
    scored = []
    for j in range(n_batches + 1):
        rows = [(j * bs + r) % n for r in range(bs)]
        batch = blocks.batch(rows)
        scored.append(int(batch["attention_mask"].sum()))
        for name, m in models.items():
            device = next(m.parameters()).device
            start = time.perf_counter()
            m(**{k: v.to(device) for k, v in batch.items()})
            if j >= 1:  # the first batch warms up
                times[name]["score"].append(time.perf_counter() - start)
    tokens_per_batch = statistics.median(scored[1:])
    out = {}
    for name, t in times.items():
        gen = statistics.median(t["gen"])
        out[name] = {
            "generate_tokens_per_s": SPEED_NEW_TOKENS / gen,
            "ms_per_token_batch1": 1000 * gen / SPEED_NEW_TOKENS,
            "score_tokens_per_s": tokens_per_batch / statistics.median(t["score"]),
            "score_batch_size": bs,
            "threads": threads,
        }
    return out


@torch.no_grad()
def sample_generations(models: dict, tokenizer, prompts=SAMPLE_PROMPTS, new_tokens: int = SAMPLE_NEW_TOKENS,
                       threads: int | None = None) -> dict:
    """Greedy continuations of the fixed prompts by every model: {name: [{"prompt", "completion"}]}."""
    with torch_threads(threads):
        return _sample_generations(models, tokenizer, prompts, new_tokens)


@torch.no_grad()
def _sample_generations(models: dict, tokenizer, prompts, new_tokens: int) -> dict:
    out = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        rows = []
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=new_tokens, pad_token_id=pad, num_beams=1,
                                       top_k=None, top_p=None, temperature=None)
            rows.append({"prompt": prompt,
                         "completion": tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)})
        out[name] = rows
    return out
