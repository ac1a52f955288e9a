"""Distillation losses as pure tensor functions.

Every loss returns ``(total, count)``:

* ``total``: a 0-dim, differentiable tensor, the SUM of the per-item losses over the counted items;
* ``count``: a 0-dim int64 tensor, the number of counted items (each docstring says what an item is).

Nothing here averages. The caller divides ``Σ total / Σ count`` over every micro-batch and process, so that
gradient accumulation and data parallelism give the same loss as one big batch. When nothing is counted
(``count == 0``) ``total`` is 0; clamp the count to at least 1 before dividing.

Masks are ``True``/1 where an item counts (a Hugging Face ``attention_mask`` works as is). Masked items are
excluded with ``torch.where``, never by multiplying, because a padded item may hold inf/NaN and 0·inf = NaN.

Every KL computed on temperature-softened logits is multiplied by T², as in Hinton et al. (2015): softening
scales the gradients by 1/T², and T² keeps the term's magnitude comparable across temperatures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "soft_kl",
    "average_teacher_logprobs",
    "hard_ce",
    "hidden_mse",
    "hidden_cosine",
    "attention_kl",
    "attention_mse",
    "minilm_relation_kl",
    "cls_pkd",
    "forward_kl_tokens",
    "reverse_kl_tokens",
    "generalized_jsd_tokens",
    "skew_kl_tokens",
    "skew_reverse_kl_tokens",
    "topk_forward_kl_tokens",
    "lm_ce_tokens",
    "uld_loss",
    "aligned_kd_loss",
    "temperature_at",
    "pooled_mse",
    "pooled_cosine",
    "pooled_contrastive",
]

Projection = Callable[[Tensor], Tensor]

# Attention maps come as probabilities, so their logs need a floor; padded keys have probability ~0.
_ATTN_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def _sum_and_count(per_item: Tensor, mask: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    """Sum ``per_item`` over the items where ``mask`` is True; count those items."""
    if mask is None:
        return per_item.sum(), torch.tensor(per_item.numel(), device=per_item.device)
    mask = mask.to(device=per_item.device, dtype=torch.bool)
    if mask.shape != per_item.shape:
        raise ValueError(f"{what}: mask has shape {tuple(mask.shape)}, expected {tuple(per_item.shape)}")
    return torch.where(mask, per_item, 0.0).sum(), mask.sum()


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dimension, from log-probabilities: Σ p · (log p − log q).

    Classes with p = 0 contribute exactly 0, also when log p or log q is −inf (a logit masked to −inf), where
    the plain formula would give 0 · (−inf) = NaN in the value or the gradient.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w · p + (1 − w) · q), computed in log space so that tiny probabilities do not underflow."""
    if weight_p == 0.0:
        return log_q
    if weight_p == 1.0:
        return log_p
    return torch.logsumexp(
        torch.stack([log_p + math.log(weight_p), log_q + math.log(1.0 - weight_p)]), dim=0
    )


def _check_temperature(temperature: float, what: str) -> None:
    if not temperature > 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")


def _check_unit_interval(value: float, name: str, what: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what}: {name} must be in [0, 1], got {value}")


def _softened_log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float, what: str):
    _check_temperature(temperature, what)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{what}: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ in shape (same vocabulary/classes needed)"
        )
    return (
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
    )


def _project(student: Tensor, teacher: Tensor, projection: Projection | None, what: str) -> Tensor:
    if projection is not None:
        student = projection(student)
    if student.shape != teacher.shape:
        hint = "" if projection is not None else "; pass projection= to map the student's width to the teacher's"
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape{hint}"
        )
    return student


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


# ----------------------------------------------------------------------------------------------------------
# Logit distillation (sequence level: one item = one row)
# ----------------------------------------------------------------------------------------------------------


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
        log_p_s, log_p_t = _softened_log_probs(student_logits, teacher_logits, temperature, "soft_kl")
    else:
        _check_temperature(temperature, "soft_kl")
        if teacher_log_probs.shape != student_logits.shape:
            raise ValueError(
                f"soft_kl: teacher_log_probs {tuple(teacher_log_probs.shape)} and student_logits "
                f"{tuple(student_logits.shape)} differ in shape"
            )
        log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_t = teacher_log_probs
    per_row = temperature**2 * _kl(log_p_t, log_p_s)  # (N,)
    return _sum_and_count(per_row, mask, "soft_kl")


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
    _check_temperature(temperature, "average_teacher_logprobs")
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
    return _cross_entropy_sum(logits, labels, gold if mask is None else gold & mask.to(gold.device, torch.bool),
                              -100, "hard_ce")


