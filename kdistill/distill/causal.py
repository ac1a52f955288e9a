"""Distillation of causal LMs: a frozen teacher, a student that learns its next-token distributions.

Per optimizer step, the data comes from one of three sources (GKD, Agarwal et al. 2024, unifies them):
  - the dataset's packed blocks (with probability 1 − λ − μ), teacher outputs from the top-k cache when there is
    one (the teacher does not run), else from a live teacher forward;
  - the student's own continuations of the blocks' first halves (probability λ = distill.on_policy_fraction;
    GKD's on-policy data): sampled at T = 1, then scored by the live teacher; the `lm` term is dropped on these
    steps (its targets would be the student's own samples);
  - the teacher's continuations (probability μ = distill.seq_kd_fraction; sequence-level KD, Kim & Rush 2016):
    sampled from the teacher, every term applies with them as the data.
On generated steps only the generated tokens are targets, and the teacher runs live (the cache covers the
dataset only).

Terms (`distill.losses`, weight per term), token-level, at `distill.temperature` (T² scaling, see losses.py):
forward_kl, reverse_kl, jsd (generalised JSD with `distill.gjsd_beta`), skew_kl, skew_reverse_kl (DistiLLM, with
`distill.skew_alpha`), lm (next-token CE on the data), and optionally hidden_mse / hidden_cosine /
embedding_mse (hidden-state alignment over the layer pairs; needs the live teacher, so no cache). With the
cache, the divergences compare the two distributions renormalised over the teacher's stored top-k support
(see kdistill/cache.py).

Normalisation: every term's (sum, count) is divided by the number of target tokens of the WHOLE optimizer step
(all micro-batches, all processes; `training.normalise`), never per micro-batch, so `train.grad_accum` and data
parallelism give the same loss and gradients as one big batch.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kdistill import losses
from kdistill.causal_lm import LMBlocks, next_token_targets, perplexity
from kdistill.config import DistillConfig, TrainConfig
from kdistill.distill.terms import LM_TERMS, TermSpec
from kdistill.features import capture
from kdistill.training import (
    EarlyStopping,
    History,
    LengthGroupedSampler,
    Timer,
    check_finite,
    eval_points,
    make_accelerator,
    make_optimizer,
    micro_batch_groups,
    normalise,
    plan_steps,
    set_loader_epoch,
    set_seed,
)

log = logging.getLogger(__name__)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
HIDDEN_LM_TERMS = ("hidden_mse", "hidden_cosine", "embedding_mse")


def check_terms(weights: dict[str, float]) -> None:
    """Raise ValueError naming any term that has no meaning for a causal LM."""
    allowed = set(LM_TERMS) | set(HIDDEN_LM_TERMS)
    bad = sorted(t for t, w in weights.items() if w > 0 and t not in allowed)
    if bad:
        raise ValueError(f"term(s) {', '.join(bad)} do not apply to causal-lm; use "
                         f"{', '.join(LM_TERMS + HIDDEN_LM_TERMS)}")


def lm_only_spec() -> TermSpec:
    """The no-KD control: the LM loss on the data, nothing from a teacher."""
    return TermSpec({"lm": 1.0}, [])


# --------------------------------------------------------------------------------------------------- batches


class _Blocks(Dataset):
    def __init__(self, blocks: LMBlocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks.input_ids[i], "attention_mask": self.blocks.attention_mask[i],
                "idx": torch.tensor(i)}


def make_block_loader(blocks: LMBlocks, batch_size: int, *, seed: int, shuffle: bool = True) -> DataLoader:
    """Batches of whole blocks in a seeded order that changes every epoch (`set_loader_epoch`)."""
    lengths = [int(m) for m in blocks.attention_mask.sum(1)]
    sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, shuffle=shuffle)
    return DataLoader(_Blocks(blocks), batch_sampler=sampler)


def with_targets(batch: dict, prompt_length: int = 0) -> dict:
    """Add labels (B, L) and the target mask valid (B, L) (see causal_lm.next_token_targets)."""
    labels, valid = next_token_targets(batch["input_ids"], batch["attention_mask"], prompt_length)
    return {**batch, "labels": labels, "valid": valid}


@torch.no_grad()
def generate_continuations(model, batch: dict, *, pad_id: int, eos_id: int | None) -> dict:
    """Keep each block's first half as the prompt and sample the rest from `model` (T = 1, full vocabulary).

    Returns a batch of the same shape (B, L): generated tokens after the prompt, padding (mask 0) after an EOS
    or when generation stopped early; only the generated tokens are targets. No `idx`: no cache row matches.
    """
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    length = input_ids.shape[1]
    prompt_length = max(1, length // 2)
    prompt = input_ids[:, :prompt_length]
    if not bool(mask[:, :prompt_length].all()):  # a padded last block: use its real prefix only where full
        keep = mask[:, :prompt_length].all(1)
        prompt, input_ids, mask = prompt[keep], input_ids[keep], mask[keep]
        if prompt.shape[0] == 0:
            return with_targets({"input_ids": input_ids, "attention_mask": mask}, length)  # nothing counts
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length - prompt_length,
                             pad_token_id=pad_id, eos_token_id=eos_id)
    finally:
        model.train(was_training)
    out = out[:, :length]
    ids = torch.full((out.shape[0], length), pad_id, dtype=out.dtype, device=out.device)
    ids[:, : out.shape[1]] = out
    new_mask = torch.zeros_like(ids)
    new_mask[:, : out.shape[1]] = 1
    if eos_id is not None:  # everything after the first generated EOS is padding (the EOS itself is a target)
        generated = ids[:, prompt_length:]
        after_eos = (generated == eos_id).long().cumsum(1) - (generated == eos_id).long()
        new_mask[:, prompt_length:] &= (after_eos == 0).long()
    ids = torch.where(new_mask.bool(), ids, torch.full_like(ids, pad_id))
    return with_targets({"input_ids": ids, "attention_mask": new_mask}, prompt_length)


# ------------------------------------------------------------------------------------------------------ terms


def lm_terms(spec: TermSpec, distill: DistillConfig, student, batch: dict, *, temperature: float,
             teacher_logits: torch.Tensor | None = None, teacher_topk: tuple | None = None, teacher_feats=None,
             skip: tuple[str, ...] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(sum, count) of every active term over the batch's target positions (`valid`).

    student, teacher_feats: `features.Features`. The teacher side is full logits (B, L, V), or the cached
    top-k (log-probs (B, L, K), ids (B, L, K)), in which case the student's logits are gathered at the same ids
    and both sides are renormalised over them.
    """
    valid = batch["valid"]
    logits = student.logits.float()
    if teacher_topk is not None:
        t_side, t_ids = teacher_topk
        s_side = logits.gather(-1, t_ids)  # (B, L, K): the student's logits on the teacher's support
    else:
        s_side, t_side = logits, None if teacher_logits is None else teacher_logits.float()
    out = {}
    for term in spec.active:
        if term in skip:
            continue
        if term == "lm":
            out[term] = losses.lm_ce_tokens(logits, batch["labels"], mask=valid)
        elif term in DIVERGENCES:
            if t_side is None:
                raise ValueError(f"loss term '{term}' needs the teacher's outputs")
            kw = {"temperature": temperature, "mask": valid}
            if term == "forward_kl":
                out[term] = losses.forward_kl_tokens(s_side, t_side, **kw)
            elif term == "reverse_kl":
                out[term] = losses.reverse_kl_tokens(s_side, t_side, **kw)
            elif term == "jsd":
                out[term] = losses.generalized_jsd_tokens(s_side, t_side, beta=distill.gjsd_beta, **kw)
            elif term == "skew_kl":
                out[term] = losses.skew_kl_tokens(s_side, t_side, alpha=distill.skew_alpha, **kw)
            else:
                out[term] = losses.skew_reverse_kl_tokens(s_side, t_side, alpha=distill.skew_alpha, **kw)
        elif term in HIDDEN_LM_TERMS:
            if teacher_feats is None:
                raise ValueError(f"loss term '{term}' needs the live teacher's hidden states")
            proj = spec.projections["hidden"] if "hidden" in spec.projections else None
            if term == "embedding_mse":
                out[term] = losses.hidden_mse(student.hidden_states[0], teacher_feats.hidden_states[0], mask=valid,
                                              projection=proj)
            else:
                fn = losses.hidden_mse if term == "hidden_mse" else losses.hidden_cosine
                total, count = 0.0, 0.0
                for s, t in spec.pairs:
                    term_sum, term_count = fn(student.hidden_states[s], teacher_feats.hidden_states[t], mask=valid,
                                              projection=proj)
                    total, count = total + term_sum, count + float(term_count)
                out[term] = (total, count)
        else:
            raise ValueError(f"loss term '{term}' does not apply to causal-lm")
    return out


