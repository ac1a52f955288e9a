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
    manifest.json             the key, num_blocks, shard_blocks, the shard list (file, first_block, num_blocks,
                              rows), sha256 (file -> the hex sha256 of its bytes) and vocab_size (the teacher's:
                              every id lies in [0, vocab_size)); written last, so its presence means every shard is
                              complete. Manifests written before sha256 and vocab_size existed are read as before.

Parquet keeps float16 as float16 (logical type Float16, pyarrow >= 15), so a block costs L·K·6 bytes before
compression. Any Parquet reader opens a shard (`pyarrow.parquet.read_table(shard)`;
`datasets.Dataset.from_parquet(dir + "/shard-*.parquet")`, whose features are `List(Value("float16"), length=L·K)`);
reading the directory itself with a Parquet reader needs the shard files named, since manifest.json sits beside them.

Reading (`TopKCache`): a shard is read and decoded the first time a lookup needs one of its blocks, then kept (see
`TopKCache` for the memory this costs).

Integrity (`SignalError`: exit 2, naming the shard). `TopKCache.verify` reads every shard's Parquet footer only
(the file's last 64 KB at most): that it parses, its metadata, row count and column types against the manifest and
key, the manifest's vocab_size against the run's teacher, and the ids' min/max from the footer statistics against
it. A shard's first read hashes the bytes it reads anyway (one read, also from a remote store) against the
manifest's sha256, and checks every id lies in [0, vocab_size) and every log-prob is finite, naming the first bad
block and position.

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

import hashlib
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
from kdistill.errors import UserError

log = logging.getLogger(__name__)

REBUILD = "rebuild the signal (kdistill teacher-signal) or copy it again"


class SignalError(UserError, ValueError):
    """A teacher signal's shard is damaged or disagrees with its manifest; the message names the shard (exit 2)."""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _column_problem(schema: pa.Schema, name: str, dtype: pa.DataType, size: int) -> str | None:
    """Why column `name` of `schema` is not fixed_size_list<dtype>[size], or None."""
    t = schema.field(name).type if name in schema.names else "absent"
    if pa.types.is_fixed_size_list(t) and t.list_size == size and t.value_type == dtype:
        return None
    return f"column {name} is {t}, expected fixed_size_list<{dtype}>[{size}]"


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
    vocab_size: int | None = None
    """Ids lie in [0, vocab_size): the manifest's, else the run's teacher's once `verify` is given it."""
    checksums: dict[str, str] = field(default_factory=dict, repr=False)
    """The manifest's sha256 of each shard file (empty for a manifest from before checksums)."""
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

    def _where(self, entry: dict) -> str:
        return f"{self.path.rstrip('/')}/{entry['file']}"

    def _columns(self) -> dict[str, tuple[pa.DataType, int]]:
        """A shard's list columns: name -> (value type, values per row)."""
        length, k = self.key["block_size"], self.k
        columns = {"logprobs": (pa.float16(), length * k), "ids": (pa.int32(), length * k)}
        return {**columns, "ends": (pa.int32(), length)} if self.has_ends else columns

    def verify(self, vocab_size: int | None = None) -> None:
        """Check the signal without reading its data: the manifest's vocab_size against `vocab_size` (the run's
        teacher's), and every shard's Parquet footer (that it parses; its metadata, row count and column types
        against the manifest and key; its ids' min/max statistics against the vocabulary). Raises SignalError
        naming the shard. Reads each shard's last 64 KB at most (pyarrow's footer read): 1 ms for 4 local shards."""
        if vocab_size is not None and self.vocab_size is not None and self.vocab_size != vocab_size:
            raise SignalError(f"teacher signal {self.path}: manifest.json declares a vocabulary of {self.vocab_size} "
                              f"tokens, this run's teacher scores {vocab_size}")
        if self.vocab_size is None:
            self.vocab_size = vocab_size
        if self.vocab_size is not None and not 0 < self.k <= self.vocab_size:
            raise SignalError(f"teacher signal {self.path}: k {self.k} outside 1..{self.vocab_size} (the vocabulary)")
        for entry in self.shards:
            where, start, n = self._where(entry), entry["first_block"], entry["num_blocks"]
            try:
                with self.fs.open(f"{self.root}/{entry['file']}", "rb") as f:
                    footer = pq.ParquetFile(f)
                    metadata, schema = footer.metadata, footer.schema_arrow
            except (pa.ArrowException, OSError, ValueError) as e:  # magic bytes, thrift, a short file
                raise SignalError(f"teacher signal {where}: not a readable Parquet file ({_first_line(e)}); it is "
                                  f"truncated or damaged: {REBUILD}") from None
            problem = self._schema_problem(schema, start, n)
            if problem is None and metadata.num_rows != n:
                problem = f"{metadata.num_rows} rows, the manifest lists {n}"
            if problem is None:
                problem = self._statistics_problem(metadata)
            if problem:
                raise SignalError(f"teacher signal {where}: {problem}; {REBUILD}")

    def _schema_problem(self, schema: pa.Schema, start: int, n: int) -> str | None:
        stored = json.loads((schema.metadata or {}).get(SHARD_METADATA, b"null"))
        if stored != shard_metadata(self.key, start, start + n):
            return (f"its metadata {stored} disagrees with the manifest (key {self.key}, blocks "
                    f"{start}..{start + n - 1})")
        if "block" not in schema.names or schema.field("block").type != pa.int64():
            return f"column block is {schema.field('block').type if 'block' in schema.names else 'absent'}, " \
                   "expected int64"
        return next(filter(None, (_column_problem(schema, name, dtype, size)
                                  for name, (dtype, size) in self._columns().items())), None)

    def _statistics_problem(self, metadata: pq.FileMetaData) -> str | None:
        """Ids outside [0, vocab_size) that the footer's min/max statistics show (where the writer kept them)."""
        for g in range(metadata.num_row_groups):
            for c in range(metadata.num_columns):
                chunk = metadata.row_group(g).column(c)
                stats = chunk.statistics
                if not chunk.path_in_schema.startswith("ids.") or stats is None or not stats.has_min_max:
                    continue
                if stats.min < 0 or (self.vocab_size is not None and stats.max >= self.vocab_size):
                    return (f"its ids span {stats.min}..{stats.max} (footer statistics), outside the vocabulary "
                            f"[0, {self.vocab_size if self.vocab_size is not None else '...'})")
        return None

    def _read_shard(self, entry: dict) -> tuple[np.ndarray, ...]:
        where = self._where(entry)
        with self.fs.open(f"{self.root}/{entry['file']}", "rb") as f:
            raw = f.read()  # hashed and parsed from the same bytes: a remote shard is fetched once
        digest = hashlib.sha256(raw).hexdigest()
        expected = self.checksums.get(entry["file"])  # (a manifest from before checksums has none)
        damaged = expected is not None and expected != digest
        checksum = f"sha256 {digest[:16]}... of its {len(raw)} bytes differs from the manifest's " \
                   f"{str(expected)[:16]}...: the file is damaged or was changed; {REBUILD}"
        try:
            table = pq.read_table(pa.BufferReader(raw))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise SignalError(f"teacher signal {where}: " + (checksum if damaged else
                              f"not a readable Parquet file ({_first_line(e)}); {REBUILD}")) from None
        start, n = entry["first_block"], entry["num_blocks"]
        problem = self._schema_problem(table.schema, start, n)
        if problem:
            raise SignalError(f"teacher signal {where}: {problem}")
        if damaged:
            raise SignalError(f"teacher signal {where}: {checksum}")
        length, k = self.key["block_size"], self.k
        if table.num_rows != n:
            raise SignalError(f"teacher signal {where}: {table.num_rows} rows, the manifest lists {n}; {REBUILD}")

        def column(name: str, *shape: int) -> np.ndarray:
            return table[name].combine_chunks().flatten().to_numpy().reshape(n, *shape)

        blocks = table["block"].to_numpy()
        if not np.array_equal(blocks, np.arange(start, start + n)):
            raise SignalError(f"teacher signal {where}: rows hold blocks {blocks[:3].tolist()}..., expected "
                              f"{start}..{start + n - 1}")
        topk = (column("logprobs", length, k), column("ids", length, k))
        self._check_values(where, start, *topk)
        return (*topk, column("ends", length)) if self.has_ends else topk

    def _check_values(self, where: str, start: int, logprobs: np.ndarray, ids: np.ndarray) -> None:
        """Every log-prob finite, every id in [0, vocab_size) (ids >= 0 where the vocabulary is unknown)."""
        vocab = self.vocab_size
        for bad, what in ((~np.isfinite(logprobs), "log-prob"),
                          ((ids < 0) | (ids >= vocab) if vocab is not None else ids < 0, "token id")):
            if bad.any():
                row, position, rank = (int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
                value = (logprobs if what == "log-prob" else ids)[row, position, rank]
                why = "not a finite log-probability (a NaN/inf teacher output, or an altered file)" \
                    if what == "log-prob" else \
                    f"outside the vocabulary [0, {vocab if vocab is not None else '...'}) the signal declares"
                raise SignalError(f"teacher signal {where}: block {start + row} (row {row}) holds {what} {value} at "
                                  f"position {position}, rank {rank}: {why} ({int(bad.sum())} such values in the "
                                  f"shard); {REBUILD}")


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
    vocab, checksums = manifest.get("vocab_size"), manifest.get("sha256")
    return TopKCache(location, stored, manifest["shards"], int(manifest["shard_blocks"]), fs, root,
                     vocab_size=int(vocab) if isinstance(vocab, int) else None,
                     checksums=checksums if isinstance(checksums, dict) else {})
