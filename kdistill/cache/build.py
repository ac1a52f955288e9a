"""Building the causal-LM teacher signal: the teacher run over the packed blocks (`build_topk_cache`) and its top-k
written shard by shard (`write_teacher_signal`).

Building (`write_teacher_signal`, `build_topk_cache`): shard by shard, each shard written to a temp file beside its
final name, fsynced and renamed, so a shard file is complete or absent. A directory with shards but no manifest is
an unfinished build of its key: a rerun keeps every shard whose metadata names this key and range, computes only the
others, and gives the same rows as an uninterrupted build (the batches inside a shard do not depend on what ran
before). Several processes (torchrun / accelerate, `training.process_state()`) build one signal together: process r
computes the shards s with s % world_size == r; after a barrier the main process removes leftovers of killed builds
(temp files, shard files outside the layout) and writes the manifest; after a second barrier all open it. Two builds
of one key running at the same time in the same directory are not supported (the leftover cleanup may remove the
other's temp file, which then fails and is resumed by its rerun).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from kdistill.cache.keys import (
    MANIFEST,
    SHARD_BLOCKS,
    SHARD_METADATA,
    key_dir,
    shard_metadata,
    shard_name,
    shard_ranges,
    topk_key,
    vocab_size,
)
from kdistill.cache.teacher_signal import TopKCache, open_teacher_signal
from kdistill.errors import UserError
from kdistill.io import atomic_file, atomic_write_json, check_writable, output_errors
from kdistill.training import process_state

log = logging.getLogger(__name__)


def _sha256(file: Path) -> str:
    """The hex sha256 of a shard file's bytes (the manifest's checksum, checked on the shard's first read)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make the renames into `path` durable (where the platform allows fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _shard_is_complete(file: Path, key: dict, start: int, stop: int) -> bool:
    """Whether `file` is a finished shard of `key` holding blocks [start, stop) (reads its footer only)."""
    try:
        metadata = pq.read_schema(file).metadata or {}
        return json.loads(metadata.get(SHARD_METADATA, b"null")) == shard_metadata(key, start, stop)
    except (OSError, ValueError):  # absent, or not Parquet (pyarrow's errors are OSError / ValueError subclasses)
        return False


def _write_shard(file: Path, key: dict, start: int, stop: int, fill: Callable[[int, int], tuple[Tensor, Tensor]],
                 batch_size: int, progress: Callable[[int], None] | None, ends: Tensor | None) -> None:
    length, k = key["block_size"], key["k"]
    logprobs = np.empty((stop - start, length, k), dtype=np.float16)
    ids = np.empty((stop - start, length, k), dtype=np.int32)
    for a in range(start, stop, batch_size):  # batches restart at each shard: a resumed shard sees the same ones
        b = min(stop, a + batch_size)
        values, top = fill(a, b)
        if tuple(values.shape) != (b - a, length, k) or tuple(top.shape) != tuple(values.shape):
            raise ValueError(f"write_teacher_signal: fill({a}, {b}) returned {tuple(values.shape)} / "
                             f"{tuple(top.shape)}, expected {(b - a, length, k)}")
        logprobs[a - start: b - start] = values.detach().float().cpu().numpy()
        ids[a - start: b - start] = top.detach().cpu().numpy()
        if progress:
            progress(b - a)
    columns = {"block": pa.array(np.arange(start, stop), pa.int64()),
               "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), length * k),
               "logprobs": pa.FixedSizeListArray.from_arrays(pa.array(logprobs.reshape(-1)), length * k)}
    if ends is not None:
        flat = ends[start:stop].to(torch.int32).cpu().numpy().reshape(-1)
        columns["ends"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), length)
    table = pa.table(columns)
    table = table.replace_schema_metadata({SHARD_METADATA: json.dumps(shard_metadata(key, start, stop)).encode()})
    with output_errors(file), atomic_file(file) as f:  # disk full, read-only: one line naming the shard
        pq.write_table(table, f, compression="zstd")