def accumulate_step(student, teacher, group: list[dict], *, spec: TermSpec, distill: DistillConfig,
                    temperature: float, accelerator, cache=None, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Forward and backward every micro-batch of one optimizer step; the gradients add up to those of the
    step's mean loss over all its target tokens. Returns each term's value (the step mean) for logging.

    group: micro-batches with input_ids, attention_mask, labels, valid (and idx for cache rows).
    """
    targets = torch.tensor([float(b["valid"].sum()) for b in group], device=accelerator.device).sum()
    targets = accelerator.reduce(targets, reduction="sum")
    weights = {t: w for t, w in spec.active.items() if t not in skip}
    logged = dict.fromkeys(weights, 0.0)
    needs_teacher = any(t != "lm" for t in weights)
    for i, batch in enumerate(group):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        teacher_logits = teacher_topk = teacher_feats = None
        if needs_teacher and cache is not None and "idx" in batch and not spec.needs_teacher_features:
            teacher_topk = cache.lookup(batch["idx"], accelerator.device)
        elif needs_teacher:
            with torch.no_grad(), accelerator.autocast():  # the frozen teacher
                teacher_feats = capture(teacher, inputs, hidden_states=spec.needs_hidden)
            teacher_logits = teacher_feats.logits
        sync = accelerator.no_sync(student) if i < len(group) - 1 else nullcontext()
        with sync:
            student_feats = capture(student, inputs, hidden_states=spec.needs_hidden)
            terms = lm_terms(spec, distill, student_feats, batch, temperature=temperature,
                             teacher_logits=teacher_logits, teacher_topk=teacher_topk, teacher_feats=teacher_feats,
                             skip=skip)
            in_batch = batch["valid"].sum()
            loss = 0.0
            for term, (term_sum, term_count) in terms.items():
                part = normalise(term_sum, term_count, in_batch, targets, accelerator.num_processes)
                loss = loss + weights[term] * part
                logged[term] += float(part.detach()) / accelerator.num_processes
            if torch.is_tensor(loss):
                accelerator.backward(loss)
    return logged


# ------------------------------------------------------------------------------------------------------- loop


def distill_causal(student, teacher, train_blocks: LMBlocks, val_blocks: LMBlocks, *, spec: TermSpec,
                   distill: DistillConfig, train: TrainConfig, cache=None, name: str = "student",
                   log_dir: Path | None = None, pad_id: int | None = None, eos_id: int | None = None) -> History:
    """Train `student` on `train_blocks` against the frozen `teacher` (None for the LM-only control).

    Leaves the final weights in `student` (the best validation ones when train.early_stopping_patience is set);
    returns the history with every loss term per step and the validation perplexity per evaluation.
    """
    check_terms(spec.active)
    set_seed(train.seed)
    accelerator = make_accelerator(train)
    kd = any(t != "lm" for t in spec.active)
    if kd and teacher is None:
        raise ValueError(f"loss terms {sorted(spec.active)} need a teacher")
    fractions = (distill.on_policy_fraction, distill.seq_kd_fraction) if kd else (0.0, 0.0)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    config = getattr(student, "config", None)
    eos_id = eos_id if eos_id is not None else getattr(config, "eos_token_id", None)
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    pad_id = pad_id if pad_id is not None else (getattr(config, "pad_token_id", None) or eos_id or 0)

    micro = train.batch_size // train.grad_accum
    loader = make_block_loader(train_blocks, micro, seed=train.seed)
    total_steps = plan_steps(len(loader), train.grad_accum, train.epochs, train.max_steps)
    steps_per_epoch = max(1, len(loader) // train.grad_accum)
    trainable = list(student.named_parameters()) + list(spec.projections.named_parameters(prefix="projections"))
    optimizer, scheduler = make_optimizer(trainable, lr=train.lr, weight_decay=train.weight_decay,
                                          total_steps=total_steps, warmup_ratio=train.warmup_ratio)
    student, spec.projections, optimizer, loader, scheduler = accelerator.prepare(
        student, spec.projections, optimizer, loader, scheduler)
    if teacher is not None and (cache is None or any(fractions) or spec.needs_teacher_features):
        teacher.to(accelerator.device)
    step_kinds = random.Random(train.seed + 1)  # same draws on every process

    history = History(name)
    history.open_tensorboard(log_dir, accelerator)
    evals_at = eval_points(total_steps, steps_per_epoch, train.eval_every)
    stopper = (EarlyStopping(train.early_stopping_patience, score=lambda m: (-m["loss"],))
               if train.early_stopping_patience else None)
    step, epoch = 0, 0
    bar = tqdm(total=total_steps, desc=f"train {name}", disable=None if accelerator.is_main_process else True,
               leave=False)
    with Timer() as timer:
        student.train()
        while step < total_steps:
            set_loader_epoch(loader, epoch)
            for group in micro_batch_groups(loader, train.grad_accum):
                temperature = losses.temperature_at(step, total_steps, start=distill.temperature,
                                                    end=distill.temperature_end,
                                                    schedule=distill.temperature_schedule)
                u = step_kinds.random()
                kind = "student" if u < fractions[0] else "teacher" if u < sum(fractions) else "data"
                if kind == "data":
                    group = [with_targets(b) for b in group]
                else:  # generated continuations, scored by the live teacher
                    generator = accelerator.unwrap_model(student) if kind == "student" else teacher
                    group = [generate_continuations(generator, {k: v.to(accelerator.device) for k, v in b.items()},
                                                    pad_id=pad_id, eos_id=eos_id) for b in group]
                logged = accumulate_step(student, teacher, group, spec=spec, distill=distill,
                                         temperature=temperature, accelerator=accelerator,
                                         cache=cache if kind == "data" else None,
                                         skip=("lm",) if kind == "student" and kd else ())
                step += 1
                total = sum(spec.active[t] * v for t, v in logged.items())
                check_finite(torch.tensor(total), step, logged)
                accelerator.clip_grad_norm_(list(student.parameters()) + list(spec.projections.parameters()),
                                            train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                bar.update(1)
                history.log_step(step, {"loss": total, **logged, "temperature": temperature,
                                        "on_policy": float(kind == "student"), "seq_kd": float(kind == "teacher")})
                if step in evals_at:
                    metrics = perplexity(accelerator.unwrap_model(student), val_blocks, batch_size=micro)
                    history.log_eval(step, {"loss": metrics["loss"], "perplexity": metrics["perplexity"]})
                    bar.set_postfix(val_ppl=f"{metrics['perplexity']:.1f}")
                    if stopper and stopper.update(accelerator.unwrap_model(student), metrics):
                        step = total_steps
                if step >= total_steps:
                    break
            epoch += 1
    bar.close()
    if stopper:
        stopper.restore_best(accelerator.unwrap_model(student))
    history.wall_time_s = timer.seconds
    history.close()
    return history
