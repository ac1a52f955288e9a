"""Token-level losses for causal LMs (one item = one token): forward and reverse KL, the generalized
Jensen-Shannon divergence, DistiLLM's skew KLs, the forward KL against a cached top-k teacher, and the next-token
cross-entropy with the data.

logits: (B, T, V), already aligned with the positions they predict (the caller shifts); mask: (B, T) bool,
True = the token counts (e.g. completion tokens, not prompt or padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.shared import check_temperature, cross_entropy_sum, kl, softened_log_probs, sum_and_count


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w · p + (1 − w) · q), computed in log space so that tiny probabilities do not underflow."""
    if weight_p == 0.0:
        return log_q
    if weight_p == 1.0:
        return log_p
    return torch.logsumexp(
        torch.stack([log_p + math.log(weight_p), log_q + math.log(1.0 - weight_p)]), dim=0
    )


def _check_unit_interval(value: float, name: str, what: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what}: {name} must be in [0, 1], got {value}")


def forward_kl_tokens(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Forward KL per token (word-level KD, Kim & Rush 2016; Hinton et al. 2015), mass-covering.

    loss_(b,t) = T² · KL(p_T ‖ p_S) = T² · Σ_v p_T(v) · (log p_T(v) − log p_S(v)),   p_X = softmax(logits_X / T)

    student_logits, teacher_logits: (B, T, V)   mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    log_p_s, log_p_t = softened_log_probs(student_logits, teacher_logits, temperature, "forward_kl_tokens")
    per_token = temperature**2 * kl(log_p_t, log_p_s)  # (B, T)
    return sum_and_count(per_token, mask, "forward_kl_tokens")


def reverse_kl_tokens(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reverse KL per token (MiniLLM, Gu et al. 2024; GKD, Agarwal et al. 2023), mode-seeking.

    loss_(b,t) = T² · KL(p_S ‖ p_T) = T² · Σ_v p_S(v) · (log p_S(v) − log p_T(v)),   p_X = softmax(logits_X / T)

    student_logits, teacher_logits: (B, T, V)   mask: (B, T) bool
    Returns (sum over counted tokens, number of counted tokens).
    """
    log_p_s, log_p_t = softened_log_probs(student_logits, teacher_logits, temperature, "reverse_kl_tokens")
    per_token = temperature**2 * kl(log_p_s, log_p_t)  # (B, T)
    return sum_and_count(per_token, mask, "reverse_kl_tokens")


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
    log_p_s, log_p_t = softened_log_probs(student_logits, teacher_logits, temperature, "generalized_jsd_tokens")
    if beta == 0.0:
        per_token = kl(log_p_t, log_p_s)
    elif beta == 1.0:
        per_token = kl(log_p_s, log_p_t)
    else:
        log_m = _log_mixture(log_p_t, log_p_s, beta)
        per_token = beta * kl(log_p_t, log_m) + (1.0 - beta) * kl(log_p_s, log_m)
    return sum_and_count(temperature**2 * per_token, mask, "generalized_jsd_tokens")  # (B, T)


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
    log_p_s, log_p_t = softened_log_probs(student_logits, teacher_logits, temperature, "skew_kl_tokens")
    per_token = temperature**2 * kl(log_p_t, _log_mixture(log_p_t, log_p_s, alpha))  # (B, T)
    return sum_and_count(per_token, mask, "skew_kl_tokens")


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
    log_p_s, log_p_t = softened_log_probs(student_logits, teacher_logits, temperature, "skew_reverse_kl_tokens")
    per_token = temperature**2 * kl(log_p_s, _log_mixture(log_p_s, log_p_t, alpha))  # (B, T)
    return sum_and_count(per_token, mask, "skew_reverse_kl_tokens")


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
    check_temperature(temperature, "topk_forward_kl_tokens")
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
    per_token = temperature**2 * kl(log_q_t, log_q_s)  # (B, T)
    return sum_and_count(per_token, mask, "topk_forward_kl_tokens")


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
    return cross_entropy_sum(logits, labels, mask, ignore_index, "lm_ce_tokens")
