"""The causal-LM teacher signal on disk, opened for reading (`open_teacher_signal`, `TopKCache`).

Causal LMs: the frozen teacher's top-k next-token log-probabilities. A big teacher is the slowest part of LM
distillation on a CPU, so it runs once per dataset: for every position of every packed training block (N blocks of
L tokens) the signal holds the teacher's K most likely next tokens, most likely first, and their log-probabilities at
T = 1, log p_T(v) = z_v − logsumexp(z) (the full-vocabulary log-softmax).

The teacher-signal format (FORMAT_VERSION 2) is a directory of Parquet shards and a manifest:

    shard-00000.parquet, ...  shard s holds blocks [s·shard_blocks, (s+1)·shard_blocks) (the last one shorter), one
                              row per block in block order, zstd-compressed:
                                block     int64                           the global block index
                                ids       fixed_size_list<int32>[L·K]     vocabulary ids, (L, K) row-major
                                logprobs  fixed_size_list<float16>[L·K]   their log-probabilities, same layout
                                ends      fixed_size_list<int32>[L]       only when the key has "ends": the UTF-8
                                          byte where each teacher token ends in its block's text when it is an
                                          alignment boundary, else -1 (`tokenalign.byte_ends`): what a student
                                          with another tokenizer aligns its own tokens to (cross-tokenizer KD)
                              Its schema metadata `kdistill.teacher_signal` repeats the key, first block and block
                              count, so a shard says what it is without the manifest.
    manifest.json             the key, num_blocks, shard_blocks and the shard list (file, first_block, num_blocks,
                              rows); written last, so its presence means every shard is complete.

Parquet keeps float16 as float16 (logical type Float16, pyarrow >= 15), so a block costs L·K·6 bytes before
compression. Any Parquet reader opens a shard (`pyarrow.parquet.read_table(shard)`;
`datasets.Dataset.from_parquet(dir + "/shard-*.parquet")`, whose features are `List(Value("float16"), length=L·K)`);
reading the directory itself with a Parquet reader needs the shard files named, since manifest.json sits beside them.

Reading (`TopKCache`): a shard is read and decoded the first time a lookup needs one of its blocks, then kept (see
`TopKCache` for the memory this costs).

How the loss uses it (renormalisation over the stored support). The signal keeps K of the V entries, so the
divergences are taken between the two distributions *conditioned on the support* S (the token's K ids):

    q_T(v) = softmax(log p_T(S) / T)(v),   q_S(v) = softmax(z_S(S) / T)(v),   v ∈ S

i.e. the student's logits are gathered at S and both sides are log-softmaxed over those K entries (dividing a
log-probability by T and renormalising equals softening the logits by T and restricting to S). Any token-level
divergence of `kdistill.losses` then applies unchanged to the (B, L, K) tensors; for the forward KL this is
`losses.topk_forward_kl_tokens`. With K = V it is exactly the full-vocabulary loss. The mass outside S gets no
KD signal; the `lm` term (the data's next token) covers it, which is why LM recipes keep a little of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from kdistill.cache.keys import FORMAT_VERSION, MANIFEST, SHARD_METADATA, shard_metadata, shard_ranges

log = logging.getLogger(__name__)


@dataclass
class TopKCache:
    """A teacher signal opened for reading. `lookup(rows)` returns tensors for those packed blocks.

    Memory: a shard is read and decoded the first time a lookup needs one of its blocks and kept in `loaded`, so
    after one epoch the whole signal is in this process's memory, decoded: N·L·K·6 bytes (float16 log-probs and
    int32 ids), e.g. 400 MB for 1,000 blocks of 1,024 tokens at K = 64, in every process of a multi-process run
    (each one's batches touch every shard over an epoch). The files on disk are smaller (zstd).
    """

    path: str
    """Where the signal is: a local directory or an fsspec URL, as given."""
    key: dict
    shards: list[dict]
    """The manifest's shard list: file, first_block, num_blocks, rows."""
    shard_blocks: int
    fs: fsspec.AbstractFileSystem = field(repr=False)
    root: str = field(repr=False)
    """The directory within `fs`."""
    reused: bool = False
    """True when `write_teacher_signal` found it already written (the teacher did not run)."""
    loaded: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict, repr=False)
    """Decoded shards: s -> (log-probs (n, L, K) float16, ids (n, L, K) int32[, byte ends (n, L) int32])."""

    def __len__(self) -> int:
        return sum(s["num_blocks"] for s in self.shards)

    @property
    def k(self) -> int:
        return self.key["k"]

    @property
    def has_ends(self) -> bool:
        """Whether it stores the teacher tokens' byte ends (built for a student with another tokenizer)."""
        return bool(self.key.get("ends"))

    def lookup(self, rows: Tensor | list[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(log-probs float32 (B, L, K), indices int64 (B, L, K)) of the given block rows."""
        values, ids = self._gather(rows, (0, 1), (np.float32, np.int64))
        return torch.from_numpy(values).to(device), torch.from_numpy(ids).to(device)

    def ends(self, rows: Tensor | list[int], device: torch.device | str = "cpu") -> Tensor:
        """The teacher tokens' byte ends (B, L) int64 (-1: not a boundary) of the given block rows."""
        if not self.has_ends:
            raise ValueError(f"teacher signal {self.path} stores no byte ends: it was built for a student with the "
                             "teacher's tokenizer")
        (ends,) = self._gather(rows, (2,), (np.int64,))
        return torch.from_numpy(ends).to(device)

    def _gather(self, rows: Tensor | list[int], columns: tuple[int, ...], dtypes: tuple) -> list[np.ndarray]:
        idx = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64)
        outside = idx[(idx < 0) | (idx >= len(self))]
        if outside.size:  # (a negative row would otherwise count from the end)
            raise IndexError(f"teacher signal {self.path}: block {int(outside[0])} outside 0..{len(self) - 1}")
        out = [None] * len(columns)
        shard_of = idx // self.shard_blocks
        for s in np.unique(shard_of):
            at = shard_of == s
            stored = self._shard(int(s))
            local = idx[at] - int(s) * self.shard_blocks
            for j, (c, dtype) in enumerate(zip(columns, dtypes)):
                if out[j] is None:
                    out[j] = np.empty((len(idx), *stored[c].shape[1:]), dtype=dtype)
                out[j][at] = stored[c][local]
        return out

    def _shard(self, s: int) -> tuple[np.ndarray, ...]:
        if s not in self.loaded:
            self.loaded[s] = self._read_shard(self.shards[s])
        return self.loaded[s]

    def _read_shard(self, entry: dict) -> tuple[np.ndarray, ...]:
        where = f"{self.path.rstrip('/')}/{entry['file']}"
        with self.fs.open(f"{self.root}/{entry['file']}", "rb") as f:
            table = pq.read_table(f)
        start, n = entry["first_block"], entry["num_blocks"]
        length, k = self.key["block_size"], self.k
        stored = json.loads((table.schema.metadata or {}).get(SHARD_METADATA, b"null"))
        if stored != shard_metadata(self.key, start, start + n):
            raise ValueError(f"teacher signal {where}: its metadata {stored} disagrees with the manifest "
                             f"(key {self.key}, blocks {start}..{start + n - 1})")

        def column(name: str, dtype, *shape: int) -> np.ndarray:
            size = int(np.prod(shape))
            t = table.schema.field(name).type if name in table.schema.names else "absent"
            if not (pa.types.is_fixed_size_list(t) and t.list_size == size and t.value_type == dtype):
                raise ValueError(f"teacher signal {where}: column {name} is {t}, expected "
                                 f"fixed_size_list<{dtype}>[{size}]")
            return table[name].combine_chunks().flatten().to_numpy().reshape(n, *shape)

        blocks = table["block"].to_numpy()
        if not np.array_equal(blocks, np.arange(start, start + n)):
            raise ValueError(f"teacher signal {where}: rows hold blocks {blocks[:3].tolist()}..., expected "
                             f"{start}..{start + n - 1}")
        topk = (column("logprobs", pa.float16(), length, k), column("ids", pa.int32(), length, k))
        return (*topk, column("ends", pa.int32(), length)) if self.has_ends else topk


def _manifest_problem(manifest: dict, fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """Why a manifest does not describe a complete signal in the standard layout, or None."""
    try:
        shard_blocks, shards = int(manifest["shard_blocks"]), manifest["shards"]
        ranges = shard_ranges(int(manifest["num_blocks"]), shard_blocks)
        listed = [(s["first_block"], s["first_block"] + s["num_blocks"]) for s in shards]
        rows_ok = all(s["rows"] == s["num_blocks"] for s in shards)
        files = [s["file"] for s in shards]
    except (KeyError, TypeError, ValueError) as e:
        return f"malformed manifest ({type(e).__name__}: {e})"
    if listed != ranges or not rows_ok:
        return f"its shards {listed[:4]}... do not cover {manifest['num_blocks']} blocks in shards of {shard_blocks}"
    present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    missing = [f for f in files if f not in present]
    return f"shard files missing: {missing[:3]}" if missing else None


def open_teacher_signal(path: str | Path, key: dict | None = None) -> TopKCache | None:
    """The teacher signal in the directory or fsspec URL `path` (`memory://...`, `file://...`, `s3://...` where its
    fsspec package is installed); None when absent, unfinished, unreadable, or holding another key than `key`
    (key None: any key of this FORMAT_VERSION). Reads only the manifest and a listing; shards load on lookup."""
    location = str(path)
    fs, root = fsspec.core.url_to_fs(location)
    root = root.rstrip("/")
    try:
        with fs.open(f"{root}/{MANIFEST}", "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("teacher signal %s: manifest unreadable (%s); not using it", location, e)
        return None
    stored = manifest.get("key") if isinstance(manifest, dict) else None
    if key is not None and stored != key:
        log.warning("teacher signal %s: stored key %s differs from %s; not using it", location, stored, key)
        return None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT_VERSION:
        log.warning("teacher signal %s: key %s is not of format %d; not using it", location, stored, FORMAT_VERSION)
        return None
    problem = _manifest_problem(manifest, fs, root)
    if problem:
        log.warning("teacher signal %s: %s; not using it", location, problem)
        return None
    return TopKCache(location, stored, manifest["shards"], int(manifest["shard_blocks"]), fs, root)
