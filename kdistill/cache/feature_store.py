"""A frozen classifier teacher's hidden states for every training example, stored for one run (`FeatureStore`,
built by distill/explicit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


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
