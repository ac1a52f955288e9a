"""Teacher outputs stored for reuse: a frozen teacher gives the same outputs every epoch, so it runs once and they are
read back.

Four stores:
  - the causal-LM *teacher signal*, the teacher's top-k next-token log-probabilities (a Parquet dataset kept across
    runs, which another run or tool can read): `keys` (what a signal is known by), `teacher_signal` (the format,
    and reading it: `open_teacher_signal`, `TopKCache`), `build` (running the teacher and writing it:
    `build_topk_cache`, `write_teacher_signal`);
  - a classifier teacher's logits over a training split, kept across runs (`logits`);
  - a prompted LLM's label scores (classification with teacher.llm), kept across runs (`label_scores`);
  - a classifier teacher's hidden states (`feature_store.FeatureStore`, fp16 memory-mapped, built for one run by
    distill/explicit.py).
"""

from kdistill.cache.build import build_topk_cache, check_signal_dir, teacher_topk, write_teacher_signal
from kdistill.cache.feature_store import FeatureStore
from kdistill.cache.keys import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_BLOCKS,
    SHARD_METADATA,
    cache_key,
    default_cache_root,
    fingerprint_model,
    fingerprint_tokens,
    key_digest,
    key_dir,
    shard_name,
    shard_ranges,
    topk_key,
    vocab_size,
)
from kdistill.cache.logits import (
    LOGITS_FORMAT,
    logits_cache_root,
    logits_key,
    read_teacher_logits,
    write_teacher_logits,
)
from kdistill.cache.teacher_signal import SignalError, TopKCache, open_teacher_signal

__all__ = [
    "FORMAT_VERSION",
    "LOGITS_FORMAT",
    "MANIFEST",
    "SHARD_BLOCKS",
    "SHARD_METADATA",
    "SignalError",
    "FeatureStore",
    "TopKCache",
    "build_topk_cache",
    "cache_key",
    "check_signal_dir",
    "default_cache_root",
    "fingerprint_model",
    "fingerprint_tokens",
    "key_digest",
    "key_dir",
    "logits_cache_root",
    "logits_key",
    "open_teacher_signal",
    "read_teacher_logits",
    "shard_name",
    "shard_ranges",
    "teacher_topk",
    "topk_key",
    "vocab_size",
    "write_teacher_logits",
    "write_teacher_signal",
]
