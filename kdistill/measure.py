"""Evaluation: quality (accuracy, precision/recall/F1, confusion matrix; or perplexity), size, CPU latency and
throughput.

Timings are medians over `repeats` runs after `warmup` untimed runs, on real test inputs, with the thread count
and machine recorded: the machine is shared and noisy, so compare models measured in the same run. Every timing
runs with `eval.num_threads` torch threads (`torch_threads`).

Causal LMs. Held-out perplexity = exp(mean next-token NLL) over the test blocks (`perplexity`, from training.py:
the causal loop validates with it too), and bits per byte = the same NLL sum / (ln 2 × the UTF-8 bytes of the
predicted tokens), which compares models over different tokenizers. Speed, all models interleaved in one
process: generation tokens/s at batch 1 (greedy, SPEED_NEW_TOKENS new tokens after a SPEED_PROMPT_TOKENS-token prompt taken from the test blocks)
and scoring tokens/s (one forward over `eval.throughput_batch_size` blocks). Params: all, and those in the
transformer blocks alone (`block_parameters`: the embeddings are shared with the LM head and identical in size
for any depth). A few greedy generations from fixed prompts show what the perplexities mean.

Sentence encoders (task: embedding), without gold similarity data (`embedding_metrics`): agreement with the teacher
(Spearman correlation of the pairwise cosine similarities of held-out texts, `spearman_agreement`), recall@10 of the
teacher's nearest neighbours (`neighbour_recall`) and k-NN classification accuracy on a labeled split
(`knn_accuracy`: the training texts are the index, each test text takes its k nearest neighbours' majority label).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support
from torch import Tensor

from kdistill.config import EvalConfig
from kdistill.data import LMBlocks, pad_id_of
from kdistill.features import Pooling, capture
from kdistill.models import dir_size_mb
from kdistill.student import count_parameters, find_layer_list
from kdistill.training import entity_metrics, has_token_labels, make_loader, perplexity, tag_sequences


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
    """Every number of one model on one test split: quality, size, latency, throughput. Quality of a token
    classifier (labels per token): `token_quality_metrics`."""
    if has_token_labels(encoded_test):
        out = token_quality_metrics(predict_tags(model, encoded_test, tokenizer), list(encoded_test["labels"]),
                                    label_names)
    else:
        out = quality_metrics(predict(model, encoded_test, tokenizer), list(encoded_test["labels"]), label_names)
    out["params"] = count_parameters(model)
    out["size_mb"] = dir_size_mb(model_dir) if model_dir else out["params"] * 4 / 2**20
    if speed:
        out.update(compare_speed({"model": model}, {"model": (encoded_test, tokenizer)}, cfg)["model"])
    return out


# ------------------------------------------------------------------------------------- token classification

@torch.no_grad()
def predict_tags(model, encoded_split, tokenizer, batch_size: int = 64) -> list[list[int]]:
    """A token classifier's predicted tag id per sub-token of each example (unpadded), in row order."""
    model.eval()
    loader = make_loader(encoded_split, tokenizer, batch_size, seed=0, shuffle=False)
    preds: list[list[int]] = [[] for _ in range(len(encoded_split))]
    order = [i for batch in loader.batch_sampler for i in batch]
    flat = []
    for batch in loader:
        batch.pop("labels", None)
        lengths = batch["attention_mask"].sum(1).tolist()
        ids = model(**batch).logits.argmax(-1).tolist()
        flat += [row[:n] for row, n in zip(ids, lengths)]
    for i, p in zip(order, flat):
        preds[i] = p
    return preds


def token_quality_metrics(preds: list[list[int]], labels: list[list[int]], label_names: list[str]) -> dict:
    """Entity-level precision / recall / F1, micro and per type (seqeval, strict IOB2), and token accuracy, over
    the labeled sub-tokens (one per word with first-sub-token alignment). "accuracy" is the token accuracy, so
    that the run's summaries read one key for every task; "entity_f1" is this task's headline number."""
    pred_tags, true_tags = tag_sequences(preds, labels, label_names)
    m = entity_metrics(true_tags, pred_tags)
    return {"entity_f1": m["entity_f1"], "entity_precision": m["entity_precision"],
            "entity_recall": m["entity_recall"], "token_accuracy": m["token_accuracy"],
            "accuracy": m["token_accuracy"], "per_type": m["per_type"], "n_test": len(labels),
            "n_entities": sum(v["support"] for v in m["per_type"].values())}


