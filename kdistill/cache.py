"""Teacher outputs stored for reuse: a frozen teacher gives the same outputs every epoch, so it runs once and they are
read back.

Two stores: the causal-LM *teacher signal* (`build_topk_cache`; a Parquet dataset kept across runs, which another run
or tool can read) and a classifier teacher's hidden states (`FeatureStore`, fp16 memory-mapped, built for one run by
distill/explicit.py; see its docstring).

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
compression, as the former .npy cache did. Any Parquet reader opens a shard (`pyarrow.parquet.read_table(shard)`;
`datasets.Dataset.from_parquet(dir + "/shard-*.parquet")`, whose features are `List(Value("float16"), length=L·K)`);
reading the directory itself with a Parquet reader needs the shard files named, since manifest.json sits beside them.

Key and staleness: a signal is keyed by the format version, the teacher (a fingerprint of its weights), the data (a
hash of the packed token ids, so text, tokenizer, split, limit and packing all count, and of the byte ends where
stored), the block size and K. The run's
automatic cache lives under `default_cache_root()` in a directory named by the key's hash (`key_dir`);
`open_teacher_signal` re-checks the stored key and returns None for any other key, so a stale signal is never used.
A signal built elsewhere (another machine, a bucket) is opened from its path or fsspec URL the same way.

Building (`write_teacher_signal`, `build_topk_cache`): shard by shard, each shard written to a temp file beside its
final name, fsynced and renamed, so a shard file is complete or absent. A directory with shards but no manifest is
an unfinished build of its key: a rerun keeps every shard whose metadata names this key and range, computes only the
others, and gives the same rows as an uninterrupted build (the batches inside a shard do not depend on what ran
before). Several processes (torchrun / accelerate, `training.process_state()`) build one signal together: process r
computes the shards s with s % world_size == r; after a barrier the main process removes leftovers of killed builds
(temp files, shard files outside the layout) and writes the manifest; after a second barrier all open it. Two builds
of one key running at the same time in the same directory are not supported (the leftover cleanup may remove the
other's temp file, which then fails and is resumed by its rerun).

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

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from kdistill.assets import cache_root
from kdistill.errors import UserError
from kdistill.io import atomic_file, atomic_write_json
from kdistill.training import process_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SHARD_BLOCKS = 256
"""Blocks per shard: the unit of resume, of the split between processes and of a lookup's read."""
MANIFEST = "manifest.json"
SHARD_METADATA = b"kdistill.teacher_signal"


def default_cache_root() -> Path:
    """`$KDISTILL_CACHE_DIR/teacher-topk`, else `~/.cache/kdistill/teacher-topk` (shared by runs and seeds)."""
    return cache_root() / "teacher-topk"


# ------------------------------------------------------------------------------------------------------ keys


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


def _shard_metadata(key: dict, start: int, stop: int) -> dict:
    return {"key": key, "first_block": start, "num_blocks": stop - start}


# ------------------------------------------------------------------------------------------------------ read


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
        if stored != _shard_metadata(self.key, start, start + n):
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


# ----------------------------------------------------------------------------------------------------- write


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
        return json.loads(metadata.get(SHARD_METADATA, b"null")) == _shard_metadata(key, start, stop)
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
    table = table.replace_schema_metadata({SHARD_METADATA: json.dumps(_shard_metadata(key, start, stop)).encode()})
    with atomic_file(file) as f:
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


def _remove_leftovers(path: Path, keep: set[str]) -> None:
    """Temp files of killed builds and shard files outside this layout (an earlier shard_blocks); nothing else."""
    for f in path.iterdir():
        if f.name not in keep and _LEFTOVER.fullmatch(f.name):
            f.unlink(missing_ok=True)


