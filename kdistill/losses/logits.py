"""Logit distillation, sequence level (one item = one row): the soft-target KL of Hinton et al. (2015), the
teachers' averaged distribution for several teachers, and the cross-entropy with the labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.shared import check_temperature, cross_entropy_sum, kl, softened_log_probs, sum_and_count


def soft_kl(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    temperature: float,
    mask: Tensor | None = None,
    teacher_log_probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": KL(p_T ‖ p_S) on softened outputs, × T².

    loss_i = T² · Σ_c p_T(c) · (log p_T(c) − log p_S(c)),   p_X = softmax(logits_X / T)

    student_logits: (N, C)   teacher_logits: (N, C)   mask: (N,) bool, True = counts
    teacher_log_probs: (N, C), instead of teacher_logits: a teacher distribution that is already softened at T
        (for several teachers, ``average_teacher_logprobs``); it is used as given, the T² factor still applies.
    Give exactly one of teacher_logits and teacher_log_probs.
    Returns (sum over counted rows, number of counted rows).
    """
    if (teacher_logits is None) == (teacher_log_probs is None):
        raise ValueError("soft_kl: give exactly one of teacher_logits and teacher_log_probs")
    if teacher_logits is not None:
        log_p_s, log_p_t = softened_log_probs(student_logits, teacher_logits, temperature, "soft_kl")
    else:
        check_temperature(temperature, "soft_kl")
        if teacher_log_probs.shape != student_logits.shape:
            raise ValueError(
                f"soft_kl: teacher_log_probs {tuple(teacher_log_probs.shape)} and student_logits "
                f"{tuple(student_logits.shape)} differ in shape"
            )
        log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_t = teacher_log_probs
    per_row = temperature**2 * kl(log_p_t, log_p_s)  # (N,)
    return sum_and_count(per_row, mask, "soft_kl")


def average_teacher_logprobs(
    teacher_logits: Sequence[Tensor], *, temperature: float, weights: Sequence[float] | None = None
) -> Tensor:
    """Multi-teacher KD: log of the weighted average of the teachers' softened distributions.

    log p̄(c) = log Σ_k w_k · softmax(z_k / T)(c),   w normalised to sum to 1 (None = equal weights)

    Averaging probabilities (not logits) keeps each teacher's distribution intact; the result is a
    distribution and goes to ``soft_kl(..., teacher_log_probs=...)`` with the same temperature.
    teacher_logits: K tensors of the same shape (..., C). Returns (..., C). Not a loss: no (total, count).
    """
    if len(teacher_logits) == 0:
        raise ValueError("average_teacher_logprobs: need at least one teacher")
    check_temperature(temperature, "average_teacher_logprobs")
    if weights is None:
        weights = [1.0] * len(teacher_logits)
    if len(weights) != len(teacher_logits):
        raise ValueError(
            f"average_teacher_logprobs: {len(weights)} weights for {len(teacher_logits)} teachers"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"average_teacher_logprobs: weights must be >= 0 and not all 0, got {list(weights)}")
    total_weight = float(sum(weights))
    stacked = torch.stack(
        [
            F.log_softmax(z / temperature, dim=-1) + math.log(w / total_weight)
            for z, w in zip(teacher_logits, weights)
            if w > 0  # log 0 = −inf would only add nothing
        ]
    )  # (K', ..., C)
    return torch.logsumexp(stacked, dim=0)


def hard_ce(logits: Tensor, labels: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy with the ground-truth labels (the "hard" term of Hinton et al. 2015).

    loss_i = −log softmax(logits_i)(y_i)

    logits: (..., C)   labels: (...) int   mask: (...) bool, True = counts
    A row counts when mask is True and its label is a class id (>= 0): -100 (no label, padding) and -1 (a
    token-classification transfer word, which has soft targets only) are not counted.
    Returns (sum over counted rows, number of counted rows).
    """
    gold = labels >= 0
    return cross_entropy_sum(logits, labels, gold if mask is None else gold & mask.to(gold.device, torch.bool),
                             -100, "hard_ce")