_LEFTOVER = re.compile(r"(shard-\d+\.parquet|\.shard-\d+\.parquet\.[0-9a-f]+\.tmp|\.manifest\.json\.[0-9a-f]+\.tmp)")


def check_signal_dir(path: str | Path) -> None:
    """Refuse (UserError) a dir to write a signal into that holds anything else than a signal's files: a build
    there removes stray shard files and rewrites shards, so it must not be a user's other dir."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a dir for a teacher signal")
    other = sorted(f.name for f in path.iterdir() if f.name != MANIFEST and not _LEFTOVER.fullmatch(f.name)) \
        if path.is_dir() else []
    if other:
        raise UserError(f"{path} holds other files than a teacher signal's ({', '.join(other[:3])}); choose a new "
                        "or empty dir")


def signal_bytes(key: dict, n: int) -> int:
    """About what the signal of `key` over `n` blocks takes on disk, uncompressed: per position its top-k ids
    (int32) and log-probs (float16), 6 bytes an entry, and its byte end (int32) when the key has ends."""
    positions = n * key["block_size"]
    return positions * key["k"] * (4 + 2) + (positions * 4 if key.get("ends") else 0)


def check_signal_space(path: Path, key: dict, n: int) -> None:
    """Refuse (UserError) before the teacher runs a signal dir that cannot be written, or whose file system lacks
    the space the signal takes less what an unfinished build left there."""
    there = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0
    check_writable(path, max(0, signal_bytes(key, n) - there), inside=True)


def _write_manifest(path: Path, manifest: dict) -> None:
    with output_errors(path / MANIFEST):
        atomic_write_json(path / MANIFEST, manifest)


def _remove_leftovers(path: Path, keep: set[str]) -> None:
    """Temp files of killed builds and shard files outside this layout (an earlier shard_blocks); nothing else."""
    for f in path.iterdir():
        if f.name not in keep and _LEFTOVER.fullmatch(f.name):
            f.unlink(missing_ok=True)


def write_teacher_signal(path: str | Path, key: dict, shape: tuple[int, int],
                         fill: Callable[[int, int], tuple[Tensor, Tensor]], *, shard_blocks: int = SHARD_BLOCKS,
                         batch_size: int = 8, progress: Callable[[int], None] | None = None,
                         ends: Tensor | None = None, vocab: int | None = None) -> TopKCache:
    """The signal of `key` in the local directory `path`: opened if complete, else its missing shards are computed
    and written, then its manifest, and it is opened.

    shape: (N blocks, L). fill(start, stop) returns (log-probs (stop−start, L, K), indices (stop−start, L, K)) for
    those blocks; it is called in batches of `batch_size` blocks inside each shard. ends: (N, L) the teacher tokens'
    byte ends, stored beside them; given exactly when the key has "ends". vocab: the teacher's vocabulary size,
    declared in the manifest (every id lies in [0, vocab)). A dir holding the complete signal of
    another key is refused (UserError), not overwritten. Every process of the run must
    call this (it waits for the others twice); each computes its share of the shards (module docstring).
    """
    n, length = shape
    if length != key["block_size"]:
        raise ValueError(f"write_teacher_signal: blocks of {length} tokens, key says block_size {key['block_size']}")
    if (ends is not None) != bool(key.get("ends")) or (ends is not None and tuple(ends.shape) != tuple(shape)):
        raise ValueError(f"write_teacher_signal: key {key} with byte ends of shape "
                         f"{None if ends is None else tuple(ends.shape)} for blocks {tuple(shape)}")
    path = Path(path)
    state = process_state()
    existing = open_teacher_signal(path, key)
    if existing is None and (other := open_teacher_signal(path)) is not None:  # its shards would be overwritten
        raise UserError(f"teacher signal {path}: holds the complete signal of another teacher, data or k "
                        f"({other.key}); choose a new dir")
    if existing is not None and len(existing) != n:
        raise ValueError(f"teacher signal {path}: holds {len(existing)} blocks of key {key}, asked for {n}")
    ranges = shard_ranges(n, shard_blocks)
    if existing is None:
        check_signal_space(path, key, n)
        path.mkdir(parents=True, exist_ok=True)
        for s in range(state.process_index, len(ranges), state.num_processes):
            if not _shard_is_complete(path / shard_name(s), key, *ranges[s]):
                _write_shard(path / shard_name(s), key, *ranges[s], fill, batch_size, progress, ends)
        _fsync_dir(path)
    state.wait_for_everyone()  # every shard is written
    if existing is None and state.is_main_process:
        _remove_leftovers(path, {shard_name(s) for s in range(len(ranges))})
        shards = [{"file": shard_name(s), "first_block": a, "num_blocks": b - a, "rows": b - a}
                  for s, (a, b) in enumerate(ranges)]
        _write_manifest(path, {
            "key": key, "num_blocks": n, "shard_blocks": shard_blocks, "shards": shards,
            "sha256": {s["file"]: _sha256(path / s["file"]) for s in shards},
            **({"vocab_size": int(vocab)} if vocab is not None else {}),
            "stores": "teacher log-softmax at T=1, top-k per position, most likely first; per row (block): ids "
                      "int32 and logprobs float16, each L*K values, (L, K) row-major"
                      + ("; ends int32, L values: the UTF-8 byte where each token ends in the block's text when it "
                         "is an alignment boundary, else -1" if ends is not None else "")})
        _fsync_dir(path)
    state.wait_for_everyone()  # the manifest is written
    signal = open_teacher_signal(path, key)
    if signal is None:
        raise RuntimeError(f"teacher signal {path} was written but cannot be read back")
    signal.reused = existing is not None
    return signal


@torch.no_grad()
def teacher_topk(teacher, input_ids: Tensor, attention_mask: Tensor, k: int,
                 autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The teacher's top-k next-token log-probabilities (B, L, K) and ids for a batch of blocks."""
    device = next(teacher.parameters()).device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        logits = teacher(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    k = min(k, logits.shape[-1])
    return torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)