def write_teacher_signal(path: str | Path, key: dict, shape: tuple[int, int],
                         fill: Callable[[int, int], tuple[Tensor, Tensor]], *, shard_blocks: int = SHARD_BLOCKS,
                         batch_size: int = 8, progress: Callable[[int], None] | None = None,
                         ends: Tensor | None = None) -> TopKCache:
    """The signal of `key` in the local directory `path`: opened if complete, else its missing shards are computed
    and written, then its manifest, and it is opened.

    shape: (N blocks, L). fill(start, stop) returns (log-probs (stop−start, L, K), indices (stop−start, L, K)) for
    those blocks; it is called in batches of `batch_size` blocks inside each shard. ends: (N, L) the teacher tokens'
    byte ends, stored beside them; given exactly when the key has "ends". A dir holding the complete signal of
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
        atomic_write_json(path / MANIFEST, {
            "key": key, "num_blocks": n, "shard_blocks": shard_blocks, "shards": shards,
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


def topk_key(teacher, input_ids: Tensor, attention_mask: Tensor, *, k: int, teacher_id: str | None = None,
             ends: Tensor | None = None) -> dict:
    """The key of the teacher's top-k signal over the (N, L) blocks, K capped at the vocabulary size.
    teacher_id: a fingerprint of the teacher (default: `fingerprint_model(teacher)`). ends: (N, L) the tokens' byte
    ends, for a signal that stores them (a student with another tokenizer)."""
    vocab = teacher.get_output_embeddings().weight.shape[0] if teacher.get_output_embeddings() is not None \
        else teacher.config.vocab_size
    return cache_key(teacher=teacher_id or fingerprint_model(teacher),
                     data=fingerprint_tokens(input_ids, attention_mask, ends), block_size=input_ids.shape[1],
                     k=min(int(k), int(vocab)), ends=ends is not None)


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
            shard_blocks=shard_blocks, batch_size=batch_size, progress=progress, ends=ends)
    finally:
        teacher.train(was_training)
    log.info("teacher signal: %s %s (%d blocks x %d tokens, k=%d, %d shards)",
             "reusing" if signal.reused else "wrote", signal.path, len(signal), input_ids.shape[1], signal.k,
             len(signal.shards))
    return signal


# ------------------------------------------------------------------------------------------ teacher features


# ------------------------------------------------------------------------------ a classifier teacher's logits

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


class FeatureStore:
    """A frozen teacher's hidden states of some layers for every training example, fp16, memory-mapped.

    Batches pad dynamically, so examples have different lengths: each layer is one flat array of the examples'
    real tokens, one example after another in row order (no padding stored, unlike a fixed (N, max_length, H)
    array, which on short texts would be mostly padding):

        layer-{t}.npy  (T, H) float16   t: the hidden_states index (0 = embeddings), T = sum of the lengths
        offsets.npy    (N + 1,) int64   example i's tokens are rows offsets[i]:offsets[i + 1]
        meta.json      layers, width, first_only

    `first_only` (the loss reads position 0 only: PKD's [CLS]) keeps one row per example, T = N.
    `gather` puts a batch's rows back where the collator put that batch's tokens, at the positions its attention
    mask marks real (so right or left padding alike), zeros at padding, as float32. fp16 keeps ~3 significant
    digits, well inside what the hidden-state losses resolve; it halves the store.

    `FeatureStore.create` opens the arrays for writing (`put`), `FeatureStore.open` reads a written one.
    """

    def __init__(self, path: Path, layers: dict[int, np.ndarray], offsets: np.ndarray, first_only: bool):
        self.path, self.layers, self.offsets, self.first_only = Path(path), layers, offsets, first_only
        self.width = next(iter(layers.values())).shape[1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @staticmethod
    def estimate_bytes(lengths: list[int], num_layers: int, width: int, *, first_only: bool) -> int:
        """Size of a store of examples of `lengths` tokens: rows x width x 2 bytes x layers."""
        rows = len(lengths) if first_only else int(sum(lengths))
        return rows * width * 2 * num_layers

    @classmethod
    def create(cls, path: str | Path, lengths: list[int], layers: list[int], width: int, *,
               first_only: bool) -> FeatureStore:
        """Empty arrays in the existing directory `path`, for examples of `lengths` real tokens (row order)."""
        path = Path(path)
        per_row = np.ones(len(lengths), dtype=np.int64) if first_only else np.asarray(lengths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
        np.save(path / "offsets.npy", offsets)
        arrays = {t: np.lib.format.open_memmap(path / f"layer-{t}.npy", mode="w+", dtype=np.float16,
                                               shape=(int(offsets[-1]), width)) for t in layers}
        (path / "meta.json").write_text(json.dumps({"layers": list(layers), "width": width, "first_only": first_only,
                                                    "stores": "teacher hidden states, real tokens only"}),
                                        encoding="utf-8")
        return cls(path, arrays, offsets, first_only)

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        arrays = {t: np.load(path / f"layer-{t}.npy", mmap_mode="r") for t in meta["layers"]}
        return cls(path, arrays, np.load(path / "offsets.npy"), meta["first_only"])

    def _check_lengths(self, rows: np.ndarray, mask: Tensor, what: str) -> np.ndarray:
        stored = self.offsets[rows + 1] - self.offsets[rows]
        if not self.first_only:
            given = mask.sum(1).numpy()
            if not np.array_equal(stored, given):
                bad = int(np.flatnonzero(stored != given)[0])
                raise ValueError(f"teacher feature cache {self.path}: {what} example {int(rows[bad])} with "
                                 f"{int(given[bad])} real tokens, {int(stored[bad])} were cached")
        return stored

    def put(self, rows: Tensor | list[int], hidden: dict[int, Tensor], attention_mask: Tensor) -> None:
        """Store a batch: `hidden[t]` (B, L, H) for every layer t of the store, `attention_mask` (B, L)."""
        rows = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64)
        mask = attention_mask.detach().cpu().bool()
        stored = self._check_lengths(rows, mask, "put")
        for t, array in self.layers.items():
            h = hidden[t].detach().cpu()
            if h.shape[-1] != self.width:
                raise ValueError(f"teacher feature cache: layer {t} is {h.shape[-1]} wide, the store {self.width}")
            if self.first_only:
                array[rows] = h[:, 0].half().numpy()
                continue
            real = h[mask].half().numpy()  # (sum of lengths, H): row by row, each row's tokens in order
            for row, start, n in zip(rows, np.cumsum(stored) - stored, stored):
                array[self.offsets[row]: self.offsets[row] + n] = real[start: start + n]

    def flush(self) -> None:
        for array in self.layers.values():
            array.flush()

    def gather(self, rows: Tensor | list[int], attention_mask: Tensor,
               device: torch.device | str = "cpu") -> dict[int, Tensor]:
        """{layer t: (B, L, H) float32} for the examples `rows` in a batch padded as `attention_mask` (B, L)."""
        rows = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64)
        mask = attention_mask.detach().cpu().bool()
        self._check_lengths(rows, mask, "a batch has")
        out = {}
        for t, array in self.layers.items():
            padded = torch.zeros(*mask.shape, self.width)
            if self.first_only:
                padded[:, 0] = torch.from_numpy(array[rows]).float()
            else:  # each example's tokens are contiguous: one sequential read each
                tokens = np.concatenate([array[self.offsets[r]: self.offsets[r + 1]] for r in rows])
                padded[mask] = torch.from_numpy(tokens).float()
            out[t] = padded.to(device)
        return out
