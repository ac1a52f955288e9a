"""What every training loop shares: batching, optimiser and schedule, step-level loss normalisation, logging,
validation and early stopping. The loops themselves (teacher.py, distill/*.py) call these; nothing is inherited.

Loss normalisation: every loss returns (sum, count). A term's count is a fixed multiple of a *unit* of the
batch — rows (examples) or tokens — so the loop divides each micro-batch's sum by that term's count over the
whole optimizer step, across micro-batches and processes. Gradient accumulation and several processes then give
the same loss as one big batch.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed as accelerate_set_seed
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from kdistill.config import TrainConfig
from kdistill.errors import UserError

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    accelerate_set_seed(seed)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        log.info("distributed run: world size %d (%s)", accelerator.num_processes, accelerator.distributed_type)
    return accelerator


# ------------------------------------------------------------------------------------------------- batching

class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a seeded random order that changes every epoch.

    Indices are shuffled, cut into mega-batches of `group` batches, sorted by length inside each, cut into
    batches, and the batches shuffled: randomness of plain shuffling, padding of sorted batching.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, seed: int, shuffle: bool = True, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.group = lengths, batch_size, seed, shuffle, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
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
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def make_loader(dataset, tokenizer, batch_size: int, *, seed: int, shuffle: bool) -> DataLoader:
    """Dynamic padding + length-grouped batches. `dataset` has input_ids/attention_mask/labels columns."""
    lengths = [len(x) for x in dataset["input_ids"]]
    sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, shuffle=shuffle)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(dataset.with_format("python"), batch_sampler=sampler, collate_fn=collate)


def set_loader_epoch(loader, epoch: int) -> None:
    """Reshuffle for a new epoch (accelerate may wrap our sampler)."""
    sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(sampler, "batch_sampler", sampler)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def micro_batch_groups(loader, grad_accum: int) -> Iterator[list[dict]]:
    """The loader's batches in groups of `grad_accum`: one group is one optimizer step."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


def endless_groups(loader, grad_accum: int) -> Iterator[list[dict]]:
    """A step's micro-batches (`micro_batch_groups`), epoch after epoch, reshuffled each epoch, for as long as asked."""
    epoch = 0
    while True:
        set_loader_epoch(loader, epoch)
        yield from micro_batch_groups(loader, grad_accum)
        epoch += 1


def batch_units(batch: dict) -> dict[str, torch.Tensor]:
    """The units a loss term can count: examples (rows) and real, unpadded tokens."""
    mask = batch["attention_mask"]
    return {"rows": torch.tensor(float(mask.shape[0])), "tokens": mask.sum().float()}


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


def normalise(term_sum: torch.Tensor, term_count, unit_in_batch, unit_in_step, world_size: int) -> torch.Tensor:
    """This micro-batch's share of the step's mean: sum / (count per unit · units in the whole step).

    The world_size factor undoes DDP's averaging of gradients across processes, so the gradient is that of
    the global mean.
    """
    per_unit = float(term_count) / max(float(unit_in_batch), 1.0)
    return term_sum * world_size / (per_unit * float(unit_in_step))


# ------------------------------------------------------------------------------------------ optimiser, plan

