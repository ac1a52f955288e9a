"""Teacher-output caches: a frozen teacher gives the same outputs every epoch, so it runs once and they are read back.

Two stores, both fp16 and memory-mapped, so that one larger than memory is fine and a lookup reads one batch's rows:
the causal-LM top-k cache (`build_topk_cache`, kept across runs) and a classifier teacher's hidden states
(`FeatureStore`, built for one run by distill/explicit.py; see its docstring).

Causal LMs: the frozen teacher's top-k next-token log-probabilities. A big teacher is the slowest part of LM
distillation on a CPU, so it runs once per dataset: `build_topk_cache` writes, for every position of every packed
training block, the teacher's K most likely next tokens and their log-probabilities at T = 1,

    indices.npy   (N, L, K) int32     vocabulary ids, most likely first
    logprobs.npy  (N, L, K) float16   log p_T(v) = z_v − logsumexp(z), the full-vocabulary log-softmax
    meta.json     the key (below), shapes and dtypes

and `open_topk_cache` memory-maps them (`numpy.load(mmap_mode="r")`), so a cache larger than memory is fine and
a lookup reads only the rows of one batch.

How the loss uses it (renormalisation over the stored support). The cache keeps K of the V entries, so the
divergences are taken between the two distributions *conditioned on the support* S (the token's K ids):

    q_T(v) = softmax(log p_T(S) / T)(v),   q_S(v) = softmax(z_S(S) / T)(v),   v ∈ S

i.e. the student's logits are gathered at S and both sides are log-softmaxed over those K entries (dividing a
log-probability by T and renormalising equals softening the logits by T and restricting to S). Any token-level
divergence of `kdistill.losses` then applies unchanged to the (B, L, K) tensors; for the forward KL this is
`losses.topk_forward_kl_tokens`. With K = V it is exactly the full-vocabulary loss. The mass outside S gets no
KD signal; the `lm` term (the data's next token) covers it, which is why LM recipes keep a little of it.

Staleness: a cache is keyed by the teacher (a fingerprint of its weights), the data (a hash of the packed token
ids, so text, tokenizer, split, limit and packing all count), the block size and K. The directory name is the
key's hash; `open_topk_cache` re-checks the stored key and returns None for any mismatch, so a stale cache is
never used. Atomicity: everything is written into a temporary directory beside the final one, fsynced, and
renamed into place in one `os.replace`; a crash leaves no directory under the final name (only a temp dir,
removed on error and ignored by readers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.assets import cache_root

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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


def fingerprint_tokens(input_ids: Tensor, attention_mask: Tensor | None = None) -> str:
    """Hash of packed token blocks (N, L) (and their mask): the data as the teacher sees it."""
    h = hashlib.sha256()
    h.update(str(tuple(input_ids.shape)).encode())
    h.update(input_ids.to(torch.int64).cpu().numpy().tobytes())
    if attention_mask is not None:
        h.update(attention_mask.to(torch.int8).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def cache_key(*, teacher: str, data: str, block_size: int, k: int) -> dict:
    """Everything a cache's contents depend on. Two caches with equal keys hold the same numbers."""
    return {"format": FORMAT_VERSION, "teacher": teacher, "data": data, "block_size": int(block_size), "k": int(k)}