def _cross_entropy_sum(logits, labels, mask, ignore_index, what):
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"{what}: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.to(device=labels.device, dtype=torch.bool)
    # Uncounted rows may hold any label value; give them a valid class so cross_entropy does not fail on them.
    safe_labels = torch.where(counted, labels, 0)
    per_item = F.cross_entropy(logits.flatten(0, -2), safe_labels.flatten(), reduction="none")
    return _sum_and_count(per_item.view(labels.shape), counted, what)


# ----------------------------------------------------------------------------------------------------------
# Intermediate layers (encoders)
# ----------------------------------------------------------------------------------------------------------


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
    student_hidden = _project(student_hidden, teacher_hidden, projection, "hidden_mse")
    per_token = (student_hidden - teacher_hidden).pow(2).sum(-1)  # (B, L)
    total, tokens = _sum_and_count(per_token, mask, "hidden_mse")
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
    student_hidden = _project(student_hidden, teacher_hidden, projection, "hidden_cosine")
    per_token = 1.0 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)  # (B, L)
    return _sum_and_count(per_token, mask, "hidden_cosine")


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
    return _sum_and_count(per_row, mask, "attention_kl")


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
    return _sum_and_count(per_elem, mask, "attention_mse")


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
    _check_temperature(temperature, "minilm_relation_kl")
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

    per_row = temperature**2 * _kl(relation_log_probs(teacher_states), relation_log_probs(student_states))
    row_mask = None if key_mask is None else key_mask[:, None, :].expand_as(per_row)  # (B, Rh, L)
    return _sum_and_count(per_row, row_mask, "minilm_relation_kl")


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
    student_cls = _project(student_cls, teacher_cls, projection, "cls_pkd")
    per_row = (F.normalize(student_cls, dim=-1) - F.normalize(teacher_cls, dim=-1)).pow(2).sum(-1)  # (B,)
    return _sum_and_count(per_row, None, "cls_pkd")


# ----------------------------------------------------------------------------------------------------------
# Token-level losses for causal LMs (one item = one token)
#
# logits: (B, T, V), already aligned with the positions they predict (the caller shifts); mask: (B, T) bool,
# True = the token counts (e.g. completion tokens, not prompt or padding).
# ----------------------------------------------------------------------------------------------------------


