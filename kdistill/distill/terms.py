"""Recipe loss terms -> computations on captured features. Shared by every strategy.

A term maps (student features, teacher features, labels) to a (sum, count) pair from `kdistill.losses`;
`UNITS` says whether its count is per example ("rows"), per labeled example ("labeled": unlabeled transfer rows
carry no label) or per real token ("tokens"), which the loop uses to normalise over a whole optimizer step (see
training.normalise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kdistill import losses
from kdistill.training import normalise

UNITS = {
    "kd": "rows", "ce": "labeled", "cls_pkd": "rows",
    "hidden_mse": "tokens", "embedding_mse": "tokens", "hidden_cosine": "tokens",
    "attention_kl": "tokens", "attention_mse": "tokens",
    "minilm_qq": "tokens", "minilm_kk": "tokens", "minilm_vv": "tokens",
}
LM_TERMS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "lm")
HIDDEN_TERMS = {"hidden_mse", "embedding_mse", "hidden_cosine", "cls_pkd"}
ATTENTION_TERMS = {"attention_kl", "attention_mse"}
RELATION_TERMS = {"minilm_qq": "query", "minilm_kk": "key", "minilm_vv": "value"}


def uncacheable_terms(terms) -> list[str]:
    """Those of `terms` that read the teacher's attention maps or Q/K/V, which no cache holds (too large)."""
    return sorted(set(terms) & (ATTENTION_TERMS | set(RELATION_TERMS)))


def known_terms() -> list[str]:
    return list(UNITS) + list(LM_TERMS)


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
    """What the terms of one run need: weights, layer pairs, temperature, learned projections."""

    weights: dict[str, float]
    pairs: list[tuple[int, int]]
    relation_heads: int = 12
    projections: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    """Learned student->teacher width maps for hidden terms (FitNets' regressors); trained, not exported."""

    @property
    def active(self) -> dict[str, float]:
        return {k: w for k, w in self.weights.items() if w > 0}

    @property
    def needs_hidden(self) -> bool:
        return bool(HIDDEN_TERMS & set(self.active))

    @property
    def needs_attentions(self) -> bool:
        return bool(ATTENTION_TERMS & set(self.active))

    @property
    def needs_qkv(self) -> bool:
        return bool(set(RELATION_TERMS) & set(self.active))

    @property
    def needs_teacher_features(self) -> bool:
        """False when only logits/labels matter: then the teacher's logits can be cached."""
        return self.needs_hidden or self.needs_attentions or self.needs_qkv

    @property
    def teacher_hidden_layers(self) -> tuple[list[int], bool]:
        """The teacher `hidden_states` indices `compute_terms` reads, and whether it reads only position 0 of them
        (cls_pkd alone). The teacher-feature cache stores exactly these; keep the two in step."""
        active = set(self.active)
        layers = {0} if "embedding_mse" in active else set()
        if active & {"hidden_mse", "hidden_cosine", "cls_pkd"}:
            layers |= {t for _, t in self.pairs}
        return sorted(layers), (active & HIDDEN_TERMS) == {"cls_pkd"}

    def add_projections(self, student_width: int, teacher_width: int) -> None:
        if student_width != teacher_width and self.needs_hidden:
            self.projections["hidden"] = nn.Linear(student_width, teacher_width)


def compute_terms(spec: TermSpec, student, teacher, labels: torch.Tensor, *, temperature: float,
                  teacher_log_probs: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(sum, count) of every active term. `student`/`teacher` are `features.Features`; `teacher` may be None
    when only `kd` (from `teacher_log_probs`, e.g. cached or multi-teacher) and `ce` are active."""
    out = {}
    mask = student.attention_mask  # (B, L)
    proj = spec.projections["hidden"] if "hidden" in spec.projections else None
    for term in spec.active:
        if term == "kd":
            if teacher_log_probs is not None:
                out[term] = losses.soft_kl(student.logits, None, teacher_log_probs=teacher_log_probs,
                                           temperature=temperature)
            else:
                out[term] = losses.soft_kl(student.logits, teacher.logits, temperature=temperature)
        elif term == "ce":
            out[term] = losses.hard_ce(student.logits, labels)
        elif term == "embedding_mse":
            out[term] = losses.hidden_mse(student.hidden_states[0], teacher.hidden_states[0], mask=mask,
                                          projection=proj)
        elif term in ("hidden_mse", "hidden_cosine"):
            fn = losses.hidden_mse if term == "hidden_mse" else losses.hidden_cosine
            out[term] = _over_pairs(spec.pairs, lambda s, t: fn(student.hidden_states[s], teacher.hidden_states[t],
                                                                mask=mask, projection=proj))
        elif term == "cls_pkd":
            out[term] = _over_pairs(spec.pairs, lambda s, t: losses.cls_pkd(
                student.hidden_states[s][:, 0], teacher.hidden_states[t][:, 0], projection=proj))
        elif term in ATTENTION_TERMS:
            fn = losses.attention_kl if term == "attention_kl" else losses.attention_mse
            out[term] = _over_pairs(spec.pairs, lambda s, t: fn(student.attentions[s - 1],
                                                                teacher.attentions[t - 1], mask=mask))
        elif term in RELATION_TERMS:
            # MiniLMv2 distils the relations of the last layers; we use every mapped pair's relations.
            which = RELATION_TERMS[term]
            out[term] = _over_pairs(spec.pairs, lambda s, t: losses.minilm_relation_kl(
                student.qkv[s - 1][which], teacher.qkv[t - 1][which], num_relation_heads=spec.relation_heads,
                mask=mask))
        else:
            raise ValueError(f"loss term '{term}' is not available for classification")
    return out


def step_temperature(distill, step: int, total_steps: int) -> float:
    """The temperature of `step` under the recipe's schedule (`distill`: a DistillConfig)."""
    return losses.temperature_at(step, total_steps, start=distill.temperature, end=distill.temperature_end,
                                 schedule=distill.temperature_schedule)


def step_loss(terms: dict[str, tuple[torch.Tensor, torch.Tensor]], weights: dict[str, float], batch_units: dict,
              step_units: dict, world_size: int, logged: dict[str, float]) -> torch.Tensor:
    """This micro-batch's share of the step's loss Σ_term weight · (term sum / term count over the whole step).

    Each term's unweighted share is added to `logged[term]` (over a step's micro-batches it sums to the term's
    step mean on this process; divided by world_size so that the processes' shares sum to the global mean).
    """
    loss = 0.0
    for term, (term_sum, term_count) in terms.items():
        unit = UNITS[term]
        part = normalise(term_sum, term_count, batch_units[unit], step_units[unit], world_size)
        loss = loss + weights[term] * part
        logged[term] = logged.get(term, 0.0) + part.item() / world_size
    return loss


def _over_pairs(pairs, fn):
    total, count = 0.0, 0.0
    for s, t in pairs:
        term_sum, term_count = fn(s, t)
        total = total + term_sum
        count = count + float(term_count)
    return total, count
