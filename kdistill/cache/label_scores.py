"""A prompted LLM's label scores (classification with teacher.llm), stored once: the teacher signal of an LLM
teacher.

For every text, the LLM's log-probability of each label's answer as the assistant's reply, teacher-forced:
log P(answer | prompt) = Σ_j log p(a_j | prompt, a_<j), the answer's tokens a after the chat template's generation
prompt (`answer_logprobs`). Normalised over the labels (log-softmax) they are the teacher's soft labels.

Scoring is the slow part (a causal LM per text, against a student a thousand times smaller), and the scores do not
change between runs, seeds or students: they are kept under `$KDISTILL_CACHE_DIR/llm-label-scores/<key digest>/` as
Parquet shards of `SHARD_TEXTS` texts (columns `row` int64, `scores` list<float32> (one per label), `cpu_s` and
`wall_s` float64: each row's share of its batch's CPU and wall seconds, so that a run reading them back still knows
what they cost), each written atomically with its key as soon as its texts are scored (the shard format of
cache/responses.py). A killed pass resumes at the first missing shard. An LLM behind an endpoint
(teacher_endpoint.endpoint_label_scores) keeps its scores in the same layout, keyed by the server's URL and model
name, row by row as they arrive (cache/responses.RowStore), with `wall_s` and no `cpu_s` (the server's CPU is not
seen).

The key holds everything the scores depend on: the LLM's weights (a fingerprint), the rendered prompts' token ids
(the template, the prompt, the shots and the texts) and each label's answer tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import torch
from torch import Tensor

from kdistill.assets import cache_root
from kdistill.cache.keys import fingerprint_model, key_digest
from kdistill.cache.responses import read_shard, write_shard
from kdistill.io import atomic_write_json, check_writable

log = logging.getLogger(__name__)

SCORES_FORMAT = 1
SHARD_TEXTS = 64
"""Texts per shard: the unit of resume."""


def label_scores_root() -> Path:
    """`$KDISTILL_CACHE_DIR/llm-label-scores`, else `~/.cache/kdistill/llm-label-scores`."""
    return cache_root() / "llm-label-scores"


def label_scores_key(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> dict:
    """Everything the scores of `answers` after `prompts` depend on; equal keys, equal scores."""
    return {"format": SCORES_FORMAT, "teacher": fingerprint_model(model), **_scored(prompts, answers)}


def endpoint_scores_key(url: str, model: str, prompts: Sequence[Sequence[int]],
                        answers: Sequence[Sequence[int]]) -> dict:
    """The key of an endpoint's scores: the server (its URL and the model's name: the weights behind the name are
    not seen) in place of the weights' fingerprint."""
    return {"format": SCORES_FORMAT, "endpoint": url, "model": model, **_scored(prompts, answers)}


def _scored(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> dict:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(list(map(int, p))).encode() + b"\n")
    return {"prompts": h.hexdigest()[:32], "num_prompts": len(prompts), "answers": [list(map(int, a)) for a in answers]}


@torch.no_grad()
def answer_logprobs(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *,
                    pad_id: int) -> Tensor:
    """(B, C) float32: log P(answer c | prompt b) = Σ_j log p(a_j | prompt, a_<j), token ids in and out.

    Answers that share all but their last token (every one-token answer shares the empty prefix) are scored by one
    forward over prompt + that prefix: its last len(prefix) + 1 positions predict a_0 ... a_last. Rows are
    left-padded, positions counted from each row's first real token, so a row scores as it would alone."""
    model.eval()
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    for c, answer in enumerate(answers):
        if not answer:
            raise ValueError(f"answer {c} has no tokens")
        groups.setdefault(tuple(answer[:-1]), []).append(c)
    out = torch.empty(len(prompts), len(answers))
    for prefix, labels in groups.items():
        rows = [list(p) + list(prefix) for p in prompts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = len(prefix) + 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep).logits[:, -keep:]  # (B, keep, V): position j predicts a_j
        logp = logits.float().log_softmax(-1).cpu()
        for c in labels:
            answer = torch.tensor(answers[c])
            out[:, c] = logp[:, torch.arange(keep), answer].sum(-1)
    return out


def llm_label_scores(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *, pad_id: int,
                     batch_size: int = 8, root: str | Path | None = None) -> tuple[Tensor, dict]:
    """(N, C) float32: every prompt's `answer_logprobs`, read from the store where it holds them and scored (and
    stored, shard by shard) where it does not; and info: the store's path, the texts scored now ("calls") and read
    back ("reused"), the forward passes per text, and the CPU and wall seconds per 1,000 texts of the scoring pass
    (as recorded when each row was scored)."""
    key = label_scores_key(model, prompts, answers)
    path = Path(root or label_scores_root()) / f"scores-{key_digest(key)}"
    check_writable(path, inside=True)
    path.mkdir(parents=True, exist_ok=True)
    scores: list[list[float]] = []
    cpu: list[float] = []
    wall: list[float] = []
    calls = 0
    for s, first in enumerate(range(0, len(prompts), SHARD_TEXTS)):
        rows = range(first, min(len(prompts), first + SHARD_TEXTS))
        file = path / f"shard-{s:05d}.parquet"
        table = read_shard(file, key, rows)
        if table is None or len(table) != len(rows):  # (a shard is written whole)
            # longest first, so that a batch's rows pad to similar lengths
            order = sorted(rows, key=lambda i: -len(prompts[i]))
            got: dict[int, tuple[list[float], float, float]] = {}
            for b in range(0, len(order), batch_size):
                batch = order[b: b + batch_size]
                cpu0, wall0 = time.process_time(), time.perf_counter()
                values = answer_logprobs(model, [prompts[i] for i in batch], answers, pad_id=pad_id)
                cpu_share = (time.process_time() - cpu0) / len(batch)
                wall_share = (time.perf_counter() - wall0) / len(batch)
                got.update({i: (v, cpu_share, wall_share) for i, v in zip(batch, values.tolist())})
            write_shard(file, key, rows, {"row": pa.array(list(rows), pa.int64()),
                                          "scores": pa.array([got[i][0] for i in rows], pa.list_(pa.float32())),
                                          "cpu_s": pa.array([got[i][1] for i in rows], pa.float64()),
                                          "wall_s": pa.array([got[i][2] for i in rows], pa.float64())})
            calls += len(rows)
            log.info("LLM label scores: texts %d-%d of %d scored", rows.start, rows.stop, len(prompts))
            table = read_shard(file, key, rows)  # as float32, as a later run reads them: both runs learn the same
        scores += table.column("scores").to_pylist()
        cpu += table.column("cpu_s").to_pylist()
        wall += table.column("wall_s").to_pylist()
    atomic_write_json(path / "manifest.json", {"key": key, "shards": -(-len(prompts) // SHARD_TEXTS)})
    n = max(len(prompts), 1)
    info = {"path": str(path), "texts": len(prompts), "calls": calls, "reused": len(prompts) - calls,
            "forwards_per_text": len({tuple(a[:-1]) for a in answers}),
            "cpu_s_per_1000_texts": 1000 * sum(cpu) / n, "wall_s_per_1000_texts": 1000 * sum(wall) / n}
    log.info("LLM label scores %s: %d texts, %s", path, len(prompts),
             "all read from the store" if calls == 0 else f"{calls} scored now")
    return torch.tensor(scores, dtype=torch.float32).reshape(len(prompts), len(answers)), info
