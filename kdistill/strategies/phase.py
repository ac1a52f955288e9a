"""One training phase as the pipeline hands it to every strategy, and the one place a phase's engine is built.

A strategy (explicit.py, mutual.py, alternating.py, causal.py) receives a `Phase`: the model that learns, its
teachers, tokenizer and data, the run's terms and recipe sections, its name, logs and checkpoints. What is a
strategy's own (a teacher cache's work dir, a causal LM's pad id) stays a keyword of that strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from kdistill.checkpoint import Checkpoints
from kdistill.config import DistillConfig, TrainConfig
from kdistill.engine import Engine
from kdistill.terms import TermSpec
from kdistill.training import GroupStream, Learner, make_accelerator, set_seed


@dataclass
class Phase:
    """Who learns, from whom, on what, under which terms and settings, and where its logs and checkpoints go."""

    student: nn.Module
    """The model that learns (its final or best weights are left in it)."""
    teachers: list[nn.Module]
    """The teachers: frozen ones (explicit: the first is the main one; causal LM: one) or the one that learns too
    (mutual, alternating); [] for none (supervised training, a causal LM's LM-only control)."""
    tokenizer: Any
    """The student's tokenizer."""
    data: Mapping[str, Any]
    """The splits it trains and validates on, "train" and "validation": encoded datasets (encoder tasks, in the
    student's tokenization) or LMBlocks (causal LM)."""
    spec: TermSpec
    """The run's loss terms: weights, layer pairs, options, projections."""
    distill: DistillConfig
    train: TrainConfig
    task: Any
    """The run's task (kdistill.task.Task, or its name): what each term's count counts."""
    name: str = "student"
    """The history's name (student, baseline, teacher, ...)."""
    log_dir: Path | None = None
    checkpoints: Checkpoints | None = None
    """Where to save resumable state, and whether to resume from it."""

    @property
    def teacher(self) -> nn.Module | None:
        """The main teacher, None without one."""
        return self.teachers[0] if self.teachers else None

    def start(self) -> Accelerator:
        """Every strategy's first two steps: seed every generator, then the phase's accelerator."""
        set_seed(self.train.seed)
        return make_accelerator(self.train)

    def engine(self, accelerator: Accelerator, learners: list[Learner], stream: GroupStream, total_steps: int,
               evals_at: set[int], validate: Callable[[nn.Module], dict[str, float]], desc: str, *,
               side_streams: dict[str, GroupStream] | None = None) -> Engine:
        """The phase's engine: its learners (the first one's early stopping decides), data, plan and validation;
        gradient clipping, checkpoints and the task's units from the phase."""
        return Engine(accelerator, learners, stream, total_steps, evals_at, validate, self.train.max_grad_norm, desc,
                      self.checkpoints, side_streams or {}, task=self.task, max_minutes=self.train.max_minutes)
