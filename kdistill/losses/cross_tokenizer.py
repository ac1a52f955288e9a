"""Cross-tokenizer logit distillation (causal LMs over different vocabularies; one item = one aligned position):
Universal Logit Distillation (`uld_loss`) and the shared vocabulary mapped token to token with ULD for the rest
(`aligned_kd_loss`).

The caller pairs positions first (kdistill.tokenalign.aligned_positions: both models have read the same text)
and gathers both models' logits there, so rows i of student and teacher inputs describe the same prediction.
Probabilities are computed in float32: the losses sum |differences| over vocabularies of 10⁵ entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.shared import check_temperature, kl, sum_and_count


def _cross_teacher_log_probs(
    teacher_logits: Tensor | None, teacher_topk_logprobs: Tensor | None, temperature: float, what: str
) -> Tensor:
    """The teacher's T-softened log-probabilities over the entries it is given: (..., Vt) logits or (..., K) top-k.

    Top-k (log p_T at T = 1 of K of the Vt entries, as kdistill.cache stores them): the stored mass
    s = Σ_K p_T keeps its size and is shared out at temperature T,  p̃(v) = s · softmax_K(log p_T / T)(v);  the
    mass 1 − s of the entries not stored counts as zeros. Exact at T = 1 (p̃ = p_T) and at K = Vt (p̃ =
    softmax(z / T)); in between the tail's share is held at its T = 1 size, as the cache cannot tell how
    softening would move it.
    """
    check_temperature(temperature, what)
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
        (the top-k cache, kdistill.cache); the mass of the entries not stored counts as zeros, and T softens
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
    return sum_and_count(per_position, mask, "uld_loss")


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

    Why long: half of it is this docstring (the formula, the paper, the shapes); the code is the two parts of one
    formula, over full logits or the top-k cache.
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
    shared_kl = torch.where(is_shared.any(-1), kl(log_q_t, log_q_s), 0.0)  # (N,)

    student_shared = torch.zeros(vocab_s, dtype=torch.bool, device=log_p_s.device)
    student_shared[student_ids] = True
    # zeroed shared entries sort last, where they act as ULD's padding
    rest_t = torch.where(is_shared, 0.0, log_p_t.exp())  # (N, K or Vt)
    rest_s = torch.where(student_shared, 0.0, log_p_s.exp())  # (N, Vs)
    per_position = temperature**2 * shared_kl + uld_weight * _sorted_l1(rest_s, rest_t)  # (N,)
    return sum_and_count(per_position, mask, "aligned_kd_loss")