def plan_steps(num_batches: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    per_epoch = math.ceil(num_batches / grad_accum)
    total = max_steps if max_steps else math.ceil(per_epoch * epochs)
    if total < 1:
        raise UserError("train: no optimizer step to run (too little data for batch_size x grad_accum?)")
    return total


def make_optimizer(params, *, lr: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW (no decay on biases and LayerNorm) with linear warmup then linear decay."""
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------- logging

@dataclass
class History:
    """Per-step loss terms and per-evaluation metrics of one training run, for plots and the report."""

    name: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    writer: object | None = None

    def open_tensorboard(self, log_dir: Path | None, accelerator: Accelerator) -> None:
        if log_dir is not None and accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(log_dir) / self.name))

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.steps.append({"step": step, **values})
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        self.evals.append({"step": step, **values})
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"validation/{k}", v, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "evals": self.evals, "wall_time_s": self.wall_time_s}


# ---------------------------------------------------------------------------------------------- validation

@torch.no_grad()
def predict_logits(model, loader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split, gathered across processes without duplicated samples."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def validation_metrics(model, loader, accelerator: Accelerator) -> dict[str, float]:
    from sklearn.metrics import f1_score

    logits, labels = predict_logits(model, loader, accelerator)
    preds = logits.argmax(-1)
    return {
        "accuracy": float((preds == labels).float().mean()),
        "macro_f1": float(f1_score(labels.numpy(), preds.numpy(), average="macro", zero_division=0)),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


class EarlyStopping:
    """Keeps the best weights by validation accuracy (ties: lower loss); says when patience runs out."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best: tuple[float, float] | None = None
        self.best_state: dict | None = None
        self.bad_evals = 0

    def update(self, model, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when training should stop."""
        score = (metrics["accuracy"], -metrics["loss"])
        if self.best is None or score > self.best:
            self.best, self.bad_evals = score, 0
            unwrapped = getattr(model, "module", model)
            self.best_state = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def restore_best(self, model) -> None:
        if self.best_state is not None:
            getattr(model, "module", model).load_state_dict(self.best_state)


def eval_points(total_steps: int, steps_per_epoch: int, eval_every: int | None) -> set[int]:
    every = eval_every or steps_per_epoch
    points = set(range(every, total_steps + 1, every))
    points.add(total_steps)
    return points


def make_loaders(train_split, val_split, tokenizer, train: TrainConfig):
    """(training loader of micro-batches, validation loader, optimizer steps to run, steps after which to validate)."""
    micro = train.batch_size // train.grad_accum
    train_loader = make_loader(train_split, tokenizer, micro, seed=train.seed, shuffle=True)
    val_loader = make_loader(val_split, tokenizer, 64, seed=train.seed, shuffle=False)
    total_steps = plan_steps(len(train_loader), train.grad_accum, train.epochs, train.max_steps)
    steps_per_epoch = max(1, len(train_loader) // train.grad_accum)
    return train_loader, val_loader, total_steps, eval_points(total_steps, steps_per_epoch, train.eval_every)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def check_finite(loss: torch.Tensor, step: int, terms: dict[str, float]) -> None:
    """Stop with a message naming the step and the loss term that went NaN/inf."""
    if not torch.isfinite(loss):
        bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["total"]
        raise FloatingPointError(f"loss is not finite at step {step} (term: {', '.join(bad)}); "
                                 "lower train.lr or check the data; the last good checkpoint is kept")


# ------------------------------------------------------------------------------ loops where several models learn

@dataclass
class Learner:
    """One model that learns in a loop shared with other learning models (distill/mutual.py, alternating.py): its
    optimiser and schedule, its history and its early stopping. The loop decides when it steps."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    history: History
    stopper: EarlyStopping

    def step(self, step: int, logged: dict[str, float], weights: dict[str, float], accelerator: Accelerator,
             max_grad_norm: float, **extra: float) -> None:
        """Apply the gradients in .grad: check the loss is finite, clip, step optimiser and schedule, log `logged`
        (each term's step mean) with their weighted sum as "loss"."""
        total = sum(weights[t] * v for t, v in logged.items())
        check_finite(torch.tensor(total), step, logged)
        accelerator.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.history.log_step(step, {"loss": total, **logged, **extra})

    def validate(self, step: int, val_loader, accelerator: Accelerator) -> bool:
        """Log validation metrics; True when early stopping says stop."""
        metrics = validation_metrics(self.model, val_loader, accelerator)
        self.history.log_eval(step, metrics)
        return self.stopper.update(self.model, metrics)

    def finish(self, wall_time_s: float) -> History:
        """Leave the best validation weights in the model; close and return the history."""
        self.stopper.restore_best(self.model)
        self.history.wall_time_s = wall_time_s
        self.history.close()
        return self.history


def validate_learners(learners: list[Learner], step: int, val_loader, accelerator: Accelerator) -> bool:
    """Validate every learner (each keeps its best weights); True when the first one's early stopping says stop."""
    stops = [learner.validate(step, val_loader, accelerator) for learner in learners]
    return stops[0]


def make_learner(model, name: str, *, lr: float, total_steps: int, train: TrainConfig, accelerator: Accelerator,
                 log_dir: Path | None, patience: int | None = None, extra: torch.nn.Module | None = None) -> Learner:
    """AdamW at `lr` with `train`'s warmup/decay over `total_steps`, a history called `name` and early stopping
    with `patience` (None: only keeps the best weights). `extra` (e.g. the learned projections of hidden terms)
    is optimised along with `model`. Model and optimiser are prepared by `accelerator`."""
    named = list(model.named_parameters())
    if extra is not None:
        named += list(extra.named_parameters(prefix="extra"))
        extra.to(accelerator.device)
    optimizer, scheduler = make_optimizer(named, lr=lr, weight_decay=train.weight_decay, total_steps=total_steps,
                                          warmup_ratio=train.warmup_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    history = History(name)
    history.open_tensorboard(log_dir, accelerator)
    return Learner(model, [p for _, p in named if p.requires_grad], optimizer, scheduler, history,
                   EarlyStopping(patience))
