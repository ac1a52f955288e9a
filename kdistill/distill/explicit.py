"""Explicit distillation: a frozen teacher, a student that learns its soft outputs, internals and the labels.

The teacher never learns here: it is in eval mode, its parameters do not require grad, and it runs under
`torch.no_grad()`. When only its logits matter (terms kd/ce), they are computed once before training and read
from a cache every epoch ("cache_teacher: auto").
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdistill import losses
from kdistill.config import DistillConfig, TrainConfig
from kdistill.data import DataBundle, tokenize_splits
from kdistill.distill.terms import UNITS, TermSpec, compute_terms
from kdistill.features import capture, ensure_eager_attention
from kdistill.training import (
    EarlyStopping,
    History,
    Timer,
    check_finite,
    eval_points,
    make_accelerator,
    make_loader,
    make_optimizer,
    micro_batch_groups,
    normalise,
    plan_steps,
    set_loader_epoch,
    set_seed,
    step_units,
    validation_metrics,
)

log = logging.getLogger(__name__)


def with_index(encoded):
    """Each training example carries its row index, so cached teacher outputs can be looked up."""
    return encoded.add_column("idx", list(range(len(encoded))))


@torch.no_grad()
def cache_teacher_logits(teachers, encoded_train, tokenizer, accelerator) -> list[torch.Tensor]:
    """Each frozen teacher's logits for every training example, (N, C), in row order."""
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
                     log_dir: Path | None = None) -> History:
    """Train `student` against frozen `teachers` (the first is the main one; several average their soft targets).

    Leaves the best validation weights in `student`; returns the history with every loss term per step.
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

    micro = train.batch_size // train.grad_accum
    train_loader = make_loader(encoded_train, tokenizer, micro, seed=train.seed, shuffle=True)
    val_loader = make_loader(encoded["validation"], tokenizer, 64, seed=train.seed, shuffle=False)
    total_steps = plan_steps(len(train_loader), train.grad_accum, train.epochs, train.max_steps)
    steps_per_epoch = max(1, len(train_loader) // train.grad_accum)
    trainable = list(student.named_parameters()) + list(spec.projections.named_parameters(prefix="projections"))
    optimizer, scheduler = make_optimizer(trainable, lr=train.lr, weight_decay=train.weight_decay,
                                          total_steps=total_steps, warmup_ratio=train.warmup_ratio)
    student, spec.projections, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        student, spec.projections, optimizer, train_loader, val_loader, scheduler)
    if not use_cache:
        teachers = [t.to(accelerator.device) for t in teachers]

    history = History(name)
    history.open_tensorboard(log_dir, accelerator)
    stopper = EarlyStopping(train.early_stopping_patience)
    evals_at = eval_points(total_steps, steps_per_epoch, train.eval_every)
    weights = spec.active
    step, epoch = 0, 0
    bar = tqdm(total=total_steps, desc=f"distill {name}", disable=None if accelerator.is_main_process else True, leave=False)
    with Timer() as timer:
        student.train()
        while step < total_steps:
            set_loader_epoch(train_loader, epoch)
            for group in micro_batch_groups(train_loader, train.grad_accum):
                temperature = losses.temperature_at(step, total_steps, start=distill.temperature,
                                                    end=distill.temperature_end,
                                                    schedule=distill.temperature_schedule)
                units = step_units(group, accelerator)
                logged = dict.fromkeys(weights, 0.0)
                for i, batch in enumerate(group):
                    labels, idx = batch.pop("labels"), batch.pop("idx")
                    batch_units = {"rows": labels.shape[0], "tokens": batch["attention_mask"].sum()}
                    sync = accelerator.no_sync(student) if i < len(group) - 1 else nullcontext()
                    with sync:
                        teacher_feats, teacher_log_probs, teacher_logits = None, None, []
                        if cached is not None:  # (B, C) from the cache: the teacher does not run at all
                            teacher_logits = [c[idx.cpu()].to(accelerator.device) for c in cached]
                        elif needs_teacher:  # (without: supervised training, e.g. the no-KD baseline)
                            with torch.no_grad():  # frozen teacher(s)
                                teacher_feats = capture(teachers[0], batch, hidden_states=spec.needs_hidden,
                                                        attentions=spec.needs_attentions, qkv=spec.needs_qkv)
                                teacher_logits = [teacher_feats.logits] + [t(**batch).logits for t in teachers[1:]]
                        if len(teacher_logits) > 1 or (cached is not None and "kd" in weights):
                            teacher_log_probs = losses.average_teacher_logprobs(
                                teacher_logits, temperature=temperature, weights=distill.teacher_weights)
                        student_feats = capture(student, batch, hidden_states=spec.needs_hidden,
                                                attentions=spec.needs_attentions, qkv=spec.needs_qkv)
                        terms = compute_terms(spec, student_feats, teacher_feats, labels, temperature=temperature,
                                              teacher_log_probs=teacher_log_probs)
                        loss = 0.0
                        for term, (term_sum, term_count) in terms.items():
                            unit = UNITS[term]
                            part = normalise(term_sum, term_count, batch_units[unit], units[unit],
                                             accelerator.num_processes)
                            loss = loss + weights[term] * part
                            logged[term] += part.item() / accelerator.num_processes
                        accelerator.backward(loss)
                step += 1
                total = sum(weights[t] * v for t, v in logged.items())
                check_finite(torch.tensor(total), step, logged)
                accelerator.clip_grad_norm_(list(student.parameters()) + list(spec.projections.parameters()),
                                            train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                bar.update(1)
                history.log_step(step, {"loss": total, **logged, "temperature": temperature})
                if step in evals_at:
                    metrics = validation_metrics(student, val_loader, accelerator)
                    history.log_eval(step, metrics)
                    bar.set_postfix(val_acc=f"{metrics['accuracy']:.3f}")
                    log.info("%s: step %d/%d, validation accuracy %.4f", name, step, total_steps,
                             metrics["accuracy"])
                    if stopper.update(student, metrics):
                        step = total_steps
                if step >= total_steps:
                    break
            epoch += 1
    bar.close()
    stopper.restore_best(student)
    history.wall_time_s = timer.seconds
    history.close()
    return history

