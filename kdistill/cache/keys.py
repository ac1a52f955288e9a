"""What a stored teacher signal is known by: its key (the format version, a fingerprint of the teacher's weights,
a hash of the data, the block size and K), the key's directory in the automatic cache, and the shard layout.

Key and staleness: a signal is keyed by the format version, the teacher (a fingerprint of its weights), the data (a
hash of the packed token ids, so text, tokenizer, split, limit and packing all count, and of the byte ends where
stored), the block size and K. The run's
automatic cache lives under `default_cache_root()` in a directory named by the key's hash (`key_dir`);
`open_teacher_signal` re-checks the stored key and returns None for any other key, so a stale signal is never used.
A signal built elsewhere (another machine, a bucket) is opened from its path or fsspec URL the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.assets import cache_root


FORMAT_VERSION = 2
SHARD_BLOCKS = 256
"""Blocks per shard: the unit of resume, of the split between processes and of a lookup's read."""
MANIFEST = "manifest.json"
SHARD_METADATA = b"kdistill.teacher_signal"


def default_cache_root() -> Path:
    """`$KDISTILL_CACHE_DIR/teacher-topk`, else `~/.cache/kdistill/teacher-topk` (shared by runs and seeds)."""
    return cache_root() / "teacher-topk"


def fingerprint_model(model: torch.nn.Module) -> str:
    """A short hash of a model's weights: names, shapes, dtypes, and per tensor its sum and a strided sample.

    Any fine-tuning step or different checkpoint changes it; computing it touches every tensor once (cheap next
    to one forward pass), so it does not depend on where the weights were loaded from.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if flat.numel():
                sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
                h.update(sample.tobytes())
                h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()[:32]


def fingerprint_tokens(input_ids: Tensor, attention_mask: Tensor | None = None, ends: Tensor | None = None) -> str:
    """Hash of token blocks (N, L) (and their mask, and byte ends): the data as the teacher sees it."""
    h = hashlib.sha256()
    h.update(str(tuple(input_ids.shape)).encode())
    h.update(input_ids.to(torch.int64).cpu().numpy().tobytes())
    if attention_mask is not None:
        h.update(attention_mask.to(torch.int8).cpu().numpy().tobytes())
    if ends is not None:
        h.update(ends.to(torch.int32).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def cache_key(*, teacher: str, data: str, block_size: int, k: int, ends: bool = False) -> dict:
    """Everything a signal's contents depend on. Two signals with equal keys hold the same numbers. `ends`: it
    stores the teacher tokens' byte ends (a signal for a student with another tokenizer)."""
    key = {"format": FORMAT_VERSION, "teacher": teacher, "data": data, "block_size": int(block_size), "k": int(k)}
    return {**key, "ends": True} if ends else key


def topk_key(teacher, input_ids: Tensor, attention_mask: Tensor, *, k: int, teacher_id: str | None = None,
             ends: Tensor | None = None) -> dict:
    """The key of the teacher's top-k signal over the (N, L) blocks, K capped at the vocabulary size.
    teacher_id: a fingerprint of the teacher (default: `fingerprint_model(teacher)`). ends: (N, L) the tokens' byte
    ends, for a signal that stores them (a student with another tokenizer)."""
    return cache_key(teacher=teacher_id or fingerprint_model(teacher),
                     data=fingerprint_tokens(input_ids, attention_mask, ends), block_size=input_ids.shape[1],
                     k=min(int(k), vocab_size(teacher)), ends=ends is not None)


def vocab_size(teacher) -> int:
    """The number of next tokens a causal LM scores (rows of its output embedding): a signal's ids lie in
    [0, vocab_size)."""
    head = teacher.get_output_embeddings()
    return int(head.weight.shape[0] if head is not None else teacher.config.vocab_size)


def key_digest(key: dict) -> str:
    """A short hash of a cache key: what names its entry in an automatic cache."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def key_dir(root: str | Path, key: dict) -> Path:
    """The automatic cache's directory of `key` under `root`."""
    return Path(root) / f"topk-k{key['k']}-L{key['block_size']}-{key_digest(key)}"


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.parquet"


def shard_ranges(num_blocks: int, shard_blocks: int) -> list[tuple[int, int]]:
    """[start, stop) of every shard: `shard_blocks` each, the last one shorter."""
    return [(a, min(num_blocks, a + shard_blocks)) for a in range(0, num_blocks, shard_blocks)]


def shard_metadata(key: dict, start: int, stop: int) -> dict:
    return {"key": key, "first_block": start, "num_blocks": stop - start}
