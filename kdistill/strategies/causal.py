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

Terms (`distill.losses`, weight per term; the causal-lm rows of kdistill/terms.py), token-level, at
`distill.temperature` (T² scaling, see kdistill/losses/): forward_kl, reverse_kl, jsd (generalised JSD with
`distill.gjsd_beta`), skew_kl, skew_reverse_kl (DistiLLM, with `distill.skew_alpha`), lm (next-token CE on the
data), and optionally hidden_mse / hidden_cosine / embedding_mse (hidden-state alignment over the layer pairs;
needs the live teacher, so no cache). With the cache, the divergences compare the two distributions renormalised
over the teacher's stored top-k support (see kdistill/cache/).

Normalisation: every term's (sum, count) is divided by the number of target tokens of the WHOLE optimizer step
(all micro-batches, all processes; unit "targets" of `terms.step_loss`), never per micro-batch, so
`train.grad_accum` and data parallelism give the same loss and gradients as one big batch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdistill.data import LMBlocks, next_token_targets, target_window
from kdistill.strategies.phase import Phase
from kdistill.features import capture, keeps_logits
from kdistill.terms import TERMS, CrossTeacher, TermSpec, check_terms, compute_terms, step_temperature
from kdistill.tokenalign import pairs_of_ends
from kdistill.training import (
    GroupStream,
    History,
    LengthGroupedSampler,
    eval_points,
    make_learner,
    perplexity,
    plan_steps,
)

log = logging.getLogger(__name__)

def lm_only_spec() -> TermSpec:
    """The no-KD control: the LM loss on the data, nothing from a teacher."""
    return TermSpec({"lm": 1.0}, [])


# --------------------------------------------------------------------------------------------------- batches


class _Blocks(Dataset):
    def __init__(self, blocks: LMBlocks, teacher_ends: Tensor | None = None):
        self.blocks = blocks
        self.teacher_ends = teacher_ends

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        row = {"input_ids": self.blocks.input_ids[i], "attention_mask": self.blocks.attention_mask[i],
               "idx": torch.tensor(i)}
        if self.blocks.prompt_lengths is not None:  # a prompt + response row: only the response is learned
            row["prompt_length"] = self.blocks.prompt_lengths[i]
        if self.teacher_ends is not None:  # a teacher over another vocabulary: where both models' tokens end
            row.update(ends=self.blocks.ends[i], teacher_ends=self.teacher_ends[i])
        return row


def make_block_loader(blocks: LMBlocks, batch_size: int, *, seed: int, shuffle: bool = True,
                      accelerator=None, teacher_ends: Tensor | None = None) -> DataLoader:
    """Batches of whole blocks in a seeded order that changes every epoch (`set_loader_epoch`). `batch_size` counts
    the rows over all processes; with an `accelerator` of several processes each loads its share
    (training.LengthGroupedSampler). teacher_ends: (N, Lt) the byte ends of a teacher over another vocabulary
    (its signal's), for `with_alignment`; the blocks then carry their own (`LMBlocks.ends`)."""
    if teacher_ends is not None and (blocks.ends is None or teacher_ends.shape[0] != len(blocks)):
        raise ValueError(f"make_block_loader: teacher byte ends for {teacher_ends.shape[0]} blocks, student blocks "
                         f"{len(blocks)} {'without' if blocks.ends is None else 'with'} byte ends")
    lengths = [int(m) for m in blocks.attention_mask.sum(1)]
    shards = dict(num_replicas=accelerator.num_processes, rank=accelerator.process_index) if accelerator else {}
    sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, shuffle=shuffle, **shards)
    return DataLoader(_Blocks(blocks, teacher_ends), batch_sampler=sampler)


def with_targets(batch: dict, prompt_length: int = 0) -> dict:
    """Add labels (B, L) and the target mask valid (B, L) (see data.next_token_targets): after `prompt_length`, or
    after each row's own prompt_length (B,) where the batch has one (it is dropped: the models do not read it)."""
    batch = dict(batch)
    labels, valid = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                       batch.pop("prompt_length", prompt_length))
    return {**batch, "labels": labels, "valid": valid}


def with_alignment(batch: dict) -> dict:
    """Add aligned (3, P): (row, teacher position, student position) of the next-token targets where the teacher
    (over another vocabulary) and the student end a token at the same byte (`tokenalign.pairs_of_ends`); a batch
    without teacher ends is returned as it is."""
    if "teacher_ends" not in batch:
        return batch
    rows, t_pos, s_pos = pairs_of_ends(batch["teacher_ends"], batch["ends"])
    keep = batch["valid"][rows, s_pos]  # the student's last token predicts nothing in this block
    return {**batch, "aligned": torch.stack([rows[keep], t_pos[keep], s_pos[keep]])}


