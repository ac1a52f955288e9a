"""A learning model (Learner): its optimiser and schedule, history, early stopping, progress, timing, the finiteness
check of a step's loss, and fast dropout."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from kdistill.config import TrainConfig
from kdistill.errors import UserError
from kdistill.training.processes import average_gradients, full_state_dict, shard_model, sum_over_processes
from kdistill.training.validation import accuracy_then_loss

log = logging.getLogger(__name__)


def make_optimizer(params, *, lr: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW (no decay on biases and LayerNorm) with linear warmup then linear decay.

    The fused kernel is used where every parameter allows it: on CPU the default multi-tensor step took 4.7 s for
    a 64M-parameter model on 2 cores, the fused one 0.13 s; same update rule.
    """
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=fused or None)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler

@dataclass
class History:
    """Per-step loss terms and per-evaluation metrics of one training run, for plots and the report."""

    name: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    steps_run: int | None = None
    planned_steps: int | None = None
    stopped: str | None = None
    """Why training ended: "budget" (the planned steps), "patience" (validation stopped improving), "time"."""
    best_step: int | None = None
    """The step of the best validation score (whose weights are kept); None without validation."""
    writer: object | None = None
    log_dir: Path | None = None

    def open_tensorboard(self, log_dir: Path | None, accelerator: Accelerator, purge_step: int | None = None) -> None:
        """TensorBoard events under log_dir/name (main process only). `purge_step`: a resumed run drops the events
        its killed predecessor logged from that step on, so the curves do not double back."""
        self.close()
        self.log_dir = log_dir
        if log_dir is not None and accelerator.is_main_process:
            self.writer = SummaryWriter(str(Path(log_dir) / self.name), purge_step=purge_step)

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

    def record_end(self, steps_run: int, planned_steps: int, stopped: str,
                   score: Callable[[dict[str, float]], tuple[float, ...]]) -> None:
        """How training ended: steps run of the planned ones, why it stopped, and the step whose validation
        `score` was best (the first of equals, as early stopping keeps it)."""
        self.steps_run, self.planned_steps, self.stopped = steps_run, planned_steps, stopped
        best = None
        for e in self.evals:
            if best is None or score(e) > score(best):
                best = e
        self.best_step = best["step"] if best else None

    def budget(self) -> dict:
        """The training budget as run, for metrics.json."""
        return {"steps_run": self.steps_run, "planned_steps": self.planned_steps, "stopped": self.stopped,
                "best_step": self.best_step}

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "evals": self.evals, "wall_time_s": self.wall_time_s,
                **self.budget()}

    def load_dict(self, saved: dict) -> None:
        """Continue from a checkpoint's history (`to_dict`)."""
        self.steps, self.evals, self.wall_time_s = list(saved["steps"]), list(saved["evals"]), saved["wall_time_s"]

