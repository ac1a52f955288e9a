"""The distillation phase: the recipe's strategy (kdistill/strategies/) run on the student, with the run's terms,
and TinyBERT's two stages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from datasets import DatasetDict

from kdistill.checkpoint import Checkpoints
from kdistill.config import RunConfig
from kdistill.strategies.alternating import distill_alternating
from kdistill.strategies.explicit import distill_explicit
from kdistill.strategies.mutual import distill_mutual
from kdistill.strategies.phase import Phase
from kdistill.errors import UserError
from kdistill.features import Pooling
from kdistill.models import load_model_dir
from kdistill.pipeline.common import save_history
from kdistill.pipeline.students import term_spec
from kdistill.task import get_task
from kdistill.terms import split_stages
from kdistill.training import History, is_main_process

log = logging.getLogger(__name__)


def distill_student(cfg: RunConfig, teacher, tokenizer, encoded: DatasetDict, run_dir: Path, init_layers, student,
                    checkpoints: Checkpoints | None = None, teacher_tokenizer=None, teacher_train=None,
                    pooling: Pooling | None = None):
    """Run the configured strategy; returns the student's history (and the teacher's, if it kept learning).
    `tokenizer`, `encoded`: the student's tokenizer and splits; `teacher_tokenizer`, `teacher_train`: the teachers'
    tokenizer and training split, where they differ (explicit only, check_tokenizers). `pooling`: sentence encoders
    (explicit only: the student learns the teacher's pooled sentence embeddings)."""
    spec = term_spec(cfg, teacher, student, init_layers)
    extra = [load_model_dir(p)[0] for p in cfg.distill.extra_teachers]
    strategy = cfg.distill.strategy
    if extra and strategy != "explicit":
        raise UserError(f"distill.extra_teachers works with strategy explicit, not {strategy}")
    phase = Phase(student, [teacher, *extra], tokenizer, encoded, spec, cfg.distill, cfg.train, get_task(cfg.task),
                  log_dir=run_dir / "logs", checkpoints=checkpoints)
    if strategy == "explicit":
        # work_dir: the teacher hidden-state cache goes on the run dir's disk, not in a possibly small $TMPDIR
        explicit = partial(distill_explicit, work_dir=run_dir, teacher_tokenizer=teacher_tokenizer,
                           teacher_train=teacher_train, pooling=pooling)
        if cfg.distill.intermediate_epochs is None:
            return explicit(phase), None
        return distill_two_stages(cfg, explicit, phase, run_dir), None
    if strategy == "mutual":
        return distill_mutual(phase)
    return distill_alternating(phase)


def distill_two_stages(cfg: RunConfig, explicit: Callable[..., History], phase: Phase, run_dir: Path) -> History:
    """TinyBERT's two stages (distill.intermediate_epochs): the intermediate terms alone, keeping the final weights,
    then the prediction terms for train.epochs. `explicit`: distill_explicit with its strategy's own keywords bound.
    Returns the second stage's history, with the training time of both."""
    intermediate, prediction = split_stages(phase.spec.weights)
    checkpoints = phase.checkpoints
    if checkpoints is not None and checkpoints.resume and checkpoints.latest() is not None:
        log.info("student: the intermediate stage ended before the run was resumed; the prediction stage continues")
        first_seconds = 0.0  # (its time is not in the second stage's checkpoint)
    else:
        first_train = cfg.train.model_copy(update=dict(epochs=cfg.distill.intermediate_epochs, max_steps=None,
                                                       early_stopping_patience=None))
        first = explicit(replace(phase, name="student-intermediate", spec=replace(phase.spec, weights=intermediate),
                                 train=first_train,
                                 checkpoints=checkpoints.stage("intermediate") if checkpoints else None),
                         keep_best=False)
        if is_main_process():
            save_history(run_dir, first)
        first_seconds = first.wall_time_s
    history = explicit(replace(phase, spec=replace(phase.spec, weights=prediction)))
    history.wall_time_s += first_seconds  # the student's training time: both stages
    return history