@torch.no_grad()
def generate_responses(model, batch: dict, *, pad_id: int, eos_id: int | None,
                       max_new_tokens: int | None = None) -> dict:
    """Instruction rows (a batch with prompt_length (B,)): keep each row's prompt and sample a new response from
    `model` (T = 1, full vocabulary) of at most `max_new_tokens` (the data's response length; None: as long as the
    row's room allows, the batch's length L). The rows are padded to the longest row of the whole set, so their room
    is no bound on a response.

    The prompts are left-padded for generation (a decoder continues from its last real token), then each row is
    rebuilt right-padded as prompt + generated tokens up to and including the first EOS, so that the same rows
    and targets serve every term: only the generated tokens are targets. No `idx`: no cache row matches.
    """
    input_ids, mask, lengths = batch["input_ids"], batch["attention_mask"], batch["prompt_length"]
    rows, length = input_ids.shape
    width = int(lengths.max())
    prompts = torch.full((rows, width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    prompt_mask = torch.zeros_like(prompts)
    for r, n in enumerate(lengths.tolist()):
        prompts[r, width - n:] = input_ids[r, :n]
        prompt_mask[r, width - n:] = 1
    was_training = model.training
    model.eval()
    try:
        budget = length - width if max_new_tokens is None else min(length - width, max_new_tokens)
        out = model.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=max(1, budget), pad_token_id=pad_id,
                             eos_token_id=eos_id)
    finally:
        model.train(was_training)
    generated = out[:, width:]
    ids = torch.full_like(input_ids, pad_id)
    new_mask = torch.zeros_like(mask)
    for r, n in enumerate(lengths.tolist()):
        new = generated[r]
        if eos_id is not None and bool((new == eos_id).any()):  # up to and including the first EOS
            new = new[: int((new == eos_id).nonzero()[0]) + 1]
        new = new[: length - n]
        ids[r, :n], ids[r, n: n + len(new)] = input_ids[r, :n], new
        new_mask[r, : n + len(new)] = 1
    return with_targets({"input_ids": ids, "attention_mask": new_mask, "prompt_length": lengths})


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


# ------------------------------------------------------------------------------------------------------ step


def lm_terms(student, teacher, batch: dict, *, spec: TermSpec, temperature: float, accelerator, task, cache=None,
             skip: tuple[str, ...] = ()):
    """(sum, count) of the active terms (but `skip`) on one micro-batch: input_ids, attention_mask, labels, valid
    (B, L), and idx (B,) for rows of the top-k cache (and aligned (3, P) with a teacher over another vocabulary,
    `with_alignment`). The teacher side comes from the cache where it holds what the terms read (then the teacher
    does not run), else from the frozen teacher's forward.

    Where the targets fill only some columns (a prompt + response row learns its response alone), both models
    project onto the vocabulary only there (`target_window`): the (B, L, V) logits of the prompt, most of a row,
    would be computed and then masked out. Hidden-state terms and aligned positions read whole rows: no window."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels, valid = batch["labels"], batch["valid"]
    window = target_window(valid)
    if (window != slice(0, valid.shape[1]) and not spec.needs_hidden and not spec.cross_tokenizer
            and keeps_logits(accelerator.unwrap_model(student)) and (teacher is None or keeps_logits(teacher))):
        inputs["logits_to_keep"] = torch.arange(window.start, window.stop, device=valid.device)
        labels, valid = labels[:, window], valid[:, window]
    else:
        window = slice(None)
    needs_teacher = any(TERMS[t].reads for t in spec.active if t not in skip)
    teacher_topk = teacher_feats = cross = None
    if needs_teacher and spec.cross_tokenizer:  # the signal at the teacher's positions of the aligned pairs
        rows, t_pos, s_pos = batch["aligned"]
        logprobs, ids = cache.lookup(batch["idx"], accelerator.device)  # (B, Lt, K) each
        cross = CrossTeacher(rows, s_pos, logprobs[rows, t_pos], ids[rows, t_pos])
    elif needs_teacher and cache is not None and "idx" in batch and not spec.needs_teacher_features:
        teacher_topk = tuple(t[:, window] for t in cache.lookup(batch["idx"], accelerator.device))  # (B, W, K)
    elif needs_teacher:
        with torch.no_grad(), accelerator.autocast():  # the frozen teacher
            teacher_feats = capture(teacher, inputs, hidden_states=spec.needs_hidden)
    student_feats = capture(student, inputs, hidden_states=spec.needs_hidden)
    return compute_terms(spec, student_feats, teacher_feats, labels, temperature=temperature,
                         task=task, valid=valid, teacher_topk=teacher_topk, cross=cross, skip=skip)


def step_kind(seed: int, step: int, fractions: tuple[float, float]) -> str:
    """Where step `step` takes its data from: "student" (on-policy), "teacher" (sequence-level KD) or "data", drawn
    with the given probabilities; the same in every process, and a function of the step alone, so that a resumed
    run draws what the uninterrupted one drew."""
    u = random.Random(seed * 1_000_003 + step).random()
    return "student" if u < fractions[0] else "teacher" if u < sum(fractions) else "data"


# ------------------------------------------------------------------------------------------------------- loop


def distill_causal(phase: Phase, *, cache=None, pad_id: int | None = None, eos_id: int | None = None,
                   max_new_tokens: int | None = None) -> History:
    """Train `phase.student` on the blocks `phase.data["train"]` against the frozen `phase.teacher` (none for the
    LM-only control).

    Leaves the final weights in the student (the best validation ones when train.early_stopping_patience is set);
    returns the history with every loss term per step and the validation perplexity per evaluation (on
    `phase.data["validation"]`). `phase.checkpoints`: where to save resumable state, and whether to continue from
    the last one saved there. Runs in several processes (DDP), each taking its share of every batch. `cache`: the
    teacher signal; `pad_id`, `eos_id`: the student tokenizer's (default: its config's); `max_new_tokens`: the most
    tokens a generated response of instruction rows may have (their data's response length).
    """
    student, teacher, name = phase.student, phase.teacher, phase.name
    train_blocks, val_blocks = phase.data["train"], phase.data["validation"]
    spec, distill, train, task = phase.spec, phase.distill, phase.train, phase.task
    check_terms(spec.active, task)
    accelerator = phase.start()
    kd = any(t != "lm" for t in spec.active)
    if kd and teacher is None:
        raise ValueError(f"loss terms {sorted(spec.active)} need a teacher")
    fractions = (distill.on_policy_fraction, distill.seq_kd_fraction) if kd else (0.0, 0.0)
    if spec.cross_tokenizer and (cache is None or not cache.has_ends or any(fractions)):
        raise ValueError("cross-tokenizer terms read the teacher signal with byte ends, on the dataset's blocks "
                         "only (no generated steps)")
    if teacher is not None:
        teacher.eval().requires_grad_(False)  # the teacher never learns
    config = getattr(student, "config", None)
    eos_id = eos_id if eos_id is not None else getattr(config, "eos_token_id", None)
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    pad_id = pad_id if pad_id is not None else (getattr(config, "pad_token_id", None) or eos_id or 0)

    if train.fsdp and accelerator.num_processes > 1 and phase.checkpoints is not None:
        log.warning("%s: train.fsdp: no checkpoints (sharded checkpoints are not written yet); a resumed run "
                    "trains this phase again", name)
        phase = replace(phase, checkpoints=None)
    micro = train.batch_size // train.grad_accum
    teacher_ends = cache.ends(range(len(cache))) if spec.cross_tokenizer else None  # (N, Lt), small: all at once
    loader = make_block_loader(train_blocks, micro, seed=train.seed, accelerator=accelerator,
                               teacher_ends=teacher_ends)
    total_steps = plan_steps(len(loader), train.grad_accum, train.epochs, train.max_steps)
    evals_at = eval_points(total_steps, max(1, len(loader) // train.grad_accum), train.eval_every)
    # validation perplexity decides (lower is better); the final weights stay unless early stopping is on
    learner = make_learner(student, name, lr=train.lr, total_steps=total_steps, train=train, accelerator=accelerator,
                           log_dir=phase.log_dir, patience=train.early_stopping_patience, extra=spec.projections,
                           score=lambda m: (-m["loss"],), keep_best=bool(train.early_stopping_patience))
    student = learner.model  # (wrapped for DDP when several processes run)
    if teacher is not None and (cache is None or any(fractions) or spec.needs_teacher_features):
        teacher.to(accelerator.device)

    def validate(model) -> dict[str, float]:
        metrics = perplexity(accelerator.unwrap_model(model), val_blocks, batch_size=micro)
        return {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}

    engine = phase.engine(accelerator, [learner], GroupStream(loader, train.grad_accum, device=accelerator.device),
                          total_steps, evals_at, validate, f"train {name}")

    def take_step(step: int, group: list[dict]) -> None:
        temperature = step_temperature(distill, step, total_steps)
        kind = step_kind(train.seed, step, fractions)
        if kind == "data":
            group = [with_alignment(with_targets(b)) for b in group]
        else:  # generated continuations, scored by the live teacher
            generator = accelerator.unwrap_model(student) if kind == "student" else teacher
            generate = (partial(generate_responses, max_new_tokens=max_new_tokens) if "prompt_length" in group[0]
                        else generate_continuations)
            group = [generate(generator, b, pad_id=pad_id, eos_id=eos_id) for b in group]
        # on-policy steps drop the lm term: its targets would be the student's own samples
        skip = ("lm",) if kind == "student" and kd else ()
        weights = {t: w for t, w in spec.active.items() if t not in skip}
        logged = dict.fromkeys(weights, 0.0)
        engine.backward(group, lambda batch: [(lm_terms(student, teacher, batch, spec=spec, temperature=temperature,
                                                        accelerator=accelerator, task=task,
                                                        cache=cache if kind == "data" else None, skip=skip),
                                               weights)], [logged], sync=student)
        engine.apply(learner, step + 1, logged, weights, temperature=temperature,
                     on_policy=float(kind == "student"), seq_kd=float(kind == "teacher"))

    history, = engine.run(take_step)
    return history
