"""A classifier teacher's logits over a tokenized training split, stored for the next run over the same rows
(safetensors, keyed by the teacher's weights, the token ids and the autocast dtype).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from kdistill.assets import cache_root
from kdistill.cache.keys import fingerprint_model, key_digest
from kdistill.io import atomic_file

log = logging.getLogger(__name__)


LOGITS_FORMAT = 1


def logits_cache_root() -> Path:
    """`$KDISTILL_CACHE_DIR/teacher-logits`, else `~/.cache/kdistill/teacher-logits` (shared by runs and seeds)."""
    return cache_root() / "teacher-logits"


def logits_key(teacher: torch.nn.Module, encoded, *, autocast: str) -> dict:
    """Everything a classifier teacher's logits over the rows of `encoded` (a tokenized split: input_ids, and
    token_type_ids where the tokenizer gives them) depend on: its weights, the token ids in row order (so text,
    transfer rows, tokenizer and max_length all count) and the autocast dtype it runs under."""
    h = hashlib.sha256()
    for column in ("input_ids", "token_type_ids"):
        if column in encoded.column_names:
            h.update(column.encode())
            for ids in encoded[column]:
                h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return {"format": LOGITS_FORMAT, "teacher": fingerprint_model(teacher), "data": h.hexdigest()[:32],
            "rows": len(encoded), "autocast": autocast}


def _logits_file(root: str | Path, key: dict) -> Path:
    return Path(root) / f"logits-n{key['rows']}-{key_digest(key)}.safetensors"


def read_teacher_logits(root: str | Path, key: dict) -> Tensor | None:
    """The logits stored under `key`, or None (not there, or stored under another key: a hash collision, or a file
    left by another version)."""
    path = _logits_file(root, key)
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if f.metadata().get("key") != json.dumps(key, sort_keys=True):
                return None
            return f.get_tensor("logits")
    except (OSError, SafetensorError) as e:
        log.warning("teacher logits: %s unreadable (%s); computing them again", path, e)
        return None


def write_teacher_logits(root: str | Path, key: dict, logits: Tensor) -> None:
    """Store `logits` under `key`, atomically; a failure to write (full disk, read-only cache) is logged, not
    fatal: the run has them in memory."""
    path = _logits_file(root, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(save(({"logits": logits.contiguous()}), metadata={"key": json.dumps(key, sort_keys=True)}))
    except OSError as e:
        log.warning("teacher logits: not stored in %s (%s); the next run computes them again", root,
                    e.strerror or e)