class EarlyStopping:
    """Keeps the best weights by a validation score (higher is better); says when patience runs out."""

    def __init__(self, patience: int | None,
                 score: Callable[[dict[str, float]], tuple[float, ...]] = accuracy_then_loss, *,
                 keep_best: bool = True):
        self.patience = patience
        self.score = score
        self.keep_best = keep_best
        """False: the final weights are kept (no copy of the best ones is made)."""
        self.best: tuple[float, ...] | None = None
        self.best_state: dict | None = None
        self.bad_evals = 0

    def update(self, model, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when training should stop."""
        score = self.score(metrics)
        if self.best is None or score > self.best:
            self.best, self.bad_evals = score, 0
            if self.keep_best:
                unwrapped = getattr(model, "module", model)
                self.best_state = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def restore_best(self, model) -> None:
        if self.best_state is not None:
            getattr(model, "module", model).load_state_dict(self.best_state)

def progress(total: int, desc: str, accelerator: Accelerator, initial: int = 0):
    """A step progress bar, in the main process only."""
    return tqdm(total=total, initial=initial, desc=desc, leave=False,
                disable=None if accelerator.is_main_process else True)

class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

class LossNotFinite(UserError, FloatingPointError):
    """The loss went NaN/inf: a too high learning rate or bad data; the run stops (exit 2), its checkpoints kept."""

def check_finite(loss: torch.Tensor, step: int, terms: dict[str, float]) -> None:
    """Stop with a message naming the step and the loss term that went NaN/inf, and what can cause it then: at step 1
    no update has happened, so not the learning rate; checkpoints are kept only where some were saved."""
    if not torch.isfinite(loss):
        bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["total"]
        what = f"loss is not finite at step {step} (term: {', '.join(bad)})"
        inputs = "the data, the initial weights or the teacher's outputs (a stored teacher signal, where the term " \
                 "reads one)"
        if step <= 1:
            raise LossNotFinite(f"{what}, before any weight update, so not train.lr: check {inputs}; no checkpoint "
                                "of this phase was saved")
        raise LossNotFinite(f"{what}; lower train.lr or check {inputs}; checkpoints saved before step {step} "
                            "(train.checkpoint_every), if any, are kept")

class FastDropout(torch.nn.Dropout):
    """Dropout whose mask comes from 15-bit random integers instead of torch's CPU `bernoulli_`.

    On a CPU without Intel's MKL fast paths (measured on a 2-core AMD EPYC, torch 2.13) `bernoulli_` costs more
    than a 384 x 384 matmul over the same activations (~11 ms for 64 x 35 x 384 floats): the dropout layers of a
    2-layer MiniLM student took 17% of its training step; 15-bit integers cut a step by ~10%.
    Same semantics: each element is kept with probability 1 - p (p rounded to a multiple of 2^-15, e.g.
    0.1 -> 0.100006) and scaled by 1 / (1 - p) so the expectation is unchanged; the mask draws from torch's
    generator, so seeded runs repeat. Identity in eval mode, like nn.Dropout; the models it sits in save and
    export as before (it has no weights).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        dropped = round(self.p * 32768)  # of the 15-bit values [0, 32767] each element draws
        # one 63-bit draw gives four 15-bit values: 4x fewer calls to the generator than an int16 tensor's random_
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
        values = draws.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF
        return x * ((values >= dropped) * (32768 / (32768 - dropped)))

def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap `model`'s nn.Dropout layers for FastDropout, in place (for CPU training); how many were swapped.
    The attention-probability dropout inside scaled_dot_product_attention is not a layer and stays torch's."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(module, name, FastDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    return swapped

@dataclass
class Learner:
    """One model that learns in a phase (engine.Engine), alone or with others (distill/mutual.py, alternating.py):
    its optimiser and schedule, its history and its early stopping. The strategy decides when it steps."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    history: History
    stopper: EarlyStopping
    extra: torch.nn.Module | None = None
    """Trained along with `model` but outside DDP (e.g. learned projections): its gradients are averaged here."""
    whole: torch.nn.Module | None = None
    """FSDP: the unsharded model `model` is a sharded copy of; `finish` puts the trained weights back into it."""

    def step(self, step: int, logged: dict[str, float], weights: dict[str, float], accelerator: Accelerator,
             max_grad_norm: float, **extra: float) -> None:
        """Apply the gradients in .grad: check the loss is finite, clip, step optimiser and schedule, log `logged`
        (each term's step mean; with several processes each holds its share, summed here) with their weighted sum as
        "loss"."""
        if accelerator.num_processes > 1:
            logged = sum_over_processes(logged, accelerator)
            if self.extra is not None:
                average_gradients(self.extra, accelerator)
        total = sum(weights[t] * v for t, v in logged.items())
        check_finite(torch.tensor(total), step, logged)
        accelerator.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.history.log_step(step, {"loss": total, **logged, **extra})

    def finish(self, wall_time_s: float) -> History:
        """Leave the best validation weights in the model (unless the stopper keeps the final ones); close and
        return the history."""
        self.stopper.restore_best(self.model)
        if self.whole is not None:  # (every process: gathering the shards is collective)
            self.whole.load_state_dict(full_state_dict(self.model))
        self.history.wall_time_s = wall_time_s
        self.history.close()
        return self.history

def make_learner(model, name: str, *, lr: float, total_steps: int, train: TrainConfig, accelerator: Accelerator,
                 log_dir: Path | None, patience: int | None = None, extra: torch.nn.Module | None = None,
                 score: Callable[[dict[str, float]], tuple[float, ...]] = accuracy_then_loss,
                 keep_best: bool = True) -> Learner:
    """AdamW at `lr` with `train`'s warmup/decay over `total_steps`, a history called `name` and early stopping
    by `score` with `patience` (None: never stops early); `keep_best`: the best validation weights are left in the
    model at the end (else the final ones). `extra` (e.g. the learned projections of hidden terms) is optimised
    along with `model`. Model and optimiser are prepared by `accelerator`."""
    whole = None
    if train.fsdp and accelerator.num_processes > 1:
        whole, model = model, shard_model(model, accelerator)
    elif train.fsdp:
        log.info("%s: train.fsdp: one process, nothing to shard (launch with torchrun or accelerate)", name)
    if accelerator.device.type == "cpu":  # (CUDA's dropout is a fused kernel, faster than FastDropout's three)
        use_fast_dropout(model)
    named = list(model.named_parameters())  # (sharded: the DTensor parameters that the optimizer steps)
    if extra is not None:
        named += list(extra.named_parameters(prefix="extra"))
        extra.to(accelerator.device)
        if accelerator.num_processes > 1:  # what DDP does for the model: every process starts from the main one's
            for p in extra.parameters():
                p.data.copy_(broadcast(p.data, from_process=0))
    optimizer, scheduler = make_optimizer(named, lr=lr, weight_decay=train.weight_decay, total_steps=total_steps,
                                          warmup_ratio=train.warmup_ratio)
    if whole is None:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:  # already sharded: accelerate would wrap it in DDP as well
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    history = History(name)
    history.open_tensorboard(log_dir, accelerator)
    return Learner(model, [p for _, p in named if p.requires_grad], optimizer, scheduler, history,
                   EarlyStopping(patience, score, keep_best=keep_best), extra, whole)
