"""Deep mutual learning (Zhang et al. 2018, "Deep Mutual Learning"): peers learn at the same time, each from the
labels and from the others' soft predictions.

Peer 0 is the teacher (fine-tuned, or whatever `teacher` holds when called), peer 1 the student. With
`distill.peers = K > 2` peers 2..K-1 are more students: copies of the student's initial weights, which part ways
through their own dropout draws and what they learn. Only peer 1 is returned and saved; the others exist to teach.

Every step, on the same batch, every peer k minimises

    L_k = w_ce · CE(z_k, y) + w_kd · 1/(K−1) · Σ_{l≠k} T² · KL(softmax(z_l/T) ‖ softmax(z_k/T))

with z_l detached (a peer learns from the others, never through them), T and the weights from the recipe. The
students also take the recipe's internal terms (hidden states, attentions, Q/K/V relations) against the teacher's
detached internals, as in explicit distillation; the teacher matches no student internals (the mapping goes one
way, student layer -> teacher layer). Because every L_k sees the other peers as constants, one backward of
Σ_k L_k gives each peer exactly the gradient of its own loss, and all peers step together. (The paper updates the
peers one after another, each against the others' fresh predictions; updating them together is the usual
simplification and costs one forward per peer per step.)

Students learn at `train.lr`, the teacher at `distill.teacher_lr`, each with its own AdamW and schedule; each keeps
its best validation weights. Early stopping follows the student.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from kdistill import losses
from kdistill.strategies.phase import Phase
from kdistill.errors import UserError
from kdistill.features import Features, capture, ensure_eager_attention
from kdistill.terms import TermSpec, compute_terms, step_temperature
from kdistill.training import (
    GroupStream,
    History,
    make_learner,
    make_loaders,
    validation_metrics,
)

LOGIT_TERMS = ("kd", "ce")


def teacher_spec(spec: TermSpec) -> TermSpec:
    """The teacher's terms: the recipe's soft-target and label terms, with their weights."""
    weights = {t: w for t, w in spec.active.items() if t in LOGIT_TERMS}
    if not weights:
        raise UserError("distill.losses: strategy mutual trains the teacher on kd and/or ce; give one of them a "
                        "positive weight")
    return TermSpec(weights, pairs=[])


def one_process(accelerator, strategy: str) -> None:
    """Stop a multi-process launch: these loops step several models and do not synchronise them across processes."""
    if accelerator.num_processes > 1:
        raise UserError(f"distill.strategy: {strategy} runs in one process ({accelerator.num_processes} were "
                        "started); launch it without accelerate/torchrun, or use strategy explicit")


def detached(features: Features) -> Features:
    """The same features cut from the graph: targets a peer learns from, never through."""
    return dataclasses.replace(
        features,
        logits=features.logits.detach(),
        hidden_states=tuple(h.detach() for h in features.hidden_states),
        attentions=tuple(a.detach() for a in features.attentions),
        qkv=[{k: v.detach() for k, v in layer.items()} for layer in features.qkv],
    )


def peer_terms(k: int, feats: list[Features], labels: torch.Tensor, *, spec: TermSpec, teacher_terms: TermSpec,
               temperature: float, task) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(sum, count) of each term of peer k (0 = teacher): CE; kd = the mean over the other peers l of
    T²·KL(p_l ‖ p_k), targets detached; for students also the internal terms against the detached teacher."""
    own = feats[k]
    others = [detached(f) for j, f in enumerate(feats) if j != k]
    terms = compute_terms(teacher_terms if k == 0 else spec, own, others[0], labels, temperature=temperature,
                          task=task)
    if "kd" in terms and len(others) > 1:  # (for K = 2 compute_terms already did it: one other peer)
        kls = [losses.soft_kl(own.logits, other.logits, temperature=temperature) for other in others]
        terms["kd"] = (sum(kl_sum for kl_sum, _ in kls) / len(kls), kls[0][1])
    return terms


def distill_mutual(phase: Phase) -> tuple[History, History]:
    """Train `phase.teacher`, `phase.student` (and `distill.peers - 2` more students) together; see the module
    docstring.

    `phase.data`: the tokenized splits (train, validation). Leaves each model's best validation weights in student
    and teacher; returns (student history, teacher history). `train.epochs`/`max_steps` count steps, and each step
    updates every peer once. `phase.checkpoints`: where to save resumable state (every peer's), and whether to
    resume.
    """
    student, teacher, tokenizer, encoded = phase.student, phase.teacher, phase.tokenizer, phase.data
    spec, distill, train, task = phase.spec, phase.distill, phase.train, phase.task
    accelerator = phase.start()
    one_process(accelerator, "mutual")
    students = [student] + [copy.deepcopy(student) for _ in range(distill.peers - 2)]
    peers = [teacher, *students]
    teacher.requires_grad_(True)
    teacher_terms = teacher_spec(spec)
    if spec.needs_attentions:
        for model in peers:
            ensure_eager_attention(model)

    train_loader, val_loader, total_steps, evals_at = make_loaders(encoded["train"], encoded["validation"],
                                                                   tokenizer, train, accelerator)
    common = dict(total_steps=total_steps, train=train, accelerator=accelerator, log_dir=phase.log_dir)
    teacher_learner = make_learner(teacher, "teacher_after", lr=distill.teacher_lr, **common)
    student_learners = [  # the projections of hidden terms learn with the first student
        make_learner(model, "student" if k == 1 else f"student_{k}", lr=train.lr, **common,
                     patience=train.early_stopping_patience if k == 1 else None,
                     extra=spec.projections if k == 1 else None)
        for k, model in enumerate(students, 1)]
    learners = [teacher_learner, *student_learners]  # peer order: 0 is the teacher
    weights = [teacher_terms.active] + [spec.active] * len(students)
    # the student decides when to stop; the teacher keeps its best weights
    engine = phase.engine(accelerator, [student_learners[0], teacher_learner, *student_learners[1:]],
                          GroupStream(train_loader, train.grad_accum, device=accelerator.device), total_steps,
                          evals_at, lambda model: validation_metrics(model, val_loader, accelerator),
                          f"mutual ({len(peers)} peers)")
    flags = dict(hidden_states=spec.needs_hidden, attentions=spec.needs_attentions, qkv=spec.needs_qkv)

    def take_step(step: int, group: list[dict]) -> None:
        temperature = step_temperature(distill, step, total_steps)

        def terms_of(batch):  # every peer's terms, each seeing the others as constants
            labels = batch.pop("labels")
            feats = [capture(model, batch, **flags) for model in peers]
            return [(peer_terms(k, feats, labels, spec=spec, teacher_terms=teacher_terms, temperature=temperature,
                                task=task),
                     weights[k]) for k in range(len(peers))]

        logged = [{} for _ in peers]
        engine.backward(group, terms_of, logged)  # one backward of the peers' summed losses
        for learner, peer_weights, peer_logged in zip(learners, weights, logged):
            engine.apply(learner, step + 1, peer_logged, peer_weights, temperature=temperature)

    student_history, teacher_history, *_ = engine.run(take_step)
    return student_history, teacher_history
