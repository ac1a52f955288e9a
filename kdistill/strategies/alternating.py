"""Alternating distillation, after MetaDistil (Zhou et al., ACL 2022, "BERT Learns to Teach: Knowledge Distillation
with Meta Learning"): teacher and student take turns, and the teacher learns how well this student learns from it.

Training runs in rounds of `distill.student_steps` student steps; a teacher step opens each round, on the round's
first batch x (one micro-batch) and one batch q of the quiz set:

    θ'(φ) = θ − λ · ∇_θ L_S(θ, φ; x)                      look-ahead ("pilot") student: one differentiable SGD step
    L_T(φ) = w_ce · CE(teacher_φ(x), y) + CE(student_θ'(φ)(q), y_q)         its task loss + the look-ahead's quiz loss
    φ ← φ − AdamW(∇_φ L_T),  learning rate distill.teacher_lr

L_S is the student's whole recipe loss (kd, ce and internal terms) against the teacher's live, differentiable
outputs, and w_ce the recipe's ce weight. The quiz term reaches the teacher only through the look-ahead:
∇_φ CE(θ'(φ)) = −λ · (∂²L_S / ∂φ ∂θ)ᵀ · ∇_θ' CE. It is computed exactly, to second order: `autograd.grad` of L_S
with `create_graph=True`, then `torch.func.functional_call` of the student at θ'. λ = `train.lr`, the student's
peak learning rate, held constant (the student's warmup would give the first teacher steps no signal). The
look-ahead changes neither model; the student's real step, on the same batch x and against the updated teacher,
follows (as in MetaDistil), then the round's other student steps.

A student step is explicit distillation's step: the recipe's terms against the teacher's current outputs (teacher
in eval mode, no gradient). The quiz set is `distill.quiz_fraction` of the training split, held out (seeded by
`train.seed`); the student never trains on it. `train.epochs` / `max_steps` count student steps, as in explicit;
the teacher takes ceil(steps / student_steps) steps. Each teacher step costs about three student steps, and memory
for the second-order graph of one micro-batch. One process only: the second-order step does not go through DDP.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdistill import losses
from kdistill.strategies.mutual import one_process
from kdistill.strategies.phase import Phase
from kdistill.errors import UserError
from kdistill.features import capture, ensure_eager_attention
from kdistill.terms import TermSpec, compute_terms, step_loss, step_temperature
from kdistill.training import (
    GroupStream,
    History,
    batch_units,
    make_learner,
    make_loader,
    make_loaders,
    validation_metrics,
)


def split_quiz(encoded_train, fraction: float, *, seed: int):
    """(train, quiz): `fraction` of the rows (at least one) held out at random, the same for the same seed."""
    n = len(encoded_train)
    if n < 2:
        raise UserError("distill.quiz_fraction: alternating needs at least 2 training examples (train + quiz)")
    n_quiz = min(n - 1, max(1, round(fraction * n)))
    parts = encoded_train.train_test_split(test_size=n_quiz, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def teacher_meta_gradients(student, teacher, batch: dict, labels: torch.Tensor, quiz: dict,
                           quiz_labels: torch.Tensor, *, spec: TermSpec, temperature: float, lookahead_lr: float,
                           task_weight: float, task) -> tuple[list[torch.Tensor], dict[str, float]]:
    """∇_φ L_T for each of `trainable(teacher)`, and L_T's parts (see the module docstring).

    batch, quiz: model inputs without labels; labels (B,), quiz_labels (Q,). Changes neither model's weights nor
    their .grad; dropout follows each model's train/eval mode.
    """
    params = {name: p for name, p in student.named_parameters() if p.requires_grad}
    flags = dict(hidden_states=spec.needs_hidden, attentions=spec.needs_attentions, qkv=spec.needs_qkv)
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
        teacher_feats = capture(teacher, batch, **flags)
        terms = compute_terms(spec, capture(student, batch, **flags), teacher_feats, labels, temperature=temperature,
                              task=task)
        units = batch_units(batch)
        student_loss = step_loss(terms, spec.active, units, units, 1, {}, task=task)  # this batch's mean
        grads = torch.autograd.grad(student_loss, list(params.values()), create_graph=True, allow_unused=True)
        lookahead = {name: p if g is None else p - lookahead_lr * g for (name, p), g in zip(params.items(), grads)}
        quiz_sum, quiz_count = losses.hard_ce(functional_call(student, lookahead, args=(), kwargs=quiz).logits,
                                              quiz_labels)
        task_sum, task_count = losses.hard_ce(teacher_feats.logits, labels)
        # clamp: a batch of unlabeled transfer rows (data.labeled_limit) has no task loss, not a NaN one
        quiz_loss, task_loss = quiz_sum / quiz_count, task_sum / task_count.clamp(min=1)
        teacher_params = trainable(teacher)
        teacher_grads = torch.autograd.grad(task_weight * task_loss + quiz_loss, teacher_params, allow_unused=True)
    teacher_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(teacher_params, teacher_grads)]
    return teacher_grads, {"ce": task_loss.item(), "quiz": quiz_loss.item()}


def distill_alternating(phase: Phase) -> tuple[History, History]:
    """`phase.teacher` and `phase.student` in turns; see the module docstring.

    `phase.data`: the tokenized splits (train, validation). Leaves each model's best validation weights in student
    and teacher; returns (student history, teacher history), each teacher step numbered by the student step whose
    round it opens. `phase.checkpoints`: where to save resumable state (both models', the quiz set's position), and
    whether to resume.
    """
    student, teacher, tokenizer, encoded = phase.student, phase.teacher, phase.tokenizer, phase.data
    spec, distill, train, task = phase.spec, phase.distill, phase.train, phase.task
    accelerator = phase.start()
    one_process(accelerator, "alternating")
    teacher.requires_grad_(True)
    if spec.needs_attentions:
        for model in (student, teacher):
            ensure_eager_attention(model)
    flags = dict(hidden_states=spec.needs_hidden, attentions=spec.needs_attentions, qkv=spec.needs_qkv)
    task_weight = spec.active.get("ce", 0.0)  # the teacher's own task loss, weighted as the student's

    train_split, quiz_split = split_quiz(encoded["train"], distill.quiz_fraction, seed=train.seed)
    train_loader, val_loader, total_steps, evals_at = make_loaders(train_split, encoded["validation"], tokenizer,
                                                                   train, accelerator)
    quiz_loader = make_loader(quiz_split, tokenizer, train.batch_size // train.grad_accum, seed=train.seed + 1,
                              shuffle=True)
    common = dict(train=train, accelerator=accelerator, log_dir=phase.log_dir)
    student_learner = make_learner(student, "student", lr=train.lr, total_steps=total_steps, **common,
                                   patience=train.early_stopping_patience, extra=spec.projections)
    teacher_learner = make_learner(teacher, "teacher_after", lr=distill.teacher_lr,
                                   total_steps=math.ceil(total_steps / distill.student_steps), **common)
    device = accelerator.device
    quizzes = GroupStream(quiz_loader, 1, device=device)
    # the student decides when to stop; the teacher keeps its best weights
    engine = phase.engine(accelerator, [student_learner, teacher_learner],
                          GroupStream(train_loader, train.grad_accum, device=device), total_steps, evals_at,
                          lambda model: validation_metrics(model, val_loader, accelerator),
                          f"alternating ({distill.student_steps}:1)", side_streams={"quiz": quizzes})
    quiz_groups = iter(quizzes)

    def take_step(step: int, group: list[dict]) -> None:
        temperature = step_temperature(distill, step, total_steps)
        teacher.eval()  # it teaches without dropout, and learns (with dropout) only in its own steps
        if step % distill.student_steps == 0:  # teacher step: learn from the look-ahead student's quiz
            batch, quiz = dict(group[0]), dict(next(quiz_groups)[0])
            labels, quiz_labels = batch.pop("labels"), quiz.pop("labels")
            teacher.train()
            grads, logged = teacher_meta_gradients(student, teacher, batch, labels, quiz, quiz_labels, spec=spec,
                                                   temperature=temperature, lookahead_lr=train.lr,
                                                   task_weight=task_weight, task=task)
            teacher.eval()
            for p, g in zip(trainable(teacher), grads):
                p.grad = g
            engine.apply(teacher_learner, step + 1, logged, {"ce": task_weight, "quiz": 1.0},
                         temperature=temperature)

        def terms_of(batch):  # student step: the recipe's terms against the teacher's current outputs
            labels = batch.pop("labels")
            with torch.no_grad():
                teacher_feats = capture(teacher, batch, **flags)
            return [(compute_terms(spec, capture(student, batch, **flags), teacher_feats, labels,
                                   temperature=temperature, task=task), spec.active)]

        logged = {}
        engine.backward(group, terms_of, [logged])
        engine.apply(student_learner, step + 1, logged, spec.active, temperature=temperature)

    student_history, teacher_history = engine.run(take_step)
    return student_history, teacher_history
