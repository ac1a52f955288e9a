"""The table of loss terms: one row per term a recipe can weight in `distill.losses`, for every task.

A row (`Term`) says how to compute the term from one forward pass of student and teacher (`fn`, returning a
(sum, count) pair from `kdistill.losses`), what its count counts (`unit`, which the loops use to normalise over a
whole optimizer step: `step_loss`), what it reads from the teacher (`reads`, from which `TermSpec` derives what
the models must return and what a teacher cache must hold), whether a teacher cache can hold that (`cacheable`)
and its family (`family`): a task (kdistill/tasks/) lists the families that apply to it and, where a family's
count depends on the task, what it counts (`Task.term_units`); config validation checks it (`check_terms`).
Every strategy of every task calls the one `compute_terms`.

Adding a term is one function and one row, e.g. a squared error between a classifier's logits (Ba & Caruana
2014)::

    def _logit_mse(x: TermInputs):  # Σ_c (z_S(c) − z_T(c))² per example; count = examples × C
        return losses.hidden_mse(x.student.logits[:, None], x.teacher.logits[:, None])

    TERMS["logit_mse"] = Term("logit_mse", _logit_mse, unit="rows", reads=frozenset({"logits"}),
                              cacheable=False, family="logits")

(cacheable=False: it reads `teacher.logits`, which only the live teacher gives; `kd` reads cached logits as
`teacher_log_probs`.) Recipes can then weight it (`distill.losses: {logit_mse: 1.0}`), config validation knows
it, and every loop computes, normalises and logs it. A tensor loss new to the toolkit goes into
the family module of `kdistill/losses/` first, as a pure function returning (sum, count).

Why one module (over 600 lines): a term is one function and one row, and they read best side by side, with the
spec (`TermSpec`) and the step normalisation that read the table.

This module is near the bottom layer: it imports only torch, kdistill.losses / features and the task registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any
from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor, nn

from kdistill import losses
from kdistill.features import Features
from kdistill.task import Task, get_task

FAMILIES = ("logits", "labels", "cls", "attention", "next_token", "cross_tokenizer", "hidden", "pooled")
"""Term families, which a task lists in `Task.term_units`: the teacher's soft outputs over the task's classes
("logits"), the gold labels ("labels"), [CLS] states ("cls"), an encoder's attention maps and Q/K/V relations
("attention"), a causal LM's next-token distributions ("next_token") and those of a teacher with another
tokenizer ("cross_tokenizer"), hidden states ("hidden"), pooled sentence embeddings ("pooled")."""

UNITS = ("rows", "labeled", "scored", "tokens", "token_pairs", "targets", "aligned")
"""What a term's count can count, per batch (`training.batch_units` counts each): examples ("rows"), examples or
tokens with a label ("labeled", label >= 0: unlabeled transfer rows carry none), scored tokens of token
classification ("scored", label != -100: the labeled ones and the TRANSFER words of transfer sentences), real
tokens ("tokens", the attention mask), (query, key)
pairs of real tokens within an example ("token_pairs", Σ_b n_b²: an attention map's elements), the next-token
targets of a causal LM ("targets", the batch's `valid` mask) and the targets where a teacher with another tokenizer
has ended a token at the same byte ("aligned", the batch's `aligned` pairs: the cross-tokenizer terms)."""

HIDDEN_READS = frozenset({"embeddings", "hidden_states", "cls"})
"""`reads` of a term that reads hidden states: the embeddings output (hidden_states[0]), the hidden states of the
mapped teacher layers, or only position 0 ([CLS]) of those."""
POSITIONAL_READS = HIDDEN_READS - {"cls"} | {"attentions", "qkv", "token_logits"}
"""`reads` compared position by position between the two models: they need one tokenization for both."""
CROSS_TOKENIZER_TERMS = frozenset({"uld", "aligned_kd"})
"""The causal-LM terms that compare a teacher over another vocabulary, at aligned positions."""


@dataclass(frozen=True)
class CrossTeacher:
    """A causal-LM teacher over another vocabulary, at the P positions where its tokens and the student's end at
    the same byte of the text (`tokenalign.pairs_of_ends`): its stored top-k there, and where that is in the
    student's batch."""

    rows: Tensor
    """(P,) the student batch row of each pair."""
    positions: Tensor
    """(P,) the student position of each pair (its logits predict the same continuation as the teacher's)."""
    logprobs: Tensor
    """(P, K) the teacher's top-k log-probabilities at T = 1 at its position of the pair."""
    ids: Tensor
    """(P, K) their ids in the teacher's vocabulary."""


@dataclass(frozen=True)
class TermInputs:
    """What a term function may read: one forward pass of each model and the batch's targets.

    student, teacher: `features.Features` (teacher None when nothing of it is needed, or when its outputs come as
    `teacher_log_probs` / `teacher_topk`). B batch, L tokens, C classes, V vocabulary, K cached top-k entries.
    """

    student: Features
    teacher: Features | None
    labels: Tensor | None
    """(B,) class ids (classification; -100 = unlabeled), (B, L) tag ids (token classification; -100 = not scored,
    -1 = a transfer word: soft targets only) or (B, L) next-token ids (causal-lm)."""
    mask: Tensor | None
    """(B, L): the token positions token-level terms count: the attention mask (classification), the next-token
    targets `valid` (causal-lm)."""
    temperature: float
    pairs: list[tuple[int, int]] = field(default_factory=list)
    """(student layer, teacher layer), 1-based hidden_states indices (see `layer_pairs`)."""
    projection: Callable[[Tensor], Tensor] | None = None
    """Learned student -> teacher width map of the hidden terms (FitNets' regressor), None at equal widths."""
    teacher_log_probs: Tensor | None = None
    """(B, C): a teacher distribution already softened at T (several or cached teachers), instead of teacher logits."""
    teacher_topk: tuple[Tensor, Tensor] | None = None
    """causal-lm cache: the teacher's top-k (log-probs (B, L, K), ids (B, L, K)) instead of its full logits."""
    cross: CrossTeacher | None = None
    """causal-lm with a teacher over another vocabulary: its signal at the aligned positions (`uld`, `aligned_kd`)."""
    shared_vocab: tuple[Tensor, Tensor] | None = None
    """(teacher ids (M,), student ids (M,)) of the tokens both vocabularies hold (`aligned_kd`)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The active terms' own parameters (each row's `options`, with the recipe's values: `TermSpec.options`)."""

    def teacher_features(self, term: str) -> Features:
        if self.teacher is None:
            raise ValueError(f"loss term '{term}' needs the teacher's hidden states, attention maps or Q/K/V "
                             "(a live teacher, or the classification cache of hidden states)")
        return self.teacher

    @cached_property
    def _token_sides(self) -> tuple[Tensor, Tensor | None]:
        logits = self.student.logits.float()
        if self.teacher_topk is not None:
            t_side, t_ids = self.teacher_topk
            return logits.gather(-1, t_ids), t_side  # (B, L, K): the student's logits on the teacher's support
        return logits, None if self.teacher is None else self.teacher.logits.float()

    def token_logits(self, term: str) -> tuple[Tensor, Tensor]:
        """(student, teacher) next-token logits, (B, L, V) each; or, from the top-k cache, the student's logits
        gathered at the teacher's stored ids (B, L, K) and the teacher's log-probs there, which the divergences
        renormalise over that support alike (kdistill/cache/). Computed once per `TermInputs`."""
        student, teacher = self._token_sides
        if teacher is None:
            raise ValueError(f"loss term '{term}' needs the teacher's outputs")
        return student, teacher


Pair = tuple[Tensor, Tensor]


def _over_pairs(pairs, fn: Callable[[int, int], Pair]):
    """Σ of a per-layer-pair term's sums and counts over the mapped layer pairs."""
    total, count = 0.0, 0.0
    for s, t in pairs:
        term_sum, term_count = fn(s, t)
        total = total + term_sum
        count = count + float(term_count)
    return total, count


# --------------------------------------------------------------------------------------- term functions


def _kd(x: TermInputs) -> Pair:
    """Hinton et al. 2015: T² · KL(p_T ‖ p_S) of the temperature-softened class distributions, per example
    (`losses.soft_kl`); from `teacher_log_probs` when given (several or cached teachers). Token classification:
    per labeled token (`_token_kd`)."""
    if x.student.logits.dim() == 3:
        return _token_kd(x)
    if x.teacher_log_probs is not None:
        return losses.soft_kl(x.student.logits, None, teacher_log_probs=x.teacher_log_probs,
                              temperature=x.temperature)
    return losses.soft_kl(x.student.logits, x.teacher.logits, temperature=x.temperature)


def _ce(x: TermInputs) -> Pair:
    """Cross-entropy with the labels, −log p_S(y), per labeled example (`losses.hard_ce`); token classification:
    per labeled token (labels (B, L), -100 on padding and non-first sub-tokens, TRANSFER (-1) on transfer sentences;
    hard_ce counts labels >= 0 and takes any leading shape)."""
    return losses.hard_ce(x.student.logits, x.labels)


def _embedding_mse(x: TermInputs) -> Pair:
    """TinyBERT (Jiao et al. 2020) embedding-layer loss: ‖W·e_S − e_T‖² per token (`losses.hidden_mse` on
    hidden_states[0])."""
    teacher = x.teacher_features("embedding_mse")
    return losses.hidden_mse(x.student.hidden_states[0], teacher.hidden_states[0], mask=x.mask,
                             projection=x.projection)


def _hidden_mse(x: TermInputs) -> Pair:
    """FitNets (Romero et al. 2015) / TinyBERT: ‖W·h_S(s) − h_T(t)‖² per token, summed over the layer pairs."""
    teacher = x.teacher_features("hidden_mse")
    return _over_pairs(x.pairs, lambda s, t: losses.hidden_mse(
        x.student.hidden_states[s], teacher.hidden_states[t], mask=x.mask, projection=x.projection))


def _hidden_cosine(x: TermInputs) -> Pair:
    """DistilBERT (Sanh et al. 2019): 1 − cos(W·h_S(s), h_T(t)) per token, summed over the layer pairs."""
    teacher = x.teacher_features("hidden_cosine")
    return _over_pairs(x.pairs, lambda s, t: losses.hidden_cosine(
        x.student.hidden_states[s], teacher.hidden_states[t], mask=x.mask, projection=x.projection))


def _cls_pkd(x: TermInputs) -> Pair:
    """Patient-KD (Sun et al. 2019): ‖h_S/‖h_S‖ − h_T/‖h_T‖‖² of the [CLS] (position 0) vectors, per example and
    layer pair."""
    teacher = x.teacher_features("cls_pkd")
    return _over_pairs(x.pairs, lambda s, t: losses.cls_pkd(
        x.student.hidden_states[s][:, 0], teacher.hidden_states[t][:, 0], projection=x.projection))


def _attention_kl(x: TermInputs) -> Pair:
    """TinyBERT / MiniLM: KL(A_T ‖ A_S) of the attention rows, per query token, over the layer pairs."""
    teacher = x.teacher_features("attention_kl")
    return _over_pairs(x.pairs, lambda s, t: losses.attention_kl(
        x.student.attentions[s - 1], teacher.attentions[t - 1], mask=x.mask))


def _attention_mse(x: TermInputs) -> Pair:
    """TinyBERT: ‖A_S − A_T‖² of the attention maps, per query token, over the layer pairs."""
    teacher = x.teacher_features("attention_mse")
    return _over_pairs(x.pairs, lambda s, t: losses.attention_mse(
        x.student.attentions[s - 1], teacher.attentions[t - 1], mask=x.mask))


def _minilm(which: str, term: str) -> Callable[[TermInputs], Pair]:
    def relation_kl(x: TermInputs) -> Pair:
        # MiniLMv2 distils the relations of the last layers; we use every mapped pair's relations.
        teacher = x.teacher_features(term)
        return _over_pairs(x.pairs, lambda s, t: losses.minilm_relation_kl(
            x.student.qkv[s - 1][which], teacher.qkv[t - 1][which], num_relation_heads=x.options["relation_heads"],
            mask=x.mask))

    relation_kl.__name__ = f"_{term}"
    relation_kl.__doc__ = (f"MiniLMv2 (Wang et al. 2021): KL of the {which}-{which} self-attention relations "
                           "softmax(X·Xᵀ/√d) over `relation_heads` heads, per token, over the layer pairs.")
    return relation_kl


def _lm(x: TermInputs) -> Pair:
    """Next-token cross-entropy with the data, −log p_S(x_{t+1} | x_≤t), per target (`losses.lm_ce_tokens`)."""
    return losses.lm_ce_tokens(x.student.logits.float(), x.labels, mask=x.mask)


def _forward_kl(x: TermInputs) -> Pair:
    """T² · KL(p_T ‖ p_S) per target token (word-level KD, Kim & Rush 2016)."""
    s, t = x.token_logits("forward_kl")
    return losses.forward_kl_tokens(s, t, temperature=x.temperature, mask=x.mask)


def _reverse_kl(x: TermInputs) -> Pair:
    """T² · KL(p_S ‖ p_T) per target token (MiniLLM, Gu et al. 2024: mode-seeking)."""
    s, t = x.token_logits("reverse_kl")
    return losses.reverse_kl_tokens(s, t, temperature=x.temperature, mask=x.mask)


def _jsd(x: TermInputs) -> Pair:
    """Generalised JSD_β (GKD, Agarwal et al. 2024): β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m), m = β·p_T + (1−β)·p_S,
    per target token, with β = `gjsd_beta`."""
    s, t = x.token_logits("jsd")
    return losses.generalized_jsd_tokens(s, t, beta=x.options["gjsd_beta"], temperature=x.temperature, mask=x.mask)


def _skew_kl(x: TermInputs) -> Pair:
    """DistiLLM (Ko et al. 2024) skew KL: KL(p_T ‖ α·p_T + (1−α)·p_S) per target token, α = `skew_alpha`."""
    s, t = x.token_logits("skew_kl")
    return losses.skew_kl_tokens(s, t, alpha=x.options["skew_alpha"], temperature=x.temperature, mask=x.mask)


def _skew_reverse_kl(x: TermInputs) -> Pair:
    """DistiLLM skew reverse KL: KL(p_S ‖ α·p_S + (1−α)·p_T) per target token, α = `skew_alpha`."""
    s, t = x.token_logits("skew_reverse_kl")
    return losses.skew_reverse_kl_tokens(s, t, alpha=x.options["skew_alpha"], temperature=x.temperature, mask=x.mask)


def _cross_sides(x: TermInputs, term: str) -> tuple[CrossTeacher, Tensor, Tensor]:
    """(the teacher's pairs, the student's logits there (P, V_S), the pairs that count (P,): next-token targets)."""
    if x.cross is None:
        raise ValueError(f"loss term '{term}' compares a teacher over another vocabulary: it needs the teacher "
                         "signal with the teacher tokens' byte ends (kdistill/cache/)")
    c = x.cross
    return c, x.student.logits[c.rows, c.positions].float(), x.mask[c.rows, c.positions]


def _uld(x: TermInputs) -> Pair:
    """ULD (Boizard et al. 2024): Σ_j |sort↓(p_S)_j − sort↓(p_T)_j| at each aligned target, no vocabulary mapping
    (`losses.uld_loss`, on the teacher's stored top-k)."""
    c, student, mask = _cross_sides(x, "uld")
    return losses.uld_loss(student, teacher_topk_logprobs=c.logprobs, temperature=x.temperature, mask=mask)


def _aligned_kd(x: TermInputs) -> Pair:
    """T² · KL over the shared vocabulary, token to token, + ULD over the rest, at each aligned target
    (`losses.aligned_kd_loss`; GOLD's split, Hugging Face TRL 2025)."""
    c, student, mask = _cross_sides(x, "aligned_kd")
    if x.shared_vocab is None:
        raise ValueError("loss term 'aligned_kd' needs the shared vocabulary of the two tokenizers "
                         "(tokenalign.shared_vocab)")
    return losses.aligned_kd_loss(student, shared=x.shared_vocab, teacher_topk=(c.logprobs, c.ids),
                                  temperature=x.temperature, mask=mask)


# ------------------------------------------------------------------------ sentence embeddings (task: embedding)

CONTRASTIVE_TEMPERATURE = 0.05
"""τ of `pooled_contrastive` (cosine similarities / τ), the usual value for in-batch contrastive sentence losses."""


def _pooled(x: TermInputs, term: str) -> tuple[Tensor, Tensor]:
    teacher = x.teacher_features(term)
    if x.student.pooled is None or teacher.pooled is None:
        raise ValueError(f"loss term '{term}' needs both models' pooled sentence embeddings (task: embedding)")
    return x.student.pooled, teacher.pooled


def _pooled_mse(x: TermInputs) -> Pair:
    """Reimers & Gurevych 2020: ‖W·e_S − e_T‖² of the pooled sentence embeddings, per text (`losses.pooled_mse`;
    count = texts × D_T)."""
    return losses.pooled_mse(*_pooled(x, "pooled_mse"), projection=x.projection)


def _pooled_cosine(x: TermInputs) -> Pair:
    """1 − cos(W·e_S, e_T) of the pooled sentence embeddings, per text (`losses.pooled_cosine`)."""
    return losses.pooled_cosine(*_pooled(x, "pooled_cosine"), projection=x.projection)


def _pooled_contrastive(x: TermInputs) -> Pair:
    """InfoNCE against the teacher's embeddings of the (micro-)batch: −log softmax_j(cos(W·e_S(b), e_T(j)) / τ)_b
    per text, τ = CONTRASTIVE_TEMPERATURE (`losses.pooled_contrastive`)."""
    return losses.pooled_contrastive(*_pooled(x, "pooled_contrastive"), temperature=CONTRASTIVE_TEMPERATURE,
                                     projection=x.projection)


# ---------------------------------------------------------- token classification (task: token-classification)


def _token_kd(x: TermInputs) -> Pair:
    """Token-level KD (as in TinyBERT / MiniLM's NER fine-tuning, Hinton et al. 2015 per token): T² · KL(p_T ‖ p_S)
    of each scored token's tag distribution. logits (B, L, C) are flattened to (B·L, C); a token counts when its
    label is not -100 (padding and, with first-sub-token alignment, the other sub-tokens are -100): gold tags and
    the TRANSFER words of transfer sentences (data.unlabeled_file), so the count is the `scored` unit of a token
    batch. `teacher_log_probs` (B, L, C) when given (cached or several teachers)."""
    counted = (x.labels != -100).reshape(-1)
    student = x.student.logits.flatten(0, 1)
    if x.teacher_log_probs is not None:
        return losses.soft_kl(student, None, teacher_log_probs=x.teacher_log_probs.flatten(0, 1),
                              temperature=x.temperature, mask=counted)
    return losses.soft_kl(student, x.teacher.logits.flatten(0, 1), temperature=x.temperature, mask=counted)


# -------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Term:
    """One loss term a recipe can weight."""

    name: str
    fn: Callable[[TermInputs], Pair]
    """(sum, count) of the term over one micro-batch; the loop divides by the count over the whole step."""
    unit: str | None
    """What `count` is a fixed multiple of (one of UNITS); None where it depends on the task (its term_units)."""
    reads: frozenset[str]
    """What it reads from the teacher: logits, token_logits (causal LM), cross_token_logits (a causal LM over
    another vocabulary, at aligned positions), embeddings, hidden_states, cls,
    attentions, qkv, pooled (sentence embeddings); nothing for a supervised term (ce, lm)."""
    cacheable: bool
    """Whether a teacher cache can hold what it reads (kdistill/cache/: classification logits and hidden states,
    causal-LM top-k token logits; a causal-LM hidden term runs the live teacher)."""
    family: str
    """One of FAMILIES: the tasks that list it take the term (kd: "logits", a classifier's or tagger's soft
    outputs; kd counts examples for one, scored tokens for the other, as their term_units say)."""

    options: Mapping[str, Any] = field(default_factory=dict)
    """The term's own parameters, by their recipe key in `distill` (e.g. jsd's gjsd_beta), with their defaults;
    the term function reads them from `TermInputs.options`."""

    def unit_for(self, task: str | Task) -> str:
        return get_task(task).term_units[self.family] or self.unit

    @property
    def positional(self) -> bool:
        """Compares the two models position by position (one tokenization for both)."""
        return bool(self.reads & POSITIONAL_READS)


def _row(name, fn, family, unit, reads=(), *, cacheable=True, options=None) -> tuple[str, Term]:
    return name, Term(name, fn, unit, frozenset(reads), cacheable, family, options or {})


RELATION_HEADS = {"relation_heads": 12}
"""MiniLM's relation heads: the Q/K/V relations are compared over this many heads (must divide both widths)."""
GJSD_BETA = {"gjsd_beta": 0.5}
"""β of the generalised JSD: 0 = forward KL, 1 = reverse KL."""
SKEW_ALPHA = {"skew_alpha": 0.1}
"""α of DistiLLM's skewed divergences: the share of the other distribution mixed into the target."""


TERMS: dict[str, Term] = dict([
    _row("kd", _kd, "logits", None, {"logits"}),
    _row("ce", _ce, "labels", "labeled"),
    _row("cls_pkd", _cls_pkd, "cls", "rows", {"cls"}),
    _row("attention_kl", _attention_kl, "attention", "tokens", {"attentions"}, cacheable=False),
    _row("attention_mse", _attention_mse, "attention", "token_pairs", {"attentions"}, cacheable=False),
    _row("minilm_qq", _minilm("query", "minilm_qq"), "attention", "tokens", {"qkv"}, cacheable=False,
         options=RELATION_HEADS),
    _row("minilm_kk", _minilm("key", "minilm_kk"), "attention", "tokens", {"qkv"}, cacheable=False,
         options=RELATION_HEADS),
    _row("minilm_vv", _minilm("value", "minilm_vv"), "attention", "tokens", {"qkv"}, cacheable=False,
         options=RELATION_HEADS),
    _row("forward_kl", _forward_kl, "next_token", "targets", {"token_logits"}),
    _row("reverse_kl", _reverse_kl, "next_token", "targets", {"token_logits"}),
    _row("jsd", _jsd, "next_token", "targets", {"token_logits"}, options=GJSD_BETA),
    _row("skew_kl", _skew_kl, "next_token", "targets", {"token_logits"}, options=SKEW_ALPHA),
    _row("skew_reverse_kl", _skew_reverse_kl, "next_token", "targets", {"token_logits"}, options=SKEW_ALPHA),
    _row("lm", _lm, "next_token", "targets"),
    _row("uld", _uld, "cross_tokenizer", "aligned", {"cross_token_logits"}),
    _row("aligned_kd", _aligned_kd, "cross_tokenizer", "aligned", {"cross_token_logits"}),
    _row("hidden_mse", _hidden_mse, "hidden", None, {"hidden_states"}),
    _row("embedding_mse", _embedding_mse, "hidden", None, {"embeddings"}),
    _row("hidden_cosine", _hidden_cosine, "hidden", None, {"hidden_states"}),
    _row("pooled_mse", _pooled_mse, "pooled", "rows", {"pooled"}),
    _row("pooled_cosine", _pooled_cosine, "pooled", "rows", {"pooled"}),
    _row("pooled_contrastive", _pooled_contrastive, "pooled", "rows", {"pooled"}),
])
"""Every loss term, by the name recipes use in `distill.losses`."""


def known_terms() -> list[str]:
    return list(TERMS)


def terms_for(task: str | Task) -> list[str]:
    """The terms that apply to `task` (a Task or its name), in table order."""
    task = get_task(task)
    return [name for name, term in TERMS.items() if task.applies(term.family)]


def check_terms(weights: Mapping[str, float], task: str | Task) -> None:
    """Raise ValueError naming the weighted terms (weight > 0) that are unknown or do not apply to `task`."""
    unknown = sorted(t for t in weights if t not in TERMS)
    if unknown:
        raise ValueError(f"unknown loss term(s) {', '.join(unknown)}; known: {', '.join(TERMS)}")
    task = get_task(task)
    bad = sorted(t for t, w in weights.items() if w > 0 and not task.applies(TERMS[t].family))
    if bad:
        raise ValueError(f"term(s) {', '.join(bad)} do not apply to {task.name}; use {', '.join(terms_for(task))}")


INTERMEDIATE_READS = HIDDEN_READS | {"attentions", "qkv"}
"""`reads` of an intermediate-layer term: the first stage of two-stage distillation trains these alone."""


def split_stages(weights: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Two-stage distillation (TinyBERT, Jiao et al. 2020, Sec. 3.2): (the weighted intermediate-layer terms, those
    reading the teacher's embeddings, hidden states, attentions or Q/K/V; the weighted prediction-layer terms, the
    rest: kd, ce)."""
    active = {t: w for t, w in weights.items() if w > 0}
    intermediate = {t: w for t, w in active.items() if _term(t).reads & INTERMEDIATE_READS}
    return intermediate, {t: w for t, w in active.items() if t not in intermediate}


def uncacheable_terms(terms: Iterable[str]) -> list[str]:
    """Those of `terms` that read what no teacher cache holds (attention maps, Q/K/V: too large)."""
    return sorted(t for t in set(terms) if t in TERMS and not TERMS[t].cacheable)


def _term(name: str) -> Term:
    if name not in TERMS:
        raise ValueError(f"unknown loss term '{name}'; known: {', '.join(TERMS)}")
    return TERMS[name]


# ------------------------------------------------------------------------------------------- one run's terms


def layer_pairs(mapping, *, student_layers: int, teacher_layers: int, init_layers: list[int] | None):
    """[(student layer, teacher layer)], 1-based (index 0 of hidden_states is the embeddings).

    `init`: each student layer with the teacher layer it was copied from; `uniform`: student layer s with
    teacher layer s·Lt/Ls (TinyBERT); `last`: the last Ls teacher layers; or explicit 0-based [[s, t], ...].
    """
    if mapping == "init":
        if init_layers is None or len(init_layers) != student_layers:
            mapping = "uniform"  # a random or given student has no source layers
        else:
            return [(s + 1, t + 1) for s, t in enumerate(init_layers)]
    if mapping == "uniform":
        return [(s, round(s * teacher_layers / student_layers)) for s in range(1, student_layers + 1)]
    if mapping == "last":
        if student_layers > teacher_layers:
            raise ValueError(f"distill.layer_mapping: last needs student layers ({student_layers}) <= teacher "
                             f"layers ({teacher_layers})")
        return [(s, teacher_layers - student_layers + s) for s in range(1, student_layers + 1)]
    pairs = []
    for pair in mapping:
        if len(pair) != 2:
            raise ValueError(f"distill.layer_mapping: {pair} is not a [student, teacher] pair")
        s, t = pair
        if not 0 <= s < student_layers:
            raise ValueError(f"distill.layer_mapping: student layer {s} out of range 0..{student_layers - 1}")
        if not 0 <= t < teacher_layers:
            raise ValueError(f"distill.layer_mapping: teacher layer {t} out of range 0..{teacher_layers - 1}")
        pairs.append((s + 1, t + 1))
    if len({s for s, _ in pairs}) != len(pairs):
        raise ValueError("distill.layer_mapping: a student layer appears twice")
    return pairs


@dataclass
class TermSpec:
    """What the terms of one run need: weights, layer pairs, the terms' parameters, learned projections. What the
    models must return (`needs_*`) follows from the active terms' `reads` in the table."""

    weights: dict[str, float]
    pairs: list[tuple[int, int]]
    options: dict[str, Any] = field(default_factory=dict)
    """Values of the terms' own parameters (a row's `options`: e.g. gjsd_beta), over the rows' defaults."""
    projections: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    """Learned student->teacher width maps for hidden terms (FitNets' regressors); trained, not exported."""
    shared_vocab: tuple[Tensor, Tensor] | None = None
    """The tokens a teacher and a student over another vocabulary share (`aligned_kd`; tokenalign.shared_vocab)."""

    @classmethod
    def of_recipe(cls, weights: Mapping[str, float], pairs: list[tuple[int, int]], distill, **kw) -> TermSpec:
        """The spec of a recipe's terms: its weights, and each weighted term's options as `distill` (the recipe's
        distill section) sets them."""
        options = {key: getattr(distill, key) for term in weights if weights[term] > 0 and term in TERMS
                   for key in TERMS[term].options}
        return cls(dict(weights), pairs, options, **kw)

    @property
    def active(self) -> dict[str, float]:
        return {k: w for k, w in self.weights.items() if w > 0}

    def option(self, key: str):
        """The value of a term parameter: the spec's, else the default of the row that declares it."""
        return self.term_options[key]

    @property
    def term_options(self) -> dict[str, Any]:
        defaults = {key: value for term in TERMS.values() for key, value in term.options.items()}
        return {**defaults, **self.options}

    @property
    def reads(self) -> frozenset[str]:
        """Everything the active terms read from the teacher."""
        return frozenset().union(*(_term(t).reads for t in self.active))

    @property
    def needs_hidden(self) -> bool:
        return bool(HIDDEN_READS & self.reads)

    @property
    def needs_attentions(self) -> bool:
        return "attentions" in self.reads

    @property
    def needs_qkv(self) -> bool:
        return "qkv" in self.reads

    @property
    def needs_pooled(self) -> bool:
        """The terms read pooled sentence embeddings (task: embedding); a teacher cache holds them (N, D)."""
        return "pooled" in self.reads

    @property
    def cross_tokenizer(self) -> bool:
        """The terms compare a teacher over another vocabulary at aligned positions (`uld`, `aligned_kd`)."""
        return "cross_token_logits" in self.reads

    @property
    def needs_teacher_features(self) -> bool:
        """False when only logits/labels matter: then the teacher's logits can be cached."""
        return self.needs_hidden or self.needs_attentions or self.needs_qkv

    @property
    def teacher_hidden_layers(self) -> tuple[list[int], bool]:
        """The teacher `hidden_states` indices `compute_terms` reads, and whether it reads only position 0 of them
        (cls_pkd alone). The teacher-feature cache stores exactly these; keep the two in step."""
        reads = self.reads
        layers = {0} if "embeddings" in reads else set()
        if reads & {"hidden_states", "cls"}:
            layers |= {t for _, t in self.pairs}
        return sorted(layers), (reads & HIDDEN_READS) == {"cls"}

    def add_projections(self, student_width: int, teacher_width: int) -> None:
        if student_width != teacher_width and (self.needs_hidden or self.needs_pooled):
            self.projections["hidden"] = nn.Linear(student_width, teacher_width)


def compute_terms(spec: TermSpec, student: Features, teacher: Features | None, labels: Tensor | None, *,
                  temperature: float, task: str | Task, valid: Tensor | None = None,
                  teacher_log_probs: Tensor | None = None, teacher_topk: tuple[Tensor, Tensor] | None = None,
                  cross: CrossTeacher | None = None, skip: Iterable[str] = ()) -> dict[str, Pair]:
    """(sum, count) of every active term of `spec` (but those in `skip`), each from its row of `TERMS`.

    student, teacher: `features.Features`; teacher may be None when what the terms read comes otherwise:
    `teacher_log_probs` (B, C) for `kd` (cached or several teachers), `teacher_topk` (log-probs, ids), each
    (B, L, K), for the causal-LM divergences (the top-k cache), `cross` for the cross-tokenizer terms, or nothing
    for `ce` / `lm`.
    labels: (B,) classes (classification) or (B, L) next tokens (causal-lm). valid: (B, L) the next-token targets
    (causal-lm: the mask of its token-level terms; classification uses the student's attention mask).
    """
    task = get_task(task)
    counts_targets = any(task.applies(_term(n).family) and _term(n).unit_for(task) == "targets" for n in spec.active)
    if valid is None and counts_targets:
        raise ValueError(f"compute_terms: {task.name} terms count the next-token targets; give valid")
    inputs = TermInputs(
        student=student, teacher=teacher, labels=labels,
        mask=valid if valid is not None else student.attention_mask, temperature=temperature, pairs=spec.pairs,
        projection=spec.projections["hidden"] if "hidden" in spec.projections else None,
        teacher_log_probs=teacher_log_probs, teacher_topk=teacher_topk, cross=cross,
        shared_vocab=spec.shared_vocab, options=spec.term_options)
    skip = set(skip)
    out = {}
    for name in spec.active:
        if name in skip:
            continue
        term = _term(name)
        if not task.applies(term.family):
            raise ValueError(f"loss term '{name}' does not apply to {task.name}")
        out[name] = term.fn(inputs)
    return out


# ---------------------------------------------------------------------------------------- step normalisation


def step_temperature(distill, step: int, total_steps: int) -> float:
    """The temperature of `step` under the recipe's schedule (`distill`: anything with temperature,
    temperature_end and temperature_schedule, e.g. a DistillConfig)."""
    return losses.temperature_at(step, total_steps, start=distill.temperature, end=distill.temperature_end,
                                 schedule=distill.temperature_schedule)


def normalise(term_sum: Tensor, term_count, unit_in_batch, unit_in_step, world_size: int) -> Tensor:
    """This micro-batch's share of the step's mean: sum / (count per unit · units in the whole step).

    A term's count is a fixed multiple of a unit of the batch (rows, labeled rows, tokens, targets), so dividing
    each micro-batch's sum by the term's count over the whole optimizer step (all micro-batches, all processes)
    gives gradient accumulation and several processes the loss of one big batch. The world_size factor undoes
    DDP's averaging of gradients across processes, so the gradient is that of the global mean.
    """
    per_unit = float(term_count) / max(float(unit_in_batch), 1.0)
    if per_unit == 0.0:  # nothing counted here (e.g. no labeled row in this micro-batch): the sum is 0 too
        return term_sum * 0.0
    return term_sum * world_size / (per_unit * float(unit_in_step))


def step_loss(terms: dict[str, Pair], weights: dict[str, float], batch_units: dict, step_units: dict,
              world_size: int, logged: dict[str, float], *, task: str | Task) -> Tensor:
    """This micro-batch's share of the step's loss Σ_term weight · (term sum / term count over the whole step).

    batch_units, step_units: `training.batch_units` of this micro-batch and summed over the step (all
    processes); each term is normalised by its unit in `TERMS` for `task`.
    Each term's unweighted share is added to `logged[term]` (over a step's micro-batches it sums to the term's
    step mean on this process; divided by world_size so that the processes' shares sum to the global mean).
    """
    loss = 0.0
    for term, (term_sum, term_count) in terms.items():
        unit = _term(term).unit_for(task)
        part = normalise(term_sum, term_count, batch_units[unit], step_units[unit], world_size)
        loss = loss + weights[term] * part
        logged[term] = logged.get(term, 0.0) + part.item() / world_size
    return loss


__all__ = [
    "CROSS_TOKENIZER_TERMS", "FAMILIES", "UNITS", "CrossTeacher", "Term", "TermInputs", "TERMS", "TermSpec", "check_terms", "compute_terms", "known_terms",
    "layer_pairs", "normalise", "step_loss", "step_temperature", "terms_for", "uncacheable_terms",
]
