"""Batches: loaders and the length-grouped sampler, the stream of a step's micro-batches (GroupStream), and the units a
term counts in a batch and in a step (batch_units, step_units)."""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

from kdistill.config import TrainConfig
from kdistill.data import UNLABELED
from kdistill.errors import UserError


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a seeded random order that changes every epoch.

    Indices are shuffled, cut into mega-batches of `group` batches, sorted by length inside each, cut into
    batches, and the batches shuffled: randomness of plain shuffling, padding of sorted batching.

    Several processes (`num_replicas` > 1): every process builds the same batches (the same seed, the same epoch)
    and yields its contiguous share of each (`rank`'s slice; shares differ by at most one row). A training batch
    with fewer rows than processes would leave a process without data in a step that all take together, so it is
    dropped (at most num_replicas - 1 examples an epoch); evaluation batches are never dropped, a process just
    yields no empty share.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, seed: int, shuffle: bool = True, group: int = 50,
                 num_replicas: int = 1, rank: int = 0):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.group = lengths, batch_size, seed, shuffle, group
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int | None = None) -> None:
        """Reshuffle for `epoch`; `skip`: batches of it already done (a resumed run), left out of the next pass.

        (accelerate calls set_epoch(epoch) again when it starts iterating; that keeps a pending skip.)"""
        if skip is not None:
            self.skip = skip
        elif epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: -self.lengths[i])
            return [order[i: i + self.batch_size] for i in range(0, n, self.batch_size)]
        rng = random.Random(self.seed + self.epoch)
        idx = list(range(n))
        rng.shuffle(idx)
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, n, mega):
            chunk = sorted(idx[start: start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        if self.num_replicas > 1:
            batches = [b for b in batches if len(b) >= self.num_replicas]
        return batches

    def _share(self, batch: list[int]) -> list[int]:
        base, extra = divmod(len(batch), self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        return batch[start: start + base + (self.rank < extra)]

    def _batches(self) -> list[list[int]]:
        shares = (self._share(b) for b in self._global_batches())
        return [s for s in shares if s]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from self._batches()[skip:]

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return math.ceil(len(self.lengths) / self.batch_size)
        return len(self._batches())

def make_loader(dataset, tokenizer, batch_size: int, *, seed: int, shuffle: bool,
                accelerator: Accelerator | None = None) -> DataLoader:
    """Dynamic padding + length-grouped batches. `dataset` has input_ids/attention_mask/labels columns.

    The collator follows the labels: one per example (classification) pads the inputs alone; a list per example
    (token classification, `has_token_labels`) pads the labels too, with -100 (DataCollatorForTokenClassification).

    `batch_size` counts the rows of a batch over all processes; with an `accelerator` of several processes each
    process loads its share (see LengthGroupedSampler).
    """
    lengths = [len(x) for x in dataset["input_ids"]]
    shards = dict(num_replicas=accelerator.num_processes, rank=accelerator.process_index) if accelerator else {}
    sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, shuffle=shuffle, **shards)
    collate = DataCollatorForTokenClassification(tokenizer, return_tensors="pt") if has_token_labels(dataset) \
        else DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(dataset.with_format("python"), batch_sampler=sampler, collate_fn=collate)

def has_token_labels(dataset) -> bool:
    """Whether `dataset`'s examples carry one label per token (a list: token classification)."""
    return "labels" in dataset.column_names and len(dataset) > 0 and isinstance(dataset[0]["labels"], list)

def set_loader_epoch(loader, epoch: int, skip: int = 0) -> None:
    """Reshuffle for a new epoch (accelerate may wrap our sampler); `skip` the first batches of the epoch (our
    LengthGroupedSampler only)."""
    if hasattr(loader, "set_epoch"):  # accelerate's loader: keeps its own epoch count, which it applies on iter()
        loader.set_epoch(epoch)
    sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(sampler, "batch_sampler", sampler)
    if skip:
        sampler.set_epoch(epoch, skip=skip)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)

class GroupStream:
    """A step's micro-batches (`grad_accum` of them), epoch after epoch, reshuffled each epoch, for as long as asked;
    it knows where it is: `epoch`, and `done`, the steps (groups) of that epoch already taken. That is the data
    position a checkpoint saves; `seek` goes back to it without loading the batches before it.

    `device`: where to put each batch (for loaders that accelerate did not prepare)."""

    def __init__(self, loader, grad_accum: int, *, device: torch.device | None = None):
        self.loader, self.grad_accum, self.device = loader, grad_accum, device
        self.per_epoch = math.ceil(len(loader) / grad_accum)
        self.epoch, self.done = 0, 0
        self._epoch_batches = None  # the open epoch's batches

    @property
    def at_epoch_end(self) -> bool:
        return self.done >= self.per_epoch

    @property
    def position(self) -> dict[str, int]:
        """Where the next step starts: epoch, steps and batches of it done, and the sampler's epoch (its seed)."""
        epoch, done = (self.epoch + 1, 0) if self.at_epoch_end else (self.epoch, self.done)
        return {"epoch": epoch, "steps_done": done, "batches_done": done * self.grad_accum, "sampler_epoch": epoch}

    def seek(self, position: dict[str, int]) -> None:
        """Go to a saved `position`. Call it before restoring the RNG states: an epoch under way opens here."""
        self.epoch, self.done = position["epoch"], position["steps_done"]
        self._epoch_batches = None
        if self.done:
            self.start_epoch()

    def start_epoch(self) -> None:
        """Reshuffle for `epoch`, skip the batches of it already done, and open the loader. torch's DataLoader draws
        a seed from the global RNG when it opens, so a resumed run opens an epoch under way before restoring the RNG
        states, as the uninterrupted run had opened it before saving them: dropout then draws the same masks."""
        set_loader_epoch(self.loader, self.epoch, skip=self.done * self.grad_accum)
        self._epoch_batches = iter(self.loader)

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            if self._epoch_batches is None:
                self.start_epoch()
            group = list(itertools.islice(self._epoch_batches, self.grad_accum))
            if not group:  # the epoch is over
                if self.done == 0:
                    raise UserError("train: the training split gives no batch")
                self.epoch, self.done, self._epoch_batches = self.epoch + 1, 0, None
                continue
            self.done += 1
            if self.device is not None:
                group = [{k: v.to(self.device) for k, v in batch.items()} for batch in group]
            yield group

def batch_units(batch: dict) -> dict[str, torch.Tensor]:
    """The units a loss term can count (terms.UNITS): examples (rows), labeled examples (tokens: labels >= 0),
    scored tokens (labels != UNLABELED: the labeled ones and a transfer sentence's TRANSFER ones), real, unpadded
    tokens, pairs of real tokens in one example, and, for a causal-LM batch (one with `valid`), its next-token targets
    (and its targets aligned with a teacher over another vocabulary, where it has `aligned`).

    Call it before the labels are popped: without them every row counts as labeled."""
    mask = batch["attention_mask"]
    labels = batch.get("labels")
    rows = torch.tensor(float(mask.shape[0]))
    labeled = (labels >= 0).sum().float().cpu() if labels is not None else rows
    scored = (labels != UNLABELED).sum().float().cpu() if labels is not None else rows
    # token_pairs: (query, key) pairs of real tokens, Σ_b n_b², which an attention map's elements count
    units = {"rows": rows, "labeled": labeled, "scored": scored, "tokens": mask.sum().float(),
             "token_pairs": (mask.sum(1).float() ** 2).sum()}
    if "valid" in batch:
        units["targets"] = batch["valid"].sum().float()
    if "aligned" in batch:  # (3, P): row, teacher and student position of the aligned targets
        units["aligned"] = torch.tensor(float(batch["aligned"].shape[1]))
    return units

def step_units(group: list[dict], accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Units summed over a step's micro-batches and over all processes."""
    totals = defaultdict(float)
    for batch in group:
        for k, v in batch_units(batch).items():
            totals[k] += float(v)
    keys = sorted(totals)
    t = torch.tensor([totals[k] for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return {k: t[i] for i, k in enumerate(keys)}

def plan_steps(num_batches: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    per_epoch = math.ceil(num_batches / grad_accum)
    total = max_steps if max_steps else math.ceil(per_epoch * epochs)
    if total < 1:
        raise UserError("train: no optimizer step to run (too little data for batch_size x grad_accum?)")
    return total

def eval_points(total_steps: int, steps_per_epoch: int, eval_every: int | None) -> set[int]:
    every = eval_every or steps_per_epoch
    points = set(range(every, total_steps + 1, every))
    points.add(total_steps)
    return points

def make_loaders(train_split, val_split, tokenizer, train: TrainConfig, accelerator: Accelerator | None = None):
    """(training loader of micro-batches, validation loader, optimizer steps to run, steps after which to validate).

    With an `accelerator`, each process loads its share of every batch (`make_loader`); `train.batch_size` is the
    global batch. Without one, the loaders are whole (for accelerate to prepare, in one process)."""
    micro = train.batch_size // train.grad_accum
    world = accelerator.num_processes if accelerator else 1
    if micro < world:
        raise UserError(f"train.batch_size: {train.batch_size} examples per step in micro-batches of {micro} "
                        f"(grad_accum {train.grad_accum}) cannot give each of {world} processes a share; "
                        f"use a batch_size of at least {world * train.grad_accum}")
    train_loader = make_loader(train_split, tokenizer, micro, seed=train.seed, shuffle=True, accelerator=accelerator)
    val_loader = make_loader(val_split, tokenizer, 64, seed=train.seed, shuffle=False, accelerator=accelerator)
    total_steps = plan_steps(len(train_loader), train.grad_accum, train.epochs, train.max_steps)
    steps_per_epoch = max(1, len(train_loader) // train.grad_accum)
    return train_loader, val_loader, total_steps, eval_points(total_steps, steps_per_epoch, train.eval_every)
