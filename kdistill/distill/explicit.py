"""Explicit distillation: a frozen teacher, a student that learns its soft outputs, internals and the labels.

The teacher never learns here: it is in eval mode, its parameters do not require grad, and it runs under
`torch.no_grad()`. When only its logits matter (terms kd/ce), they are computed once before training and read
from a cache every epoch ("cache_teacher: auto").

The loop is the one every strategy shares (training.py: loaders, AdamW and schedule, the step-normalised loss,
logging, validation and early stopping); what is explicit's own is here: the frozen teacher and its cache. With
`checkpoints` it writes resumable state every `train.checkpoint_every` steps and at epoch ends, and continues from
the last one (checkpoint.py). It also runs in several processes (DDP; see training.py for how a batch is split).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdistill import losses
from kdistill.checkpoint import Checkpoints
from kdistill.config import DistillConfig, TrainConfig
from kdistill.data import DataBundle, tokenize_splits
from kdistill.distill.terms import TermSpec, compute_terms, step_loss, step_temperature
from kdistill.features import capture, ensure_eager_attention
from kdistill.training import (
    GroupStream,
    History,
    Timer,
    batch_units,
    make_accelerator,
    make_learner,
    make_loader,
    make_loaders,
    progress,
    set_seed,
    step_units,
)

log = logging.getLogger(__name__)


def with_index(encoded):
    """Each training example carries its row index, so cached teacher outputs can be looked up."""
    return encoded.add_column("idx", list(range(len(encoded))))


@torch.no_grad()
def cache_teacher_logits(teachers, encoded_train, tokenizer, accelerator) -> list[torch.Tensor]:
    """Each frozen teacher's logits for every training example, (N, C), in row order (every process: all rows)."""
    loader = make_loader(encoded_train.remove_columns(["idx"]) if "idx" in encoded_train.column_names
                         else encoded_train, tokenizer, 64, seed=0, shuffle=False)
    order = torch.tensor([i for batch in loader.batch_sampler for i in batch])
    cached = []
    for teacher in teachers:
        teacher.to(accelerator.device)
        logits = []
        for batch in tqdm(loader, desc="caching teacher logits", leave=False,
                          disable=None if accelerator.is_main_process else True):
            batch.pop("labels")
            logits.append(teacher(**{k: v.to(accelerator.device) for k, v in batch.items()}).logits.float().cpu())
        flat = torch.cat(logits)
        table = torch.empty_like(flat)
        table[order] = flat
        cached.append(table)
    return cached


def distill_explicit(student, teachers: list, tokenizer, data: DataBundle, *, spec: TermSpec,
                     distill: DistillConfig, train: TrainConfig, max_length: int, name: str = "student",
                     log_dir: Path | None = None, checkpoints: Checkpoints | None = None) -> History:
    """Train `student` against frozen `teachers` (the first is the main one; several average their soft targets).

    Leaves the best validation weights in `student`; returns the history with every loss term per step.
    `checkpoints`: where to save resumable state, and whether to continue from the last one saved there.
    """
    set_seed(train.seed)
    accelerator = make_accelerator(train)
    needs_teacher = "kd" in spec.active or spec.needs_teacher_features
    if needs_teacher and not teachers:
        raise ValueError(f"loss terms {sorted(spec.active)} need a teacher")
    for teacher in teachers:
        teacher.eval()  # the teacher never learns: no dropout, no gradient
        teacher.requires_grad_(False)
    if spec.needs_attentions:
        for model in (student, teachers[0]):
            ensure_eager_attention(model)

    encoded = tokenize_splits(data, tokenizer, max_length)
    encoded_train = with_index(encoded["train"])
    use_cache = needs_teacher and (distill.cache_teacher == "on" or (distill.cache_teacher == "auto"
                                                                      and not spec.needs_teacher_features))
    if use_cache and spec.needs_teacher_features:
        raise ValueError("distill.cache_teacher: on caches logits only, but the loss terms "
                         f"{sorted(set(spec.active) - {'kd', 'ce'})} need the teacher's internals; use auto")
    cached = cache_teacher_logits(teachers, encoded_train, tokenizer, accelerator) if use_cache else None

    train_loader, val_loader, total_steps, evals_at = make_loaders(encoded_train, encoded["validation"], tokenizer,
                                                                   train, accelerator)
    learner = make_learner(student, name, lr=train.lr, total_steps=total_steps, train=train, accelerator=accelerator,
                           log_dir=log_dir, patience=train.early_stopping_patience, extra=spec.projections)
    student = learner.model  # (wrapped for DDP when several processes run)
    if not use_cache:
        teachers = [t.to(accelerator.device) for t in teachers]
    batches = GroupStream(train_loader, train.grad_accum, device=accelerator.device)
    step, earlier_s = checkpoints.restore(learner, batches, accelerator) if checkpoints else (0, 0.0)
    weights = spec.active
    flags = dict(hidden_states=spec.needs_hidden, attentions=spec.needs_attentions, qkv=spec.needs_qkv)

    bar = progress(total_steps, f"distill {name}", accelerator, initial=step)
    with Timer() as timer:
        student.train()
        for group in batches:
            temperature = step_temperature(distill, step, total_steps)
            units = step_units(group, accelerator)
            logged = {}
            for i, batch in enumerate(group):  # batch: input_ids (B, L), attention_mask (B, L), labels (B,), idx (B,)
                labels, idx = batch.pop("labels"), batch.pop("idx")
                sync = accelerator.no_sync(student) if i < len(group) - 1 else nullcontext()
                with sync:
                    teacher_feats, teacher_log_probs, teacher_logits = None, None, []
                    if cached is not None:  # (B, C) from the cache: the teacher does not run at all
                        teacher_logits = [c[idx.cpu()].to(accelerator.device) for c in cached]
                    elif needs_teacher:  # (without: supervised training, e.g. the no-KD baseline)
                        with torch.no_grad():  # frozen teacher(s)
                            teacher_feats = capture(teachers[0], batch, **flags)
                            teacher_logits = [teacher_feats.logits] + [t(**batch).logits for t in teachers[1:]]
                    if len(teacher_logits) > 1 or (cached is not None and "kd" in weights):
                        teacher_log_probs = losses.average_teacher_logprobs(
                            teacher_logits, temperature=temperature, weights=distill.teacher_weights)
                    student_feats = capture(student, batch, **flags)
                    terms = compute_terms(spec, student_feats, teacher_feats, labels, temperature=temperature,
                                          teacher_log_probs=teacher_log_probs)
                    accelerator.backward(step_loss(terms, weights, batch_units(batch), units,
                                                   accelerator.num_processes, logged))
            step += 1
            learner.step(step, logged, weights, accelerator, train.max_grad_norm, temperature=temperature)
            bar.update(1)
            stop = step in evals_at and learner.validate(step, val_loader, accelerator)
            if stop or step >= total_steps:
                break
            if checkpoints and checkpoints.due(step, batches):
                checkpoints.save(step, learner, batches, accelerator, wall_time_s=earlier_s + timer.elapsed)
    bar.close()
    return learner.finish(earlier_s + timer.seconds)
