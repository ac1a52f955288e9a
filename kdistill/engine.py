"""The one step engine every strategy and task trains through.

A strategy (distill/*.py) says what is its own: who learns, from what, and in which order within a step. It hands
the engine a `take_step(step, group)` function that, for the optimizer step numbered `step` (0-based: the steps
already taken), runs the forwards and backwards of the step's micro-batches (`Engine.backward`) and applies the
gradients of whichever learners step now (`Engine.apply`). The engine does the rest, the same way for everyone:

    for each step's group of micro-batches (GroupStream: epochs, reshuffling, the data position)
        take_step(step, group)                      the strategy's own part
        progress bar
        validation at the planned steps: every learner keeps its best weights, the first one decides when to stop
        a checkpoint when due: every learner (weights, optimizer, schedule, history, early stopping), every
            stream's data position, every process's RNG states (checkpoint.py)
    at the end: each learner's best (or final) weights left in its model, its history returned

So every strategy and task (classification, causal LM) checkpoints and resumes after a kill exactly, and runs in
several processes where its learners do (mutual and alternating step several models and stay in one process).

Loss normalisation (`backward`): each term's (sum, count) is divided by that term's count over the WHOLE step (all
micro-batches, all processes; terms.step_loss), so gradient accumulation and several processes give the loss of
one big batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast

from kdistill.checkpoint import Checkpoints
from kdistill.terms import TERMS, step_loss
from kdistill.training import GroupStream, History, Learner, Timer, batch_units, progress, step_units

log = logging.getLogger(__name__)

Terms = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Engine:
    """One training phase: its learners, its data streams, its plan (steps, validation points) and checkpoints."""

    accelerator: Accelerator
    learners: list[Learner]
    """Every model that learns in this phase; the first one's early stopping decides when the phase stops."""
    stream: GroupStream
    """The training data: one group of micro-batches per optimizer step."""
    total_steps: int
    evals_at: set[int]
    validate: Callable[[torch.nn.Module], dict[str, float]]
    """Validation metrics of one model (each learner's early stopping scores them)."""
    max_grad_norm: float
    desc: str
    checkpoints: Checkpoints | None = None
    side_streams: dict[str, GroupStream] = field(default_factory=dict)
    """More data the strategy draws from (e.g. alternating's quiz set); their positions are checkpointed too."""
    task: Any = None
    """The task (kdistill.tasks): which unit each term counts (its term_units: hidden terms count tokens, or the
    next-token targets of a causal LM)."""
    max_minutes: float | None = None
    """A wall-time cap: the phase stops at the first step past it (validated there unless just validated)."""

    @property
    def streams(self) -> dict[str, GroupStream]:
        return {"train": self.stream, **self.side_streams}

    def backward(self, group: list[dict], terms_of: Callable[[dict], list[tuple[Terms, dict[str, float]]]],
                 logged: list[dict[str, float]], sync: torch.nn.Module | None = None) -> None:
        """`backward_group` with this phase's accelerator and task."""
        backward_group(self.accelerator, group, terms_of, logged, sync=sync, task=self.task)

    def apply(self, learner: Learner, step: int, logged: dict[str, float], weights: dict[str, float],
              **extra: float) -> None:
        """Step `learner`'s optimizer with the gradients in .grad; log the step as number `step`."""
        learner.step(step, logged, weights, self.accelerator, self.max_grad_norm, **extra)

    def run(self, take_step: Callable[[int, list[dict]], None]) -> list[History]:
        """Train to the end of the plan (or early stopping); returns each learner's history, in order."""
        step, earlier_s = (self.checkpoints.restore(self.learners, self.streams, self.accelerator)
                           if self.checkpoints else (0, 0.0))
        bar = progress(self.total_steps, self.desc, self.accelerator, initial=step)
        stopped = "budget"
        with Timer() as timer:
            for learner in self.learners:
                learner.model.train()
            for group in self.stream:
                if step >= self.total_steps:  # (a run resumed from its last step's checkpoint)
                    break
                take_step(step, group)
                step += 1
                bar.update(1)
                validated = step in self.evals_at
                if validated and self.validate_all(step):
                    stopped = "patience"
                    break
                if step >= self.total_steps:
                    break
                if self.out_of_time(earlier_s + timer.elapsed):
                    if not validated:  # its last weights may be its best: score them before stopping
                        self.validate_all(step)
                    stopped = "time"
                    log.info("%s: stopped at step %d of %d: train time cap of %g minutes reached", self.desc, step,
                             self.total_steps, self.max_minutes)
                    break
                if self.checkpoints and self.checkpoints.due(step, self.stream):
                    self.checkpoints.save(step, self.learners, self.streams, self.accelerator,
                                          wall_time_s=earlier_s + timer.elapsed)
        bar.close()
        for learner in self.learners:
            learner.history.record_end(step, self.total_steps, stopped, learner.stopper.score)
        return [learner.finish(earlier_s + timer.seconds) for learner in self.learners]

    def out_of_time(self, elapsed_s: float) -> bool:
        """Whether the time cap is reached; with several processes, the main one's clock decides for all (each
        must stop at the same step)."""
        if self.max_minutes is None:
            return False
        over = torch.tensor(float(elapsed_s >= 60 * self.max_minutes), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            over = broadcast(over, from_process=0)
        return bool(over)

    def validate_all(self, step: int) -> bool:
        """Validate every learner (each keeps its best weights); True when the first one's early stopping says
        stop."""
        stops = []
        for learner in self.learners:
            metrics = self.validate(learner.model)
            learner.history.log_eval(step, metrics)
            if self.accelerator.is_main_process:
                log.info("%s: step %d, validation %s", learner.history.name, step,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            stops.append(learner.stopper.update(learner.model, metrics))
        return stops[0]


def backward_group(accelerator: Accelerator, group: list[dict],
                   terms_of: Callable[[dict], list[tuple[Terms, dict[str, float]]]], logged: list[dict[str, float]],
                   *, task, sync: torch.nn.Module | None = None) -> None:
    """Forward and backward every micro-batch of one step; the gradients add up to those of the step's loss.

    `terms_of(batch)` gives, for each model that learns from this batch, (its terms' (sum, count), their weights);
    their step-normalised weighted sum is what is differentiated, each model's share logged into the matching
    `logged` dict (summed over the micro-batches: the step mean on this process; a term that nothing in the whole step
    counted, e.g. ce on a group of unlabeled transfer rows, is left out, not logged as 0). `sync`: the DDP-wrapped model
    whose gradients are all-reduced once, on the last micro-batch only."""
    units = step_units(group, accelerator)
    world = accelerator.num_processes
    for i, batch in enumerate(group):
        in_batch = batch_units(batch)  # (before terms_of pops the labels)
        context = accelerator.no_sync(sync) if sync is not None and i < len(group) - 1 else nullcontext()
        with context:
            loss = 0.0
            for (terms, weights), into in zip(terms_of(batch), logged):
                loss = loss + step_loss(terms, weights, in_batch, units, world, into, task=task)
            if torch.is_tensor(loss):  # (a micro-batch may hold nothing the terms count)
                accelerator.backward(loss)
    # an uncounted term's sum is 0 (losses sum counted items only): the step's loss is unchanged; the units are summed
    # over all processes, so every process leaves out the same terms
    for into in logged:
        for term in [t for t in into if t in TERMS and not float(units.get(TERMS[t].unit_for(task), 1.0))]:
            del into[term]