# ------------------------------------------------------------------------------------------------ causal LM

def block_parameters(model) -> int:
    """Parameters inside the transformer blocks (the layer list), excluding embeddings, final norm and head."""
    return sum(p.numel() for p in find_layer_list(model)[1].parameters())


def evaluate_lm_model(model, test_blocks: LMBlocks, cfg: EvalConfig, byte_lengths: Tensor) -> dict:
    """Quality and size of one causal LM on the test blocks: perplexity, NLL per token, bits per byte (over the
    predicted tokens' bytes, `byte_lengths` per token id), predicted tokens and their bytes, params."""
    ppl = perplexity(model, test_blocks, batch_size=max(1, cfg.throughput_batch_size), byte_lengths=byte_lengths)
    return {"perplexity": ppl["perplexity"], "nll_per_token": ppl["loss"], "bits_per_byte": ppl["bits_per_byte"],
            "n_test_tokens": ppl["tokens"], "n_test_bytes": ppl["bytes"],
            "params": count_parameters(model), "block_params": block_parameters(model)}


def _generate(model, input_ids: Tensor, new_tokens: int, pad_id: int) -> Tensor:
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                          num_beams=1, top_k=None, top_p=None, temperature=None)


@torch.no_grad()
def compare_lm_speed(models: dict, blocks: LMBlocks | dict[str, LMBlocks], cfg: EvalConfig,
                     pad_id: int | dict[str, int]) -> dict[str, dict]:
    """Generation tokens/s (batch 1, greedy) and scoring tokens/s (a batch of blocks), models interleaved.
    blocks, pad_id: one for all models, or per model name where their tokenizers differ (each reads the same text
    pieces in its own tokens, `data.encode_blocks`; its tokens/s are then in its own tokens)."""
    blocks_of = blocks if isinstance(blocks, dict) else dict.fromkeys(models, blocks)
    pad_of = pad_id if isinstance(pad_id, dict) else dict.fromkeys(models, pad_id)
    with torch_threads(cfg.num_threads) as threads_before:
        return _compare_lm_speed(models, blocks_of, cfg, pad_of, cfg.num_threads or threads_before)


