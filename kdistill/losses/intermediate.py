"""Intermediate layers (encoders): hidden states (FitNets / TinyBERT squared error, DistilBERT cosine), attention
maps (MiniLM KL, TinyBERT squared error), MiniLMv2 self-attention relations, and Patient-KD's [CLS] vectors.

A projection maps the student's width to the teacher's where they differ; attention maps of different head counts
are compared as each model's mean map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.shared import Projection, check_temperature, kl, project, sum_and_count


# Attention maps come as probabilities, so their logs need a floor; padded keys have probability ~0.
_ATTN_EPS = 1e-12


def _match_heads(student: Tensor, teacher: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Make (B, H, L, L) maps comparable head by head; different head counts are averaged to one map each."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{what}: expected (B, H, L, L) maps, got student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if student.shape[1] != teacher.shape[1]:
        # No head of one model corresponds to a head of the other, so compare the models' mean maps.
        student = student.mean(dim=1, keepdim=True)  # (B, 1, L, L)
        teacher = teacher.mean(dim=1, keepdim=True)  # (B, 1, L, L)
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    return student, teacher


def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    projection: Projection | None = None,
) -> tuple[Tensor, Tensor]:
    """FitNets (Romero et al. 2015) / TinyBERT (Jiao et al. 2020): squared error between hidden states.

    loss_(b,l) = Σ_d (W h_S(b,l) − h_T(b,l))_d²,   W = projection (identity when None)

    student_hidden: (B, L, Ds)   teacher_hidden: (B, L, Dt)   mask: (B, L) attention mask, True/1 = counts
    projection: maps Ds → Dt, applied to the student (a learned nn.Linear, as TinyBERT's W_h); needed when Ds ≠ Dt.
    TinyBERT's embedding-layer loss is this same function applied to hidden_states[0] (the embeddings).
    Returns (sum of squared errors over counted tokens, counted tokens × Dt), so total / count is the
    per-element mean squared error, as F.mse_loss.
    """
    student_hidden = project(student_hidden, teacher_hidden, projection, "hidden_mse")
    per_token = (student_hidden - teacher_hidden).pow(2).sum(-1)  # (B, L)
    total, tokens = sum_and_count(per_token, mask, "hidden_mse")
    return total, tokens * teacher_hidden.shape[-1]


def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    *,
    mask: Tensor | None = None,
    projection: Projection | None = None,
) -> tuple[Tensor, Tensor]:
    """DistilBERT (Sanh et al. 2019) cosine embedding loss between hidden states.

    loss_(b,l) = 1 − cos(W h_S(b,l), h_T(b,l)),   W = projection (identity when None)

    student_hidden: (B, L, Ds)   teacher_hidden: (B, L, Dt)   mask: (B, L) attention mask, True/1 = counts
    projection: maps Ds → Dt, applied to the student; needed when Ds ≠ Dt.
    Returns (sum over counted tokens, number of counted tokens).
    """
    student_hidden = project(student_hidden, teacher_hidden, projection, "hidden_cosine")
    per_token = 1.0 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)  # (B, L)
    return sum_and_count(per_token, mask, "hidden_cosine")


def attention_kl(
    student_attn: Tensor, teacher_attn: Tensor, *, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """MiniLM (Wang et al. 2020) self-attention distribution transfer: KL(A_T ‖ A_S) per head and query row.

    loss_(b,h,i) = Σ_j A_T(b,h,i,j) · (log A_T(b,h,i,j) − log A_S(b,h,i,j)),   logs clamped at 1e-12

    student_attn: (B, Hs, L, L), teacher_attn: (B, Ht, L, L): attention probabilities (``output_attentions``),
        rows sum to 1 over keys j.
    mask: (B, L) attention mask, True/1 = real token. Padded query rows are not counted and padded keys add
        nothing to a row's sum.
    When Hs ≠ Ht, each model's heads are averaged to one map first (an average of distributions is a
    distribution), and the KL is taken between the two mean maps (H = 1). Computed in float32.
    Returns (sum over counted (head, query row) pairs, number of such pairs).
    """
    student_attn, teacher_attn = _match_heads(student_attn.float(), teacher_attn.float(), "attention_kl")
    heads = teacher_attn.shape[1]
    log_s = student_attn.clamp_min(_ATTN_EPS).log()
    log_t = teacher_attn.clamp_min(_ATTN_EPS).log()
    terms = teacher_attn * (log_t - log_s)  # (B, H, L, L)
    if mask is not None:
        token_mask = mask.to(device=terms.device, dtype=torch.bool)  # (B, L)
        terms = torch.where(token_mask[:, None, None, :], terms, 0.0)  # padded keys
        mask = token_mask[:, None, :].expand(-1, heads, -1)  # (B, H, L) query rows
    per_row = terms.sum(-1)  # (B, H, L)
    return sum_and_count(per_row, mask, "attention_kl")


def attention_mse(
    student_scores: Tensor, teacher_scores: Tensor, *, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """TinyBERT (Jiao et al. 2020) attention loss: squared error between attention maps.

    loss_(b,h,i,j) = (A_S(b,h,i,j) − A_T(b,h,i,j))²

    student_scores: (B, Hs, L, L), teacher_scores: (B, Ht, L, L): attention scores before softmax (as in
        TinyBERT) or probabilities (``output_attentions``); the formula is the same.
    mask: (B, L) attention mask, True/1 = real token; only (query, key) pairs of two real tokens count, which
        also drops the large negative scores a padded key gets.
    When Hs ≠ Ht, each model's heads are averaged to one map first (H = 1).
    Returns (sum over counted elements, number of counted (head, query, key) elements).
    """
    student_scores, teacher_scores = _match_heads(student_scores, teacher_scores, "attention_mse")
    per_elem = (student_scores - teacher_scores).pow(2)  # (B, H, L, L)
    if mask is not None:
        m = mask.to(device=per_elem.device, dtype=torch.bool)
        mask = (m[:, None, :, None] & m[:, None, None, :]).expand_as(per_elem)  # (B, H, L, L)
    return sum_and_count(per_elem, mask, "attention_mse")


def minilm_relation_kl(
    student_states: Tensor,
    teacher_states: Tensor,
    *,
    num_relation_heads: int,
    mask: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """MiniLMv2 (Wang et al. 2021) multi-head self-attention relation distillation.

    Each model's states X (B, L, D) are split into Rh relation heads of size d_r = D / Rh; per head
        R = softmax(X_a X_aᵀ / (sqrt(d_r) · T))   (B, Rh, L, L), padded keys excluded,
        loss_(b,a,i) = T² · KL(R_T(b,a,i,:) ‖ R_S(b,a,i,:))
    so student and teacher may have different widths D (each uses its own d_r) as long as both divide by Rh.
    Use it on the queries, keys or values of one layer (Q-Q, K-K, V-V relations); MiniLMv1's value relation
    is the same function applied to the values. T = 1 is the paper's loss.

    student_states: (B, L, Ds)   teacher_states: (B, L, Dt)   mask: (B, L) attention mask, True/1 = real token
    Returns (sum over counted (relation head, query row) pairs, number of such pairs).
    """
    check_temperature(temperature, "minilm_relation_kl")
    if num_relation_heads < 1:
        raise ValueError(f"minilm_relation_kl: num_relation_heads must be >= 1, got {num_relation_heads}")
    for who, states in (("student", student_states), ("teacher", teacher_states)):
        if states.dim() != 3:
            raise ValueError(f"minilm_relation_kl: {who}_states must be (B, L, D), got {tuple(states.shape)}")
        if states.shape[-1] % num_relation_heads != 0:
            raise ValueError(
                f"minilm_relation_kl: {who} width {states.shape[-1]} is not divisible by "
                f"num_relation_heads={num_relation_heads}; choose a common divisor of both widths"
            )
    if student_states.shape[:2] != teacher_states.shape[:2]:
        raise ValueError(
            f"minilm_relation_kl: student {tuple(student_states.shape)} and teacher "
            f"{tuple(teacher_states.shape)} differ in (B, L)"
        )
    key_mask = None if mask is None else mask.to(device=student_states.device, dtype=torch.bool)

    def relation_log_probs(states: Tensor) -> Tensor:
        b, length, width = states.shape
        d_r = width // num_relation_heads
        heads = states.view(b, length, num_relation_heads, d_r).transpose(1, 2)  # (B, Rh, L, d_r)
        scores = heads @ heads.transpose(-1, -2) / (math.sqrt(d_r) * temperature)  # (B, Rh, L, L)
        if key_mask is not None:
            # The dtype's minimum rather than −inf: an all-padding sequence then stays finite (it is not
            # counted) instead of putting NaN into the gradients of everything else.
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)

    per_row = temperature**2 * kl(relation_log_probs(teacher_states), relation_log_probs(student_states))
    row_mask = None if key_mask is None else key_mask[:, None, :].expand_as(per_row)  # (B, Rh, L)
    return sum_and_count(per_row, row_mask, "minilm_relation_kl")


def cls_pkd(
    student_cls: Tensor, teacher_cls: Tensor, *, projection: Projection | None = None
) -> tuple[Tensor, Tensor]:
    """Patient-KD (Sun et al. 2019): squared distance between L2-normalised [CLS] vectors of one layer pair.

    loss_b = ‖ W h_S(b) / ‖W h_S(b)‖₂ − h_T(b) / ‖h_T(b)‖₂ ‖₂²,   W = projection (identity when None)

    student_cls: (B, Ds)   teacher_cls: (B, Dt)   projection: maps Ds → Dt; needed when Ds ≠ Dt.
    For several layer pairs (PKD-skip, PKD-last) call it per pair and add totals and counts; the count then
    counts (layer, row) pairs.
    Returns (sum over rows, B).
    """
    student_cls = project(student_cls, teacher_cls, projection, "cls_pkd")
    per_row = (F.normalize(student_cls, dim=-1) - F.normalize(teacher_cls, dim=-1)).pow(2).sum(-1)  # (B,)
    return sum_and_count(per_row, None, "cls_pkd")
