"""The table of loss terms: one row per term a recipe can weight in `distill.losses`, for every task.

A row (`Term`) says how to compute the term from one forward pass of student and teacher (`fn`, returning a
(sum, count) pair from `kdistill.losses`), what its count counts (`unit`, which the loops use to normalise over a
whole optimizer step: `step_loss`), what it reads from the teacher (`reads`, from which `TermSpec` derives what
the models must return and what a teacher cache must hold), whether a teacher cache can hold that (`cacheable`)
and the tasks it applies to (`tasks`, checked by config validation: `check_terms`). Every strategy of every task
calls the one `compute_terms`.

Adding a term is one function and one row, e.g. a squared error between a classifier's logits (Ba & Caruana
2014)::

    def _logit_mse(x: TermInputs):  # Σ_c (z_S(c) − z_T(c))² per example; count = examples × C
        return losses.hidden_mse(x.student.logits[:, None], x.teacher.logits[:, None])

    TERMS["logit_mse"] = Term("logit_mse", _logit_mse, unit="rows", reads=frozenset({"logits"}),
                              cacheable=False, tasks=frozenset({"classification"}))

(cacheable=False: it reads `teacher.logits`, which only the live teacher gives; `kd` reads cached logits as
`teacher_log_probs`.) Recipes can then weight it (`distill.losses: {logit_mse: 1.0}`), config validation knows
it, and every loop computes, normalises and logs it. A tensor loss new to the toolkit goes into
`kdistill/losses.py` first, as a pure function returning (sum, count).

This module is the bottom layer: it imports only torch and kdistill.losses / features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor, nn

from kdistill import losses
from kdistill.features import Features

TASKS = ("classification", "causal-lm", "token-classification", "embedding")
CLASSIFICATION = frozenset({"classification"})
CAUSAL_LM = frozenset({"causal-lm"})
EMBEDDING = frozenset({"embedding"})
TOKEN_CLASSIFICATION = frozenset({"token-classification"})
ENCODER_TOKENS = CLASSIFICATION | TOKEN_CLASSIFICATION
"""Tasks whose batches are an encoder's tokens with an attention mask: the attention and MiniLM terms apply."""
BOTH = frozenset(TASKS) - EMBEDDING
"""Tasks the hidden-state terms apply to: all but embedding (a sentence encoder learns its pooled output)."""

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
    relation_heads: int = 12
    gjsd_beta: float = 0.5
    skew_alpha: float = 0.1

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
        renormalise over that support alike (kdistill/cache.py). Computed once per `TermInputs`."""
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
            x.student.qkv[s - 1][which], teacher.qkv[t - 1][which], num_relation_heads=x.relation_heads,
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
    return losses.generalized_jsd_tokens(s, t, beta=x.gjsd_beta, temperature=x.temperature, mask=x.mask)


def _skew_kl(x: TermInputs) -> Pair:
    """DistiLLM (Ko et al. 2024) skew KL: KL(p_T ‖ α·p_T + (1−α)·p_S) per target token, α = `skew_alpha`."""
    s, t = x.token_logits("skew_kl")
    return losses.skew_kl_tokens(s, t, alpha=x.skew_alpha, temperature=x.temperature, mask=x.mask)


def _skew_reverse_kl(x: TermInputs) -> Pair:
    """DistiLLM skew reverse KL: KL(p_S ‖ α·p_S + (1−α)·p_T) per target token, α = `skew_alpha`."""
    s, t = x.token_logits("skew_reverse_kl")
    return losses.skew_reverse_kl_tokens(s, t, alpha=x.skew_alpha, temperature=x.temperature, mask=x.mask)


def _cross_sides(x: TermInputs, term: str) -> tuple[CrossTeacher, Tensor, Tensor]:
    """(the teacher's pairs, the student's logits there (P, V_S), the pairs that count (P,): next-token targets)."""
    if x.cross is None:
        raise ValueError(f"loss term '{term}' compares a teacher over another vocabulary: it needs the teacher "
                         "signal with the teacher tokens' byte ends (kdistill/cache.py)")
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


_KD_UNIT = {"classification": "rows", "token-classification": "scored"}
"""kd counts examples (classification) or scored tokens (token classification: training.batch_units' `scored`
is (labels != -100).sum(), gold and TRANSFER tokens alike)."""


# -------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Term:
    """One loss term a recipe can weight."""

    name: str
    fn: Callable[[TermInputs], Pair]
    """(sum, count) of the term over one micro-batch; the loop divides by the count over the whole step."""
    unit: str | Mapping[str, str]
    """What `count` is a fixed multiple of (one of UNITS), or task -> unit where it depends on the task."""
    reads: frozenset[str]
    """What it reads from the teacher: logits, token_logits (causal LM), cross_token_logits (a causal LM over
    another vocabulary, at aligned positions), embeddings, hidden_states, cls,
    attentions, qkv, pooled (sentence embeddings); nothing for a supervised term (ce, lm)."""
    cacheable: bool
    """Whether a teacher cache can hold what it reads (kdistill/cache.py: classification logits and hidden states,
    causal-LM top-k token logits; a causal-LM hidden term runs the live teacher)."""
    tasks: frozenset[str]

    def unit_for(self, task: str) -> str:
        return self.unit if isinstance(self.unit, str) else self.unit[task]

    @property
    def positional(self) -> bool:
        """Compares the two models position by position (one tokenization for both)."""
        return bool(self.reads & POSITIONAL_READS)


def _row(name, fn, unit, reads=(), *, cacheable=True, tasks=CLASSIFICATION) -> tuple[str, Term]:
    return name, Term(name, fn, unit, frozenset(reads), cacheable, frozenset(tasks))


_HIDDEN_UNIT = {"classification": "tokens", "causal-lm": "targets", "token-classification": "tokens"}

TERMS: dict[str, Term] = dict([
    _row("kd", _kd, _KD_UNIT, {"logits"}, tasks=ENCODER_TOKENS),
    _row("ce", _ce, "labeled", tasks=ENCODER_TOKENS),
    _row("cls_pkd", _cls_pkd, "rows", {"cls"}),
    _row("attention_kl", _attention_kl, "tokens", {"attentions"}, cacheable=False, tasks=ENCODER_TOKENS),
    _row("attention_mse", _attention_mse, "token_pairs", {"attentions"}, cacheable=False, tasks=ENCODER_TOKENS),
    _row("minilm_qq", _minilm("query", "minilm_qq"), "tokens", {"qkv"}, cacheable=False, tasks=ENCODER_TOKENS),
    _row("minilm_kk", _minilm("key", "minilm_kk"), "tokens", {"qkv"}, cacheable=False, tasks=ENCODER_TOKENS),
    _row("minilm_vv", _minilm("value", "minilm_vv"), "tokens", {"qkv"}, cacheable=False, tasks=ENCODER_TOKENS),
    _row("forward_kl", _forward_kl, "targets", {"token_logits"}, tasks=CAUSAL_LM),
    _row("reverse_kl", _reverse_kl, "targets", {"token_logits"}, tasks=CAUSAL_LM),
    _row("jsd", _jsd, "targets", {"token_logits"}, tasks=CAUSAL_LM),
    _row("skew_kl", _skew_kl, "targets", {"token_logits"}, tasks=CAUSAL_LM),
    _row("skew_reverse_kl", _skew_reverse_kl, "targets", {"token_logits"}, tasks=CAUSAL_LM),
    _row("lm", _lm, "targets", tasks=CAUSAL_LM),
    _row("uld", _uld, "aligned", {"cross_token_logits"}, tasks=CAUSAL_LM),
    _row("aligned_kd", _aligned_kd, "aligned", {"cross_token_logits"}, tasks=CAUSAL_LM),
    _row("hidden_mse", _hidden_mse, _HIDDEN_UNIT, {"hidden_states"}, tasks=BOTH),
    _row("embedding_mse", _embedding_mse, _HIDDEN_UNIT, {"embeddings"}, tasks=BOTH),
    _row("hidden_cosine", _hidden_cosine, _HIDDEN_UNIT, {"hidden_states"}, tasks=BOTH),
    _row("pooled_mse", _pooled_mse, "rows", {"pooled"}, tasks=EMBEDDING),
    _row("pooled_cosine", _pooled_cosine, "rows", {"pooled"}, tasks=EMBEDDING),
    _row("pooled_contrastive", _pooled_contrastive, "rows", {"pooled"}, tasks=EMBEDDING),
])
"""Every loss term, by the name recipes use in `distill.losses`."""


def known_terms() -> list[str]:
    return list(TERMS)


def terms_for(task: str) -> list[str]:
    """The terms that apply to `task`, in table order."""
    return [name for name, term in TERMS.items() if task in term.tasks]


def check_terms(weights: Mapping[str, float], task: str) -> None:
    """Raise ValueError naming the weighted terms (weight > 0) that are unknown or do not apply to `task`."""
    unknown = sorted(t for t in weights if t not in TERMS)
    if unknown:
        raise ValueError(f"unknown loss term(s) {', '.join(unknown)}; known: {', '.join(TERMS)}")
    bad = sorted(t for t, w in weights.items() if w > 0 and task not in TERMS[t].tasks)
    if bad:
        raise ValueError(f"term(s) {', '.join(bad)} do not apply to {task}; use {', '.join(terms_for(task))}")


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
    relation_heads: int = 12
    projections: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    """Learned student->teacher width maps for hidden terms (FitNets' regressors); trained, not exported."""
    gjsd_beta: float = 0.5
    """β of the `jsd` term (distill.gjsd_beta)."""
    skew_alpha: float = 0.1
    """α of the skew KL terms (distill.skew_alpha)."""
    shared_vocab: tuple[Tensor, Tensor] | None = None
    """The tokens a teacher and a student over another vocabulary share (`aligned_kd`; tokenalign.shared_vocab)."""

    @property
    def active(self) -> dict[str, float]:
        return {k: w for k, w in self.weights.items() if w > 0}

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
                  temperature: float, task: str = "classification", valid: Tensor | None = None,
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
    if task == "causal-lm" and valid is None:
        raise ValueError("compute_terms: causal-lm terms count the next-token targets; give valid")
    inputs = TermInputs(
        student=student, teacher=teacher, labels=labels,
        mask=valid if valid is not None else student.attention_mask, temperature=temperature, pairs=spec.pairs,
        projection=spec.projections["hidden"] if "hidden" in spec.projections else None,
        teacher_log_probs=teacher_log_probs, teacher_topk=teacher_topk, cross=cross,
        shared_vocab=spec.shared_vocab, relation_heads=spec.relation_heads,
        gjsd_beta=spec.gjsd_beta, skew_alpha=spec.skew_alpha)
    skip = set(skip)
    out = {}
    for name in spec.active:
        if name in skip:
            continue
        term = _term(name)
        if task not in term.tasks:
            raise ValueError(f"loss term '{name}' does not apply to {task}")
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
              world_size: int, logged: dict[str, float], *, task: str = "classification") -> Tensor:
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
    "CROSS_TOKENIZER_TERMS", "TASKS", "UNITS", "CrossTeacher", "Term", "TermInputs", "TERMS", "TermSpec", "check_terms", "compute_terms", "known_terms",
    "layer_pairs", "normalise", "step_loss", "step_temperature", "terms_for", "uncacheable_terms",
]