@torch.no_grad()
def _compare_lm_speed(models: dict, blocks_of: dict[str, LMBlocks], cfg: EvalConfig, pad_of: dict[str, int],
                      threads: int) -> dict:
    times = {name: {"gen": [], "score": [], "scored": []} for name in models}
    bs = cfg.throughput_batch_size
    n_batches = max(1, cfg.repeats // 4)
    for m in models.values():
        m.eval()
    for i in range(cfg.warmup + cfg.repeats):
        for name, m in models.items():
            blocks = blocks_of[name]
            prompt = blocks.input_ids[i % len(blocks), :min(SPEED_PROMPT_TOKENS, blocks.input_ids.shape[1])][None]
            start = time.perf_counter()
            _generate(m, prompt.to(next(m.parameters()).device), SPEED_NEW_TOKENS, pad_of[name])
            if i >= cfg.warmup:
                times[name]["gen"].append(time.perf_counter() - start)
    for j in range(n_batches + 1):
        for name, m in models.items():
            blocks = blocks_of[name]
            batch = blocks.batch([(j * bs + r) % len(blocks) for r in range(bs)])
            device = next(m.parameters()).device
            start = time.perf_counter()
            m(**{k: v.to(device) for k, v in batch.items()})
            if j >= 1:  # the first batch warms up
                times[name]["score"].append(time.perf_counter() - start)
                times[name]["scored"].append(int(batch["attention_mask"].sum()))
    out = {}
    for name, t in times.items():
        gen = statistics.median(t["gen"])
        out[name] = {
            "generate_tokens_per_s": SPEED_NEW_TOKENS / gen,
            "ms_per_token_batch1": 1000 * gen / SPEED_NEW_TOKENS,
            "score_tokens_per_s": statistics.median(t["scored"]) / statistics.median(t["score"]),
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
    pad = pad_id_of(tokenizer)
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


# ----------------------------------------------------------------------------------- sentence embeddings

AGREEMENT_MAX_PAIRS = 20_000
"""Pairs of held-out texts whose cosine similarities `spearman_agreement` compares: all pairs up to this many, else
this many drawn with a fixed seed."""
RECALL_K = 10
KNN_K = 5


@torch.no_grad()
def embed(model, encoded_split, tokenizer, pooling: Pooling, batch_size: int = 64) -> np.ndarray:
    """(N, D) float32 pooled embeddings of a tokenized split, in row order."""
    model.eval()
    loader = make_loader(encoded_split, tokenizer, batch_size, seed=0, shuffle=False)
    order = [i for batch in loader.batch_sampler for i in batch]
    parts = []
    for batch in loader:
        batch.pop("labels", None)
        parts.append(capture(model, batch, hidden_states=False, pooling=pooling).pooled.float().cpu())
    flat = torch.cat(parts).numpy()
    out = np.empty_like(flat)
    out[order] = flat
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def sample_pairs(n: int, max_pairs: int = AGREEMENT_MAX_PAIRS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index arrays of distinct pairs i < j of n items: all of them, or `max_pairs` drawn with `seed`."""
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(i), size=max_pairs, replace=False))
        i, j = i[keep], j[keep]
    return i, j


def spearman_agreement(student: np.ndarray, teacher: np.ndarray, max_pairs: int = AGREEMENT_MAX_PAIRS) -> float:
    """Spearman's ρ between the student's and the teacher's cosine similarities of the same pairs of texts.
    student: (N, Ds)  teacher: (N, Dt) embeddings of the same N texts (widths may differ)."""
    if len(student) != len(teacher) or len(student) < 3:
        raise ValueError(f"spearman_agreement: needs the same N >= 3 texts, got {len(student)} and {len(teacher)}")
    i, j = sample_pairs(len(student), max_pairs)
    s, t = _unit(student), _unit(teacher)
    rho = spearmanr((s[i] * s[j]).sum(1), (t[i] * t[j]).sum(1)).statistic
    return float(rho)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each row's k most cosine-similar other rows, nearest first."""
    sims = _unit(x) @ _unit(x).T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def neighbour_recall(student: np.ndarray, teacher: np.ndarray, k: int = RECALL_K) -> float:
    """recall@k: the mean share of each text's k nearest neighbours by the teacher (among the other texts) that
    are among its k nearest by the student. k is capped at N − 1."""
    k = min(k, len(teacher) - 1)
    if k < 1:
        raise ValueError("neighbour_recall: needs at least 2 texts")
    s, t = _neighbours(student, k), _neighbours(teacher, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(s, t)]))


def knn_accuracy(index: np.ndarray, index_labels, queries: np.ndarray, query_labels, k: int = KNN_K) -> float:
    """Accuracy of k-nearest-neighbour classification by cosine similarity: each query takes the majority label
    of its k most similar index rows (a tie goes to the label of the nearest tied neighbour)."""
    index_labels, query_labels = np.asarray(index_labels), np.asarray(query_labels)
    k = min(k, len(index))
    top = np.argsort(-(_unit(queries) @ _unit(index).T), axis=1, kind="stable")[:, :k]
    correct = 0
    for row, y in zip(top, query_labels):
        votes = index_labels[row]
        values, counts = np.unique(votes, return_counts=True)
        tied = set(values[counts == counts.max()])
        pred = next(v for v in votes if v in tied)
        correct += int(pred == y)
    return correct / max(len(query_labels), 1)


def embedding_metrics(held_out: np.ndarray, teacher_held_out: np.ndarray | None, *, knn: tuple | None = None
                      ) -> dict:
    """One sentence encoder's quality numbers: agreement with the teacher's embeddings of the same held-out texts
    where given (Spearman ρ of pairwise cosines, recall@10 of the teacher's neighbours) and, with `knn` = (index
    embeddings, index labels, query embeddings, query labels), k-NN accuracy."""
    out = {"n_held_out": len(held_out), "dim": int(held_out.shape[1])}
    if teacher_held_out is not None:
        out["spearman_agreement"] = spearman_agreement(held_out, teacher_held_out)
        out[f"recall_at_{RECALL_K}"] = neighbour_recall(held_out, teacher_held_out)
    if knn is not None:
        out["knn_accuracy"] = knn_accuracy(*knn)
        out["knn_k"] = KNN_K
    return out