def forward_kl_tokens(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Forward KL per token (word-level KD, Kim & Rush 2016; Hinton et al. 2015), mass-covering.

    loss_(b,t) = T² · KL(p_T ‖ p_S) = T² · Σ_v p_T(v) · (log p_T(v) − log p_S(v)),   p_X = softmax(logits_X / T)

    student_logits, teacher_logits: (B, T, V)   mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    log_p_s, log_p_t = _softened_log_probs(student_logits, teacher_logits, temperature, "forward_kl_tokens")
    per_token = temperature**2 * _kl(log_p_t, log_p_s)  # (B, T)
    return _sum_and_count(per_token, mask, "forward_kl_tokens")


def reverse_kl_tokens(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reverse KL per token (MiniLLM, Gu et al. 2024; GKD, Agarwal et al. 2023), mode-seeking.

    loss_(b,t) = T² · KL(p_S ‖ p_T) = T² · Σ_v p_S(v) · (log p_S(v) − log p_T(v)),   p_X = softmax(logits_X / T)

    student_logits, teacher_logits: (B, T, V)   mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    log_p_s, log_p_t = _softened_log_probs(student_logits, teacher_logits, temperature, "reverse_kl_tokens")
    per_token = temperature**2 * _kl(log_p_s, log_p_t)  # (B, T)
    return _sum_and_count(per_token, mask, "reverse_kl_tokens")


def generalized_jsd_tokens(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalized Jensen-Shannon divergence per token (GKD, Agarwal et al. 2023, Eq. 1).

    loss_(b,t) = T² · [β · KL(p_T ‖ M) + (1 − β) · KL(p_S ‖ M)],   M = β · p_T + (1 − β) · p_S,   0 < β < 1

    Endpoints, as TRL's GKDTrainer.generalized_jsd_loss: β = 0 returns the forward KL(p_T ‖ p_S) and β = 1
    the reverse KL(p_S ‖ p_T), exactly. The mixture formula itself is 0 at both endpoints (M equals the
    distribution being compared), so the endpoints are special cases, not limits: the value jumps at β = 0
    and β = 1. β = 0.5 is the symmetric Jensen-Shannon divergence.

    student_logits, teacher_logits: (B, T, V)   mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    _check_unit_interval(beta, "beta", "generalized_jsd_tokens")
    log_p_s, log_p_t = _softened_log_probs(student_logits, teacher_logits, temperature, "generalized_jsd_tokens")
    if beta == 0.0:
        per_token = _kl(log_p_t, log_p_s)
    elif beta == 1.0:
        per_token = _kl(log_p_s, log_p_t)
    else:
        log_m = _log_mixture(log_p_t, log_p_s, beta)
        per_token = beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)
    return _sum_and_count(temperature**2 * per_token, mask, "generalized_jsd_tokens")  # (B, T)


def skew_kl_tokens(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Skew forward KL per token (DistiLLM, Ko et al. 2024).

    loss_(b,t) = T² · KL(p_T ‖ α · p_T + (1 − α) · p_S),   α ∈ [0, 1]; 0.1 is DistiLLM's default

    Mixing some teacher into the student's side keeps the divergence bounded (≤ −log α) when the student puts
    almost no mass where the teacher does. α = 0 is the plain forward KL; the gradient reaches the student
    through the mixture.
    student_logits, teacher_logits: (B, T, V)   mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    _check_unit_interval(alpha, "alpha", "skew_kl_tokens")
    log_p_s, log_p_t = _softened_log_probs(student_logits, teacher_logits, temperature, "skew_kl_tokens")
    per_token = temperature**2 * _kl(log_p_t, _log_mixture(log_p_t, log_p_s, alpha))  # (B, T)
    return _sum_and_count(per_token, mask, "skew_kl_tokens")


def skew_reverse_kl_tokens(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Skew reverse KL per token (DistiLLM, Ko et al. 2024).

    loss_(b,t) = T² · KL(p_S ‖ α · p_S + (1 − α) · p_T),   α ∈ [0, 1]; α = 0 is the plain reverse KL

    student_logits, teacher_logits: (B, T, V)   mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    _check_unit_interval(alpha, "alpha", "skew_reverse_kl_tokens")
    log_p_s, log_p_t = _softened_log_probs(student_logits, teacher_logits, temperature, "skew_reverse_kl_tokens")
    per_token = temperature**2 * _kl(log_p_s, _log_mixture(log_p_s, log_p_t, alpha))  # (B, T)
    return _sum_and_count(per_token, mask, "skew_reverse_kl_tokens")


def topk_forward_kl_tokens(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward KL per token against a cached teacher stored as its top-K log-probabilities.

    Both distributions are renormalised over the teacher's stored support S (the K indices of each token):
        q_T = softmax(teacher_topk_logprobs / T)              over the K stored values
        q_S = log_softmax(gather(student_logits, S) / T)      over the same K vocabulary entries
        loss_(b,t) = T² · KL(q_T ‖ q_S)
    Because log p_T = z_T − logsumexp(z_T), q_T equals the teacher's T-softened distribution conditioned on S,
    whatever temperature the cache was written at (as long as it stored log-probs or logits at T = 1).
    With K = V this is exactly ``forward_kl_tokens``.

    student_logits: (B, T, V)   teacher_topk_logprobs: (B, T, K)   teacher_topk_indices: (B, T, K) int
    mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    _check_temperature(temperature, "topk_forward_kl_tokens")
    if teacher_topk_logprobs.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"topk_forward_kl_tokens: teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} and "
            f"teacher_topk_indices {tuple(teacher_topk_indices.shape)} differ in shape"
        )
    if teacher_topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"topk_forward_kl_tokens: teacher cache {tuple(teacher_topk_indices.shape)} does not match "
            f"student_logits {tuple(student_logits.shape)} in (B, T)"
        )
    student_topk = student_logits.gather(-1, teacher_topk_indices.long())  # (B, T, K)
    log_q_s = F.log_softmax(student_topk / temperature, dim=-1)
    log_q_t = F.log_softmax(teacher_topk_logprobs.to(student_logits.dtype) / temperature, dim=-1)
    per_token = temperature**2 * _kl(log_q_t, log_q_s)  # (B, T)
    return _sum_and_count(per_token, mask, "topk_forward_kl_tokens")


def lm_ce_tokens(
    logits: Tensor, labels: Tensor, *, mask: Tensor | None = None, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy with the data (the supervised term of a causal LM).

    loss_(b,t) = −log softmax(logits(b,t))(labels(b,t))

    Inputs are already aligned: logits[:, t] predicts labels[:, t]; the caller shifts (logits[:, :-1] with
    input_ids[:, 1:]). Nothing is shifted here.
    logits: (B, T, V)   labels: (B, T) int   mask: (B, T) bool
    A token counts when mask is True and its label is not ``ignore_index``.
    Returns (sum over counted tokens, number of counted tokens).
    """
    return _cross_entropy_sum(logits, labels, mask, ignore_index, "lm_ce_tokens")


# ----------------------------------------------------------------------------------------------------------
# Cross-tokenizer logit distillation (causal LMs over different vocabularies; one item = one aligned position)
#
# The caller pairs positions first (kdistill.tokenalign.aligned_positions: both models have read the same text)
# and gathers both models' logits there, so rows i of student and teacher inputs describe the same prediction.
# Probabilities are computed in float32: the losses sum |differences| over vocabularies of 10⁵ entries.
# ----------------------------------------------------------------------------------------------------------


def _cross_teacher_log_probs(
    teacher_logits: Tensor | None, teacher_topk_logprobs: Tensor | None, temperature: float, what: str
) -> Tensor:
    """The teacher's T-softened log-probabilities over the entries it is given: (..., Vt) logits or (..., K) top-k.

    Top-k (log p_T at T = 1 of K of the Vt entries, as kdistill/cache.py stores them): the stored mass
    s = Σ_K p_T keeps its size and is shared out at temperature T,  p̃(v) = s · softmax_K(log p_T / T)(v);  the
    mass 1 − s of the entries not stored counts as zeros. Exact at T = 1 (p̃ = p_T) and at K = Vt (p̃ =
    softmax(z / T)); in between the tail's share is held at its T = 1 size, as the cache cannot tell how
    softening would move it.
    """
    _check_temperature(temperature, what)
    if (teacher_logits is None) == (teacher_topk_logprobs is None):
        raise ValueError(f"{what}: give exactly one of teacher_logits and the teacher's top-k log-probs")
    if teacher_logits is not None:
        return F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_p = teacher_topk_logprobs.float()
    return F.log_softmax(log_p / temperature, dim=-1) + torch.logsumexp(log_p, dim=-1, keepdim=True)


def _check_rows(student_logits: Tensor, teacher: Tensor, what: str) -> None:
    if student_logits.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{what}: student_logits {tuple(student_logits.shape)} and teacher {tuple(teacher.shape)} differ in "
            f"their leading (position) dimensions; pair the positions first (kdistill.tokenalign)"
        )


def _sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Σ_j |sort↓(p)_j − sort↓(q)_j| over the last dimension, the shorter vector padded with zeros.

    p: (..., Vp) ≥ 0   q: (..., Vq) ≥ 0.  Only the shorter length k is sorted in the longer vector (topk), which
    matters when one side is a teacher's top-k: its entries past k face padding zeros, |x − 0| = x, so they add
    their sum, taken as (sum of all) − (sum of the top k).
    """
    short, long = (p, q) if p.shape[-1] <= q.shape[-1] else (q, p)
    k = short.shape[-1]
    short_sorted = short.sort(dim=-1, descending=True).values  # (..., k)
    long_head = long.topk(k, dim=-1).values  # (..., k), sorted
    distance = (short_sorted - long_head).abs().sum(-1)
    if long.shape[-1] > k:
        distance = distance + (long.sum(-1) - long_head.sum(-1))
    return distance


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    teacher_topk_logprobs: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal
    Logit Distillation Loss for LLMs"): compares the two next-token distributions as sorted probability vectors,
    so the vocabularies need not match in size or meaning.

    loss_i = Σ_j | sort↓(p_S,i)_j − sort↓(p_T,i)_j |,   p_X = softmax(logits_X / T),
    the shorter vector padded with zeros: the closed form of the 1-D Wasserstein distance between the sorted
    distributions, as in the paper's implementation (which also has no T² factor: this is not a KL).
    It is 0 for any permutation of the same distribution, and unchanged by zero-probability entries added to
    either vocabulary. It sees only the shape of the distribution, not which token carries which probability;
    ``aligned_kd_loss`` adds the token identities where the vocabularies share tokens.

    student_logits: (N, Vs)   teacher_logits: (N, Vt)   mask: (N,) bool, True = counts
    teacher_topk_logprobs: (N, K), instead of teacher_logits: the teacher's K largest log-probabilities at T = 1
        (the top-k cache, kdistill/cache.py); the mass of the entries not stored counts as zeros, and T softens
        as described in ``_cross_teacher_log_probs`` (exact at T = 1 and at K = Vt).
    Give exactly one of teacher_logits and teacher_topk_logprobs. Any leading dimensions (N, ...) work alike.
    Returns (sum over counted positions, number of counted positions).
    """
    teacher = teacher_logits if teacher_logits is not None else teacher_topk_logprobs
    if teacher is not None:
        _check_rows(student_logits, teacher, "uld_loss")
    log_p_t = _cross_teacher_log_probs(teacher_logits, teacher_topk_logprobs, temperature, "uld_loss")
    p_s = F.softmax(student_logits.float() / temperature, dim=-1)  # (N, Vs)
    per_position = _sorted_l1(p_s, log_p_t.exp())  # (N,)
    return _sum_and_count(per_position, mask, "uld_loss")


def aligned_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    shared: tuple[Tensor, Tensor],
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    temperature: float = 1.0,
    uld_weight: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-tokenizer KD with the shared vocabulary mapped token to token, and ULD for the rest.

    With the tokens both vocabularies hold (``shared``: teacher id t(m) ↔ student id s(m), from
    ``kdistill.tokenalign.shared_vocab``), each aligned position's distributions split in two parts:

    shared part: both distributions conditioned on "the next token is a shared one" (renormalised over the
        shared tokens) and compared by forward KL, token by token:
            q_T(m) = p_T(t(m)) / Σ_m' p_T(t(m')),   q_S(m) = p_S(s(m)) / Σ_m' p_S(s(m'))
    rest: the probabilities of the tokens outside the shared vocabulary, NOT renormalised, compared by ULD
        (``uld_loss``'s sorted L1, zero-padded); it also carries any disagreement on how much mass the shared
        part holds, which the renormalised KL cannot see.

        loss_i = T² · KL(q_T ‖ q_S) + uld_weight · Σ_j |sort↓(p_S|rest)_j − sort↓(p_T|rest)_j|,
        p_X = softmax(logits_X / T)

    This is the split of GOLD (Hugging Face TRL's GOLDTrainer, "hybrid ULD", 2025: a direct comparison on the
    matched tokens, sorting only for the unmatched ones), with two differences: the matched part is a forward
    KL on renormalised distributions (GOLD: a JSD), which makes the same-tokenizer case (all tokens shared) exactly
    ``forward_kl_tokens`` and matches how the top-k cache conditions on its support; and tokens are matched
    after byte normalisation (``shared_vocab``), not as raw vocabulary strings.

    student_logits: (N, Vs)   teacher_logits: (N, Vt)   mask: (N,) bool, True = counts
    shared: (teacher_ids (M,), student_ids (M,)) int, one to one (no id twice on either side).
    teacher_topk: (log-probs (N, K) at T = 1, vocabulary ids (N, K)), instead of teacher_logits (the top-k cache):
        the shared part is taken over the stored entries that are shared (a position with none adds 0 there),
        the rest compares the stored unshared entries (missing mass = zeros, as in ``uld_loss``) with the
        student's unshared tokens.
    Give exactly one of teacher_logits and teacher_topk. Any leading dimensions (N, ...) work alike.
    Returns (sum over counted positions, number of counted positions).
    """
    teacher_ids, student_ids = (ids.to(device=student_logits.device, dtype=torch.long) for ids in shared)
    if teacher_ids.shape != student_ids.shape or teacher_ids.dim() != 1:
        raise ValueError(f"aligned_kd_loss: shared ids must be two (M,) tensors, got {tuple(teacher_ids.shape)} "
                         f"and {tuple(student_ids.shape)}")
    if uld_weight < 0:
        raise ValueError(f"aligned_kd_loss: uld_weight must be >= 0, got {uld_weight}")
    topk_logprobs, topk_ids = teacher_topk if teacher_topk is not None else (None, None)
    if teacher_topk is not None and topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"aligned_kd_loss: teacher top-k log-probs {tuple(topk_logprobs.shape)} and ids "
                         f"{tuple(topk_ids.shape)} differ in shape")
    teacher = teacher_logits if teacher_logits is not None else topk_logprobs
    if teacher is not None:
        _check_rows(student_logits, teacher, "aligned_kd_loss")
    log_p_t = _cross_teacher_log_probs(teacher_logits, topk_logprobs, temperature, "aligned_kd_loss")  # (N, K or Vt)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, Vs)

    vocab_s = log_p_s.shape[-1]
    if teacher_logits is not None:
        vocab_t = log_p_t.shape[-1]
    else:  # the teacher's vocabulary size is not given: the table only needs to reach every id it is asked for
        vocab_t = max(int(topk_ids.max()) if topk_ids.numel() else 0,  # (no position: a batch of 1-token pieces)
                      int(teacher_ids.max()) if teacher_ids.numel() else 0) + 1
    if teacher_ids.numel() and (int(teacher_ids.max()) >= vocab_t or int(student_ids.max()) >= vocab_s):
        raise ValueError(f"aligned_kd_loss: shared ids reach past the vocabularies (teacher {vocab_t}, student "
                         f"{vocab_s}); build them from these two models' tokenizers")
    to_student = torch.full((vocab_t,), -1, dtype=torch.long, device=log_p_s.device)
    to_student[teacher_ids] = student_ids
    # mapped: the student id of each teacher entry (-1 = not shared); student_at: log p_S of that student token
    if teacher_logits is not None:  # entry v is teacher token v at every position: one (Vt,) row serves all
        mapped = to_student  # (Vt,)
        student_at = log_p_s.index_select(-1, mapped.clamp_min(0))  # (N, Vt)
    else:
        mapped = to_student[topk_ids.to(device=log_p_s.device, dtype=torch.long)]  # (N, K)
        student_at = log_p_s.gather(-1, mapped.clamp_min(0))  # (N, K)
    is_shared = mapped >= 0

    # The dtype's minimum rather than −inf for the unshared entries: a position with no shared entry then stays
    # finite (it adds 0) instead of putting NaN into the gradients.
    floor = torch.finfo(log_p_s.dtype).min
    log_q_t = F.log_softmax(log_p_t.masked_fill(~is_shared, floor), dim=-1)
    log_q_s = F.log_softmax(student_at.masked_fill(~is_shared, floor), dim=-1)
    shared_kl = torch.where(is_shared.any(-1), _kl(log_q_t, log_q_s), 0.0)  # (N,)

    student_shared = torch.zeros(vocab_s, dtype=torch.bool, device=log_p_s.device)
    student_shared[student_ids] = True
    # zeroed shared entries sort last, where they act as ULD's padding
    rest_t = torch.where(is_shared, 0.0, log_p_t.exp())  # (N, K or Vt)
    rest_s = torch.where(student_shared, 0.0, log_p_s.exp())  # (N, Vs)
    per_position = temperature**2 * shared_kl + uld_weight * _sorted_l1(rest_s, rest_t)  # (N,)
    return _sum_and_count(per_position, mask, "aligned_kd_loss")


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------


def temperature_at(
    step: int,
    total_steps: int,
    *,
    start: float,
    end: float | None = None,
    schedule: str = "constant",
) -> float:
    """Temperature at ``step`` of ``total_steps`` (a pure function of the step).

    constant: start
    linear:   start + (end − start) · s
    cosine:   end + (start − end) · (1 + cos(π · s)) / 2
    with s = clamp(step / total_steps, 0, 1), so steps past total_steps stay at ``end``.
    """
    if schedule == "constant":
        return float(start)
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"temperature_at: unknown schedule {schedule!r}; use 'constant', 'linear' or 'cosine'")
    if end is None:
        raise ValueError(f"temperature_at: schedule {schedule!r} needs end=")
    if total_steps <= 0:
        raise ValueError(f"temperature_at: total_steps must be > 0, got {total_steps}")
    s = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return float(start + (end - start) * s)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * s)))


# ----------------------------------------------------------------------------------------------------------
# Sentence embeddings (task: embedding): one pooled vector per text
# ----------------------------------------------------------------------------------------------------------


def _pooled_pair(student: Tensor, teacher: Tensor, projection: Projection | None, what: str) -> Tensor:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"{what}: expected (B, D) pooled embeddings, got student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    return _project(student, teacher, projection, what)


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
    _check_temperature(temperature, "pooled_contrastive")
    student = _pooled_pair(student, teacher, projection, "pooled_contrastive")
    sims = F.normalize(student, dim=-1) @ F.normalize(teacher, dim=-1).T / temperature  # (B, B)
    targets = torch.arange(sims.shape[0], device=sims.device)
    total = F.cross_entropy(sims, targets, reduction="sum")
    return total, torch.tensor(float(sims.shape[0]), device=sims.device)
