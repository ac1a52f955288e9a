"""The pieces every family of losses shares: the (sum, count) reduction over counted items, KL from
log-probabilities, temperature-softened log-probabilities, the cross-entropy sum, the student-to-teacher
projection, and the argument checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Projection = Callable[[Tensor], Tensor]


def sum_and_count(per_item: Tensor, mask: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    """Sum ``per_item`` over the items where ``mask`` is True; count those items."""
    if mask is None:
        return per_item.sum(), torch.tensor(per_item.numel(), device=per_item.device)
    mask = mask.to(device=per_item.device, dtype=torch.bool)
    if mask.shape != per_item.shape:
        raise ValueError(f"{what}: mask has shape {tuple(mask.shape)}, expected {tuple(per_item.shape)}")
    return torch.where(mask, per_item, 0.0).sum(), mask.sum()


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dimension, from log-probabilities: Σ p · (log p − log q).

    Classes with p = 0 contribute exactly 0, also when log p or log q is −inf (a logit masked to −inf), where
    the plain formula would give 0 · (−inf) = NaN in the value or the gradient.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def check_temperature(temperature: float, what: str) -> None:
    if not temperature > 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")


def softened_log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float, what: str):
    check_temperature(temperature, what)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{what}: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ in shape (same vocabulary/classes needed)"
        )
    return (
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
    )


def project(student: Tensor, teacher: Tensor, projection: Projection | None, what: str) -> Tensor:
    if projection is not None:
        student = projection(student)
    if student.shape != teacher.shape:
        hint = "" if projection is not None else "; pass projection= to map the student's width to the teacher's"
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape{hint}"
        )
    return student


def cross_entropy_sum(logits, labels, mask, ignore_index, what):
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"{what}: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.to(device=labels.device, dtype=torch.bool)
    # Uncounted rows may hold any label value; give them a valid class so cross_entropy does not fail on them.
    safe_labels = torch.where(counted, labels, 0)
    per_item = F.cross_entropy(logits.flatten(0, -2), safe_labels.flatten(), reduction="none")
    return sum_and_count(per_item.view(labels.shape), counted, what)