def build_topk_cache(teacher, input_ids: Tensor, attention_mask: Tensor, *, k: int, root: str | Path,
                     teacher_id: str | None = None, batch_size: int = 8,
                     autocast_dtype: torch.dtype | None = None, progress: Callable[[int], None] | None = None,
                     shard_blocks: int = SHARD_BLOCKS, ends: Tensor | None = None,
                     path: str | Path | None = None) -> TopKCache:
    """Open the teacher signal of (teacher, blocks, k) in `path` (default: `key_dir(root, key)`) or, when missing,
    stale or unfinished, run the teacher on the shards it lacks and write them.

    input_ids, attention_mask: (N, L) packed blocks, in the row order `lookup` will be called with.
    k, teacher_id, ends: as `topk_key`. Every process of the run calls it and computes its share of the shards.
    """
    key = topk_key(teacher, input_ids, attention_mask, k=k, teacher_id=teacher_id, ends=ends)
    was_training = teacher.training
    teacher.eval()
    try:
        signal = write_teacher_signal(
            path if path is not None else key_dir(root, key), key, tuple(input_ids.shape),
            lambda a, b: teacher_topk(teacher, input_ids[a:b], attention_mask[a:b], key["k"], autocast_dtype),
            shard_blocks=shard_blocks, batch_size=batch_size, progress=progress, ends=ends,
            vocab=vocab_size(teacher))
    finally:
        teacher.train(was_training)
    log.info("teacher signal: %s %s (%d blocks x %d tokens, k=%d, %d shards)",
             "reusing" if signal.reused else "wrote", signal.path, len(signal), input_ids.shape[1], signal.k,
             len(signal.shards))
    return signal