def key_dir(root: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(root) / f"topk-k{key['k']}-L{key['block_size']}-{digest}"


# ------------------------------------------------------------------------------------------------------ read


@dataclass
class TopKCache:
    """A memory-mapped top-k cache. `lookup(rows)` returns tensors for those packed blocks."""

    path: Path
    key: dict
    logprobs: np.ndarray
    """(N, L, K) float16 memmap: teacher log-probabilities, full-vocabulary normalised, at T = 1."""
    indices: np.ndarray
    """(N, L, K) int32 memmap: the vocabulary ids of those entries."""
    reused: bool = False
    """True when `build_topk_cache` found it already written (the teacher did not run)."""

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    @property
    def k(self) -> int:
        return self.logprobs.shape[-1]

    def lookup(self, rows: Tensor | list[int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(log-probs float32 (B, L, K), indices int64 (B, L, K)) of the given block rows."""
        idx = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are sequential on disk
        values = np.empty((len(idx), *self.logprobs.shape[1:]), dtype=np.float32)
        ids = np.empty((len(idx), *self.indices.shape[1:]), dtype=np.int64)
        values[order] = self.logprobs[idx[order]]
        ids[order] = self.indices[idx[order]]
        return torch.from_numpy(values).to(device), torch.from_numpy(ids).to(device)


def open_topk_cache(root: str | Path, key: dict) -> TopKCache | None:
    """The cache stored under `root` for exactly `key`, memory-mapped; None when absent, stale or unreadable."""
    path = key_dir(root, key)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            log.warning("teacher cache %s: stored key %s differs from %s; not using it", path, meta.get("key"), key)
            return None
        logprobs = np.load(path / "logprobs.npy", mmap_mode="r")
        indices = np.load(path / "indices.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("teacher cache %s unreadable (%s); it will be rebuilt", path, e)
        return None
    shape = tuple(meta.get("shape", ()))
    if logprobs.shape != shape or indices.shape != shape or shape[-1:] != (key["k"],) or shape[1] != key["block_size"]:
        log.warning("teacher cache %s: arrays %s / %s do not match %s; not using it", path, logprobs.shape,
                    indices.shape, shape)
        return None
    return TopKCache(path, key, logprobs, indices)


# ----------------------------------------------------------------------------------------------------- write


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_topk_cache(root: str | Path, key: dict, shape: tuple[int, int],
                     fill: Callable[[int, int], tuple[Tensor, Tensor]], *, batch_size: int = 8,
                     progress: Callable[[int], None] | None = None) -> TopKCache:
    """Write a cache of `shape` = (N blocks, L) atomically and return it memory-mapped.

    fill(start, stop) returns (log-probs (stop−start, L, K), indices (stop−start, L, K)) for those blocks. The
    arrays are filled in a temp dir beside the final one, fsynced, and renamed into place, so a reader sees
    either no cache or a complete one. If another process finished the same key first, its copy is kept.
    """
    n, length = shape
    k = key["k"]
    if length != key["block_size"]:
        raise ValueError(f"write_topk_cache: blocks of {length} tokens, key says block_size {key['block_size']}")
    final = key_dir(root, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        logprobs = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float16, shape=(n, length, k))
        indices = np.lib.format.open_memmap(tmp / "indices.npy", mode="w+", dtype=np.int32, shape=(n, length, k))
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            values, ids = fill(start, stop)
            if tuple(values.shape) != (stop - start, length, k) or tuple(ids.shape) != tuple(values.shape):
                raise ValueError(f"write_topk_cache: fill({start}, {stop}) returned {tuple(values.shape)} / "
                                 f"{tuple(ids.shape)}, expected {(stop - start, length, k)}")
            logprobs[start:stop] = values.detach().float().cpu().numpy().astype(np.float16)
            indices[start:stop] = ids.detach().cpu().numpy().astype(np.int32)
            if progress:
                progress(stop - start)
        logprobs.flush()
        indices.flush()
        del logprobs, indices  # close the maps before the rename
        meta = {"key": key, "shape": [n, length, k], "dtypes": {"logprobs": "float16", "indices": "int32"},
                "stores": "teacher log-softmax at T=1, top-k per position, most likely first"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for name in ("logprobs.npy", "indices.npy", "meta.json"):
            _fsync_file(tmp / name)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # a non-empty final dir that is not a cache: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            else:  # a concurrent writer of the same key won; identical contents by construction
                shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = open_topk_cache(root, key)
    if cache is None:
        raise RuntimeError(f"teacher cache {final} was written but cannot be read back")
    return cache


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
                     autocast_dtype: torch.dtype | None = None, progress: Callable[[int], None] | None = None
                     ) -> TopKCache:
    """Open the cache of (teacher, blocks, k) or, when missing or stale, run the teacher once and write it.

    input_ids, attention_mask: (N, L) packed blocks, in the row order `lookup` will be called with.
    teacher_id: a fingerprint of the teacher (default: `fingerprint_model(teacher)`).
    K is capped at the vocabulary size.
    """
    vocab = teacher.get_output_embeddings().weight.shape[0] if teacher.get_output_embeddings() is not None \
        else teacher.config.vocab_size
    k = min(int(k), int(vocab))
    key = cache_key(teacher=teacher_id or fingerprint_model(teacher),
                    data=fingerprint_tokens(input_ids, attention_mask), block_size=input_ids.shape[1], k=k)
    cache = open_topk_cache(root, key)
    if cache is not None:
        log.info("teacher cache: reusing %s (%d blocks, k=%d)", cache.path, len(cache), k)
        cache.reused = True
        return cache
    was_training = teacher.training
    teacher.eval()
    try:
        cache = write_topk_cache(
            root, key, tuple(input_ids.shape),
            lambda a, b: teacher_topk(teacher, input_ids[a:b], attention_mask[a:b], k, autocast_dtype),
            batch_size=batch_size, progress=progress)
    finally:
        teacher.train(was_training)
    log.info("teacher cache: wrote %s (%d blocks x %d tokens, k=%d)", cache.path, input_ids.shape[0],
             input_ids.shape[1], k)
    return cache


# ------------------------------------------------------------------------------------------ teacher features


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
