"""Losses: analytic cases, masking, reference computations, accumulation invariance, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill import losses as L

torch.manual_seed(0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def attn_probs(b, h, n, seed=0, mask=None):
    """Random attention probabilities (B, H, L, L); padded keys get 0 like a real masked softmax."""
    scores = randn(b, h, n, n, seed=seed) * 2
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


B, T, V = 2, 5, 7
MASK_TOK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # (B, T), 8 tokens count


# ------------------------------------------------------------------------------------------------------
# Every divergence is 0 when the student equals the teacher
# ------------------------------------------------------------------------------------------------------

TOKEN_DIVERGENCES = {
    "forward": lambda s, t, **kw: L.forward_kl_tokens(s, t, **kw),
    "reverse": lambda s, t, **kw: L.reverse_kl_tokens(s, t, **kw),
    "gjsd0": lambda s, t, **kw: L.generalized_jsd_tokens(s, t, beta=0.0, **kw),
    "gjsd.3": lambda s, t, **kw: L.generalized_jsd_tokens(s, t, beta=0.3, **kw),
    "gjsd1": lambda s, t, **kw: L.generalized_jsd_tokens(s, t, beta=1.0, **kw),
    "skew": lambda s, t, **kw: L.skew_kl_tokens(s, t, alpha=0.1, **kw),
    "skew_rev": lambda s, t, **kw: L.skew_reverse_kl_tokens(s, t, alpha=0.1, **kw),
    "topk": lambda s, t, **kw: L.topk_forward_kl_tokens(s, *t.log_softmax(-1).topk(3, dim=-1), **kw),
}


@pytest.mark.parametrize("name", list(TOKEN_DIVERGENCES))
def test_token_divergences_zero_for_identical_logits_and_positive_otherwise(name):
    fn = TOKEN_DIVERGENCES[name]
    z = randn(B, T, V, seed=1) * 3
    total, count = fn(z, z.clone(), temperature=2.0, mask=MASK_TOK)
    assert total.dim() == 0 and abs(total.item()) < 1e-5
    assert int(count) == 8
    total_diff, _ = fn(randn(B, T, V, seed=2) * 3, z, temperature=2.0, mask=MASK_TOK)
    assert total_diff.item() > 1e-3


def test_sequence_and_layer_divergences_zero_for_identical_inputs():
    z = randn(4, 6, seed=1)
    assert L.soft_kl(z, z.clone(), temperature=3.0)[0].abs().item() < 1e-6
    h = randn(2, 4, 8, seed=2)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert L.hidden_mse(h, h.clone(), mask=m)[0].item() == 0.0
    assert L.hidden_cosine(h, h.clone(), mask=m)[0].abs().item() < 1e-6
    a = attn_probs(2, 3, 4, seed=3, mask=m)
    assert L.attention_kl(a, a.clone(), mask=m)[0].abs().item() < 1e-6
    assert L.attention_mse(a, a.clone(), mask=m)[0].item() == 0.0
    assert L.minilm_relation_kl(h, h.clone(), num_relation_heads=2, mask=m)[0].abs().item() < 1e-5
    assert L.cls_pkd(h[:, 0], h[:, 0].clone())[0].abs().item() < 1e-6


# ------------------------------------------------------------------------------------------------------
# Agreement with straightforward references, and the T² factor
# ------------------------------------------------------------------------------------------------------


def test_soft_kl_matches_manual_formula_with_t_squared():
    s, t, temp = randn(4, 6, seed=1), randn(4, 6, seed=2), 4.0
    p_t = (t / temp).softmax(-1)
    manual = (p_t * (p_t.log() - (s / temp).log_softmax(-1))).sum()
    total, count = L.soft_kl(s, t, temperature=temp)
    assert int(count) == 4
    torch.testing.assert_close(total, temp**2 * manual)
    ref = F.kl_div((s / temp).log_softmax(-1), p_t, reduction="sum") * temp**2
    torch.testing.assert_close(total, ref)


def test_token_forward_and_reverse_kl_match_kl_div_with_t_squared():
    s, t, temp = randn(B, T, V, seed=1), randn(B, T, V, seed=2), 2.0
    ls, lt = (s / temp).log_softmax(-1), (t / temp).log_softmax(-1)
    fwd = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)[MASK_TOK].sum() * temp**2
    rev = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)[MASK_TOK].sum() * temp**2
    torch.testing.assert_close(L.forward_kl_tokens(s, t, temperature=temp, mask=MASK_TOK)[0], fwd)
    torch.testing.assert_close(L.reverse_kl_tokens(s, t, temperature=temp, mask=MASK_TOK)[0], rev)
    assert not torch.allclose(fwd, rev)  # the two directions are genuinely different numbers here


def test_hard_ce_and_lm_ce_match_cross_entropy_sum():
    logits, labels = randn(5, 4, seed=1), torch.tensor([0, 3, -100, 1, 2])
    total, count = L.hard_ce(logits, labels)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels, reduction="sum"))
    assert int(count) == 4

    lm_logits = randn(B, T, V, seed=2)
    lm_labels = torch.randint(0, V, (B, T), generator=_gen(3))
    lm_labels[0, 0] = -100
    total, count = L.lm_ce_tokens(lm_logits, lm_labels, mask=MASK_TOK)
    ref_labels = lm_labels.masked_fill(~MASK_TOK, -100)
    ref = F.cross_entropy(lm_logits.view(-1, V), ref_labels.view(-1), reduction="sum")
    torch.testing.assert_close(total, ref)
    assert int(count) == 7  # 8 masked-in tokens minus the one ignore_index label


def test_lm_ce_does_not_shift():
    logits = torch.full((1, 3, 4), -10.0)
    labels = torch.tensor([[2, 0, 3]])
    logits[0, torch.arange(3), labels[0]] = 10.0  # position t predicts labels[t]: near-zero loss only unshifted
    assert L.lm_ce_tokens(logits, labels)[0].item() < 1e-6


def test_hidden_mse_matches_mse_loss_and_counts_elements():
    s, t = randn(2, 4, 3, seed=1), randn(2, 4, 5, seed=2)
    proj = torch.nn.Linear(3, 5)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    total, count = L.hidden_mse(s, t, mask=m, projection=proj)
    keep = m.bool()
    torch.testing.assert_close(total, F.mse_loss(proj(s)[keep], t[keep], reduction="sum"))
    assert int(count) == 6 * 5  # counted tokens × teacher width
    torch.testing.assert_close(total / count, F.mse_loss(proj(s)[keep], t[keep]))


def test_hidden_losses_need_projection_when_widths_differ():
    with pytest.raises(ValueError, match="projection="):
        L.hidden_mse(randn(2, 4, 3), randn(2, 4, 5))
    with pytest.raises(ValueError, match="projection="):
        L.cls_pkd(randn(2, 3), randn(2, 5))


def test_hidden_cosine_matches_cosine_embedding_loss():
    s, t = randn(2, 4, 6, seed=1), randn(2, 4, 6, seed=2)
    m = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]).bool()
    total, count = L.hidden_cosine(s, t, mask=m)
    ref = F.cosine_embedding_loss(s[m], t[m], torch.ones(int(m.sum())), reduction="sum")
    torch.testing.assert_close(total, ref)
    assert int(count) == 6


def test_cls_pkd_is_squared_distance_of_normalised_vectors():
    s, t = randn(3, 4, seed=1), randn(3, 4, seed=2)
    total, count = L.cls_pkd(s, t)
    ref = ((s / s.norm(dim=-1, keepdim=True) - t / t.norm(dim=-1, keepdim=True)) ** 2).sum()
    torch.testing.assert_close(total, ref)
    assert int(count) == 3
    # Scale invariance is the point of normalising: a 10× larger student gives the same loss.
    torch.testing.assert_close(L.cls_pkd(10 * s, t)[0], total)


def test_attention_mse_matches_mse_loss_over_real_pairs():
    s, t = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    total, count = L.attention_mse(s, t, mask=m)
    ref = F.mse_loss(s[0, :, :3, :3], t[0, :, :3, :3], reduction="sum") + F.mse_loss(s[1], t[1], reduction="sum")
    torch.testing.assert_close(total, ref)
    assert int(count) == 3 * (9 + 16)


def test_attention_kl_matches_manual_kl_per_row():
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s, t = attn_probs(2, 2, 3, seed=1, mask=m), attn_probs(2, 2, 3, seed=2, mask=m)
    total, count = L.attention_kl(s, t, mask=m)
    ref = 0.0
    for b, n in ((0, 2), (1, 3)):
        ps, pt = s[b, :, :n, :n], t[b, :, :n, :n]
        ref = ref + (pt * (pt.log() - ps.log())).sum()
    torch.testing.assert_close(total, ref)
    assert int(count) == 2 * (2 + 3)  # (head, query row) pairs


# ------------------------------------------------------------------------------------------------------
# Head-count mismatch and MiniLM relations
# ------------------------------------------------------------------------------------------------------


def test_attention_losses_average_heads_when_head_counts_differ():
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    s, t = attn_probs(2, 2, 4, seed=1, mask=m), attn_probs(2, 6, 4, seed=2, mask=m)
    total, count = L.attention_kl(s, t, mask=m)
    ref_total, ref_count = L.attention_kl(s.mean(1, keepdim=True), t.mean(1, keepdim=True), mask=m)
    torch.testing.assert_close(total, ref_total)
    assert int(count) == int(ref_count) == 7
    assert total.item() > 0

    total, count = L.attention_mse(s, t, mask=m)
    ref = F.mse_loss(s.mean(1)[0, :3, :3], t.mean(1)[0, :3, :3], reduction="sum") + F.mse_loss(
        s.mean(1)[1], t.mean(1)[1], reduction="sum"
    )
    torch.testing.assert_close(total, ref)
    assert int(count) == 9 + 16


def _relation_reference(x, heads, n):
    """Plain MiniLMv2 relation for one unpadded sequence x (n, D): (heads, n, n) log-probabilities."""
    d_r = x.shape[-1] // heads
    xh = x[:n].view(n, heads, d_r).transpose(0, 1)
    return (xh @ xh.transpose(-1, -2) / math.sqrt(d_r)).log_softmax(-1)


def test_minilm_relation_kl_across_widths_matches_reference_on_unpadded_part():
    s, t = randn(2, 4, 8, seed=1), randn(2, 4, 12, seed=2)  # student width 8, teacher width 12
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    total, count = L.minilm_relation_kl(s, t, num_relation_heads=4, mask=m)
    ref = 0.0
    for b, n in ((0, 2), (1, 4)):
        ls, lt = _relation_reference(s[b], 4, n), _relation_reference(t[b], 4, n)
        ref = ref + (lt.exp() * (lt - ls)).sum()
    torch.testing.assert_close(total, ref)
    assert int(count) == 4 * (2 + 4)  # (relation head, query row) pairs


def test_minilm_relation_kl_temperature_scales_scores_and_multiplies_t_squared():
    s, t = randn(1, 3, 4, seed=1), randn(1, 3, 4, seed=2)
    total, _ = L.minilm_relation_kl(s, t, num_relation_heads=2, temperature=2.0)
    ls, lt = _relation_reference(s[0], 2, 3), _relation_reference(t[0], 2, 3)
    ls, lt = (ls / 2).log_softmax(-1), (lt / 2).log_softmax(-1)  # log-softmax is shift-invariant
    torch.testing.assert_close(total, 4.0 * (lt.exp() * (lt - ls)).sum())


def test_minilm_relation_kl_raises_on_indivisible_width():
    with pytest.raises(ValueError, match=r"student width 10 is not divisible by num_relation_heads=4"):
        L.minilm_relation_kl(randn(1, 3, 10), randn(1, 3, 12), num_relation_heads=4)
    with pytest.raises(ValueError, match=r"teacher width 6 is not divisible"):
        L.minilm_relation_kl(randn(1, 3, 8), randn(1, 3, 6), num_relation_heads=4)


def test_minilm_all_padding_sequence_keeps_gradients_finite():
    s = randn(2, 3, 4, seed=1).requires_grad_()
    m = torch.tensor([[1, 1, 1], [0, 0, 0]])
    total, count = L.minilm_relation_kl(s, randn(2, 3, 4, seed=2), num_relation_heads=2, mask=m)
    total.backward()
    assert int(count) == 6
    assert torch.isfinite(total) and torch.isfinite(s.grad).all()
    assert s.grad[1].abs().max().item() == 0.0  # the padded sequence gets no gradient at all


# ------------------------------------------------------------------------------------------------------
# GKD, DistiLLM, top-k cache, multi-teacher
# ------------------------------------------------------------------------------------------------------


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = randn(B, T, V, seed=1), randn(B, T, V, seed=2)
    kw = dict(temperature=1.5, mask=MASK_TOK)
    torch.testing.assert_close(L.generalized_jsd_tokens(s, t, beta=0.0, **kw)[0], L.forward_kl_tokens(s, t, **kw)[0])
    torch.testing.assert_close(L.generalized_jsd_tokens(s, t, beta=1.0, **kw)[0], L.reverse_kl_tokens(s, t, **kw)[0])


def test_generalized_jsd_half_matches_manual_mixture_and_is_symmetric():
    s, t = randn(B, T, V, seed=1), randn(B, T, V, seed=2)
    total, count = L.generalized_jsd_tokens(s, t, beta=0.5, mask=MASK_TOK)
    ps, pt = s.softmax(-1), t.softmax(-1)
    m = 0.5 * pt + 0.5 * ps
    per_tok = 0.5 * (pt * (pt / m).log()).sum(-1) + 0.5 * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(total, per_tok[MASK_TOK].sum())
    assert int(count) == 8
    torch.testing.assert_close(L.generalized_jsd_tokens(t, s, beta=0.5, mask=MASK_TOK)[0], total)
    assert total.item() <= 8 * math.log(2) + 1e-6  # JSD is bounded by log 2 per token


def test_generalized_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd_tokens(randn(1, 2, 3), randn(1, 2, 3), beta=1.5)


def test_skew_kl_alpha_zero_is_plain_kl_and_matches_manual_mixture():
    s, t = randn(B, T, V, seed=1), randn(B, T, V, seed=2)
    kw = dict(temperature=2.0, mask=MASK_TOK)
    torch.testing.assert_close(L.skew_kl_tokens(s, t, alpha=0.0, **kw)[0], L.forward_kl_tokens(s, t, **kw)[0])
    torch.testing.assert_close(L.skew_reverse_kl_tokens(s, t, alpha=0.0, **kw)[0], L.reverse_kl_tokens(s, t, **kw)[0])

    ps, pt = (s / 2).softmax(-1), (t / 2).softmax(-1)
    fwd = (pt * (pt / (0.1 * pt + 0.9 * ps)).log()).sum(-1)[MASK_TOK].sum() * 4
    rev = (ps * (ps / (0.1 * ps + 0.9 * pt)).log()).sum(-1)[MASK_TOK].sum() * 4
    torch.testing.assert_close(L.skew_kl_tokens(s, t, alpha=0.1, **kw)[0], fwd)
    torch.testing.assert_close(L.skew_reverse_kl_tokens(s, t, alpha=0.1, **kw)[0], rev)


def test_topk_kl_with_full_support_equals_forward_kl():
    s, t = randn(B, T, V, seed=1), randn(B, T, V, seed=2)
    lp = t.log_softmax(-1)
    perm = torch.stack([torch.randperm(V, generator=_gen(i)) for i in range(B * T)]).view(B, T, V)
    total, count = L.topk_forward_kl_tokens(s, lp.gather(-1, perm), perm, temperature=3.0, mask=MASK_TOK)
    ref_total, ref_count = L.forward_kl_tokens(s, t, temperature=3.0, mask=MASK_TOK)
    torch.testing.assert_close(total, ref_total)
    assert int(count) == int(ref_count)


def test_topk_kl_renormalises_both_over_the_stored_support():
    s, t = randn(B, T, V, seed=1), randn(B, T, V, seed=2)
    vals, idx = t.log_softmax(-1).topk(3, dim=-1)
    total, _ = L.topk_forward_kl_tokens(s, vals, idx, temperature=2.0)
    q_t = (t.gather(-1, idx) / 2).softmax(-1)  # teacher softened at T, conditioned on its top 3
    q_s = (s.gather(-1, idx) / 2).softmax(-1)
    torch.testing.assert_close(total, 4 * (q_t * (q_t / q_s).log()).sum())


def test_average_teacher_logprobs_feeds_soft_kl():
    s, t1, t2, temp = randn(3, 5, seed=1), randn(3, 5, seed=2), randn(3, 5, seed=3), 2.0
    one = L.average_teacher_logprobs([t1], temperature=temp)
    torch.testing.assert_close(
        L.soft_kl(s, teacher_log_probs=one, temperature=temp)[0], L.soft_kl(s, t1, temperature=temp)[0]
    )
    avg = L.average_teacher_logprobs([t1, t2], weights=[3.0, 1.0], temperature=temp)
    manual = 0.75 * (t1 / temp).softmax(-1) + 0.25 * (t2 / temp).softmax(-1)
    torch.testing.assert_close(avg.exp(), manual)
    ref = temp**2 * (manual * (manual.log() - (s / temp).log_softmax(-1))).sum()
    torch.testing.assert_close(L.soft_kl(s, teacher_log_probs=avg, temperature=temp)[0], ref)


def test_soft_kl_needs_exactly_one_teacher_input():
    s = randn(2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        L.soft_kl(s, temperature=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        L.soft_kl(s, s, temperature=1.0, teacher_log_probs=s.log_softmax(-1))


# ------------------------------------------------------------------------------------------------------
# Masks: masked items change nothing and are not counted
# ------------------------------------------------------------------------------------------------------


def test_masked_rows_and_tokens_are_ignored():
    row_mask = torch.tensor([True, False, True])
    s, t = randn(3, 4, seed=1), randn(3, 4, seed=2)
    s2 = s.clone()
    s2[1] = 1e4  # a masked row with wild values
    a, c = L.soft_kl(s, t, temperature=2.0, mask=row_mask)
    b, _ = L.soft_kl(s2, t, temperature=2.0, mask=row_mask)
    torch.testing.assert_close(a, b)
    assert int(c) == 2
    labels = torch.tensor([0, 99, 2])  # masked row's label is even out of range
    a, c = L.hard_ce(s, labels, mask=row_mask)
    torch.testing.assert_close(a, F.cross_entropy(s[[0, 2]], labels[[0, 2]], reduction="sum"))
    assert int(c) == 2

    sl, tl = randn(B, T, V, seed=3), randn(B, T, V, seed=4)
    sl2, tl2 = sl.clone(), tl.clone()
    sl2[0, 3:] = randn(2, V, seed=5) * 50
    tl2[0, 3:] = float("-inf")  # even a degenerate teacher at padded positions does no harm
    for fn in TOKEN_DIVERGENCES.values():
        a, c = fn(sl, tl, mask=MASK_TOK)
        b, _ = fn(sl2, tl2, mask=MASK_TOK)
        torch.testing.assert_close(a, b)
        assert int(c) == 8


def test_padded_tokens_are_ignored_by_layer_losses():
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    h_s, h_t = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
    h_s2 = h_s.clone()
    h_s2[0, 2] = 123.0
    for fn, per_token_count in (
        (lambda x: L.hidden_mse(x, h_t, mask=m), 4),
        (lambda x: L.hidden_cosine(x, h_t, mask=m), 1),
        (lambda x: L.minilm_relation_kl(x, h_t, num_relation_heads=2, mask=m), 2),
    ):
        a, c = fn(h_s)
        b, _ = fn(h_s2)
        torch.testing.assert_close(a, b)
        assert int(c) == 5 * per_token_count

    a_s, a_t = attn_probs(2, 2, 3, seed=3, mask=m), attn_probs(2, 2, 3, seed=4, mask=m)
    a_s2 = a_s.clone()
    a_s2[0, :, 2, :] = 0.5  # padded query row
    a_s2[0, :, :, 2] = 0.7  # padded key column
    a_t2 = a_t.clone()
    a_t2[0, :, :, 2] = 0.3  # a teacher map that was not masked before its softmax
    for fn in (L.attention_kl, L.attention_mse):
        torch.testing.assert_close(fn(a_s, a_t, mask=m)[0], fn(a_s2, a_t2, mask=m)[0])


# ------------------------------------------------------------------------------------------------------
# Accumulation invariance and gradients
# ------------------------------------------------------------------------------------------------------


def test_two_half_batches_give_the_same_normalised_loss_as_one_batch():
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)  # 6 + 5 tokens
    s, t = randn(4, T, V, seed=1), randn(4, T, V, seed=2)
    full_t, full_c = L.forward_kl_tokens(s, t, temperature=2.0, mask=mask)
    a_t, a_c = L.forward_kl_tokens(s[:2], t[:2], temperature=2.0, mask=mask[:2])
    b_t, b_c = L.forward_kl_tokens(s[2:], t[2:], temperature=2.0, mask=mask[2:])
    torch.testing.assert_close((a_t + b_t) / (a_c + b_c), full_t / full_c)
    mean_of_means = (a_t / a_c + b_t / b_c) / 2
    assert not torch.allclose(mean_of_means, full_t / full_c)  # uneven halves: averaging means would be wrong

    h_s, h_t = randn(4, 5, 3, seed=3), randn(4, 5, 3, seed=4)
    full = L.hidden_mse(h_s, h_t, mask=mask)
    halves = [L.hidden_mse(h_s[i : i + 2], h_t[i : i + 2], mask=mask[i : i + 2]) for i in (0, 2)]
    torch.testing.assert_close(sum(h[0] for h in halves) / sum(h[1] for h in halves), full[0] / full[1])


GRAD_CASES = {
    "soft_kl": lambda s, t: L.soft_kl(s[:, 0], t[:, 0], temperature=2.0),
    "forward": lambda s, t: L.forward_kl_tokens(s, t, mask=MASK_TOK),
    "reverse": lambda s, t: L.reverse_kl_tokens(s, t, mask=MASK_TOK),
    "gjsd": lambda s, t: L.generalized_jsd_tokens(s, t, beta=0.5, mask=MASK_TOK),
    "skew": lambda s, t: L.skew_kl_tokens(s, t, alpha=0.1, mask=MASK_TOK),
    "skew_rev": lambda s, t: L.skew_reverse_kl_tokens(s, t, alpha=0.1, mask=MASK_TOK),
    "hidden_mse": lambda s, t: L.hidden_mse(s, t, mask=MASK_TOK),
    "hidden_cosine": lambda s, t: L.hidden_cosine(s, t, mask=MASK_TOK),
    "minilm": lambda s, t: L.minilm_relation_kl(s[..., :6], t[..., :4], num_relation_heads=2, mask=MASK_TOK),
    "cls_pkd": lambda s, t: L.cls_pkd(s[:, 0], t[:, 0]),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_reach_the_student_and_not_a_detached_teacher(name):
    student = randn(B, T, V, seed=1).requires_grad_()
    teacher = randn(B, T, V, seed=2).requires_grad_()
    total, _ = GRAD_CASES[name](student, teacher.detach())
    total.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_attention_kl_gradient_reaches_student_only():
    s_scores = randn(1, 2, 3, 3, seed=1).requires_grad_()
    teacher = attn_probs(1, 2, 3, seed=2).requires_grad_()
    total, _ = L.attention_kl(s_scores.softmax(-1), teacher.detach())
    total.backward()
    assert teacher.grad is None and s_scores.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------
# Temperature schedule
# ------------------------------------------------------------------------------------------------------


def test_temperature_schedules():
    assert L.temperature_at(50, 100, start=4.0) == 4.0
    assert L.temperature_at(25, 100, start=4.0, end=2.0, schedule="linear") == pytest.approx(3.5)
    assert L.temperature_at(500, 100, start=4.0, end=2.0, schedule="linear") == pytest.approx(2.0)
    assert L.temperature_at(0, 100, start=4.0, end=2.0, schedule="cosine") == pytest.approx(4.0)
    assert L.temperature_at(50, 100, start=4.0, end=2.0, schedule="cosine") == pytest.approx(3.0)
    assert L.temperature_at(25, 100, start=4.0, end=2.0, schedule="cosine") == pytest.approx(
        2.0 + 2.0 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        L.temperature_at(0, 10, start=1.0, end=2.0, schedule="exp")
    with pytest.raises(ValueError, match="needs end="):
        L.temperature_at(0, 10, start=1.0, schedule="linear")
