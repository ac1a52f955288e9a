"""Sentence embeddings (task: embedding; one item = one text): the student's pooled vector against the teacher's,
by squared error, cosine distance, or in-batch contrastive (InfoNCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.shared import Projection, check_temperature, project


def _pooled_pair(student: Tensor, teacher: Tensor, projection: Projection | None, what: str) -> Tensor:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"{what}: expected (B, D) pooled embeddings, got student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    return project(student, teacher, projection, what)


def pooled_mse(student: Tensor, teacher: Tensor, *, projection: Projection | None = None) -> tuple[Tensor, Tensor]:
    """Reimers & Gurevych 2020 (multilingual sentence embeddings by KD): squared error between the student's
    pooled sentence embedding and the teacher's.

    loss_b = Σ_d (W s_b − t_b)_d²,   W = projection (identity when None)

    student: (B, Ds)   teacher: (B, Dt)   projection: maps Ds → Dt (a learned nn.Linear); needed when Ds ≠ Dt.
    Returns (sum of squared errors over all rows, B × Dt), so total / count is the per-element MSE, as the
    paper's MSELoss.
    """
    student = _pooled_pair(student, teacher, projection, "pooled_mse")
    total = (student - teacher).pow(2).sum()
    return total, torch.tensor(float(teacher.numel()), device=teacher.device)


def pooled_cosine(student: Tensor, teacher: Tensor, *, projection: Projection | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Cosine distance between pooled sentence embeddings (the direction is what cosine search reads).

    loss_b = 1 − cos(W s_b, t_b)

    student: (B, Ds)   teacher: (B, Dt).   Returns (sum over rows, B).
    """
    student = _pooled_pair(student, teacher, projection, "pooled_cosine")
    per_row = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    return per_row.sum(), torch.tensor(float(per_row.numel()), device=per_row.device)


def pooled_contrastive(student: Tensor, teacher: Tensor, *, temperature: float = 0.05,
                       projection: Projection | None = None) -> tuple[Tensor, Tensor]:
    """In-batch contrastive (InfoNCE, van den Oord et al. 2018) against the teacher's embeddings: each student
    embedding must pick its own text's teacher embedding among the batch's.

    loss_b = −log softmax_j( cos(W s_b, t_j) / τ )_b,   j over the B rows of the batch

    student: (B, Ds)   teacher: (B, Dt)   τ = temperature.  The negatives are the other rows of the same
    (micro-)batch. Returns (sum over rows, B).
    """
    check_temperature(temperature, "pooled_contrastive")
    student = _pooled_pair(student, teacher, projection, "pooled_contrastive")
    sims = F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).T / temperature  # (B, B)
    targets = torch.arange(sims.shape[0], device=sims.device)
    total = F.cross_entropy(sims, targets, reduction="sum")
    return total, torch.tensor(float(sims.shape[0]), device=sims.device)
