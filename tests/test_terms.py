"""The table of loss terms (kdistill/terms.py): every row runs for its tasks and counts in its unit, what a run needs
follows from the rows' `reads`, config validation reads the table, and adding a term is one function + one row."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill import losses
from kdistill import terms as T
from kdistill.task import get_task, task_names
from kdistill.config import load_config
from kdistill.strategies.explicit import distill_explicit
from kdistill.errors import ConfigError
from kdistill.features import Features
from kdistill.training import batch_units
from tests.helpers import tiny_pair, tiny_train, toy_encoded
from kdistill.strategies.phase import Phase

B, L, D, C, V, HEADS = 3, 6, 8, 4, 11, 2
PAIRS = [(1, 2), (2, 4)]  # student layer -> teacher layer, 1-based hidden_states indices
READS = {"logits", "token_logits", "cross_token_logits", "embeddings", "hidden_states", "cls", "attentions", "qkv",
         "pooled"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def features(layers: int, task: str, mask: torch.Tensor, seed: int) -> Features:
    """Random Features of a model with `layers` layers: logits, hidden states, attention maps and Q/K/V."""
    g = _gen(seed)
    b = mask.shape[0]
    logits = torch.randn(b, C, generator=g) if task == "classification" else torch.randn(b, L, V, generator=g)
    if task == "token-classification":  # one tag distribution per token
        logits = logits[..., :C]
    keys = mask.bool()[:, None, None, :]
    attentions = tuple(torch.randn(b, HEADS, L, L, generator=g).masked_fill(~keys, float("-inf")).softmax(-1)
                       for _ in range(layers))
    return Features(
        logits=logits,
        hidden_states=tuple(torch.randn(b, L, D, generator=g) for _ in range(layers + 1)),
        attentions=attentions,
        qkv=[{k: torch.randn(b, L, D, generator=g) for k in ("query", "key", "value")} for _ in range(layers)],
        attention_mask=mask,
        pooled=torch.randn(b, D, generator=g),  # drawn last: the other draws stay as they were
    )


def batch(task: str, padding: list[int], seed: int = 0) -> dict:
    """A batch of len(padding) rows (row i has padding[i] pad positions at the end); classification: row 1
    unlabeled; causal-lm: labels = the next tokens, `valid` = the positions that predict a real token."""
    mask = torch.ones(len(padding), L, dtype=torch.long)
    for i, pad in enumerate(padding):
        if pad:
            mask[i, -pad:] = 0
    if task == "classification":
        labels = torch.randint(0, C, (len(padding),), generator=_gen(seed))
        if len(padding) > 1:
            labels[1] = -100  # an unlabeled transfer row
        return {"attention_mask": mask, "labels": labels}
    if task == "token-classification":  # a tag per token; -100 on padding and on non-first sub-tokens (position 2)
        labels = torch.randint(0, C, (len(padding), L), generator=_gen(seed)).masked_fill(mask == 0, -100)
        labels[:, 2] = -100
        return {"attention_mask": mask, "labels": labels}
    ids = torch.randint(0, V, (len(padding), L), generator=_gen(seed))
    valid = torch.zeros_like(mask, dtype=torch.bool)
    valid[:, :-1] = mask[:, 1:].bool()
    labels = torch.where(valid, ids.roll(-1, 1), torch.full_like(ids, -100))
    # a teacher over another vocabulary whose tokens end with the student's at every other target position
    rows, positions = (valid & (torch.arange(L) % 2 == 0)).nonzero(as_tuple=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "valid": valid,
            "aligned": torch.stack([rows, positions, positions])}


def run_term(name: str, task: str, data: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    student = features(2, task, data["attention_mask"], seed=1)
    teacher = features(4, task, data["attention_mask"], seed=2)
    spec = T.TermSpec({name: 1.0}, PAIRS, options={"relation_heads": 2, "gjsd_beta": 0.3, "skew_alpha": 0.2},
                      shared_vocab=(torch.arange(7), torch.arange(7).flip(0)))
    if name in T.CROSS_TOKENIZER_TERMS:  # the teacher's top-4 at its positions of the aligned pairs
        rows, t_pos, s_pos = data["aligned"]
        logprobs, ids = teacher.logits.log_softmax(-1).topk(4, dim=-1)
        kw["cross"] = T.CrossTeacher(rows, s_pos, logprobs[rows, t_pos], ids[rows, t_pos])
    out = T.compute_terms(spec, student, teacher, data["labels"], temperature=2.0, task=task,
                          valid=data.get("valid"), **kw)
    assert list(out) == [name]
    return out[name]


ROWS = [(name, task) for name, term in T.TERMS.items() for task in task_names() if get_task(task).applies(term.family)]


def test_every_row_is_consistent():
    assert set(T.TERMS) == {
        "kd", "ce", "cls_pkd", "hidden_mse", "embedding_mse", "hidden_cosine", "attention_kl", "attention_mse",
        "minilm_qq", "minilm_kk", "minilm_vv", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "lm",
        "uld", "aligned_kd", "pooled_mse", "pooled_cosine", "pooled_contrastive"}
    for name, term in T.TERMS.items():
        assert term.name == name and callable(term.fn) and term.fn.__doc__, name  # each function says its formula
        assert term.family in T.FAMILIES, name
        tasks = [task for task in task_names() if get_task(task).applies(term.family)]
        assert tasks, name  # some task takes it
        assert term.reads <= READS, name
        assert term.cacheable == (not term.reads & {"attentions", "qkv"}), name  # no cache holds those
        for task in tasks:
            assert term.unit_for(task) in batch_units(batch(task, [0, 2]))  # a unit the loops count
    assert set(T.terms_for("causal-lm")) == {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "lm",
                                             "hidden_mse", "hidden_cosine", "embedding_mse", "uld", "aligned_kd"}
    assert T.TERMS["hidden_mse"].unit_for("classification") == "tokens"
    assert T.TERMS["hidden_mse"].unit_for("causal-lm") == "targets"


@pytest.mark.parametrize("name, task", ROWS)
def test_each_term_runs_and_counts_a_fixed_multiple_of_its_unit(name, task):
    """count / (the term's unit in the batch) is the same for two batches of other sizes, padding and labels: the
    property step normalisation relies on (a wrong unit, e.g. rows for a token term, breaks it)."""
    ratios = []
    for padding in ([0, 2, 4], [3, 0]):
        data = batch(task, padding)
        term_sum, count = run_term(name, task, data)
        assert torch.is_tensor(term_sum) and term_sum.dim() == 0 and math.isfinite(float(term_sum))
        assert float(term_sum) > 0 and float(count) > 0
        unit = batch_units(data)[T.TERMS[name].unit_for(task)]
        ratios.append(float(count) / float(unit))
    assert ratios[0] == pytest.approx(ratios[1])


def test_terms_compute_what_losses_py_computes():
    data = batch("classification", [0, 2, 4])
    s, t = features(2, "classification", data["attention_mask"], 1), features(4, "classification",
                                                                                data["attention_mask"], 2)
    total, count = run_term("hidden_cosine", "classification", data)
    mask = data["attention_mask"]
    parts = [losses.hidden_cosine(s.hidden_states[a], t.hidden_states[b], mask=mask) for a, b in PAIRS]
    assert float(total) == pytest.approx(float(sum(p[0] for p in parts))) and count == sum(int(p[1]) for p in parts)
    lm = batch("causal-lm", [0, 3])
    s, t = features(2, "causal-lm", lm["attention_mask"], 1), features(4, "causal-lm", lm["attention_mask"], 2)
    total, count = run_term("jsd", "causal-lm", lm)
    ref = losses.generalized_jsd_tokens(s.logits, t.logits, beta=0.3, temperature=2.0, mask=lm["valid"])
    assert float(total) == pytest.approx(float(ref[0])) and int(count) == int(ref[1]) == int(lm["valid"].sum())


def test_causal_top_k_teacher_gathers_the_student_and_skip_drops_terms():
    data = batch("causal-lm", [0, 3])
    s, t = features(2, "causal-lm", data["attention_mask"], 1), features(4, "causal-lm", data["attention_mask"], 2)
    log_probs = t.logits.log_softmax(-1)
    ids = torch.arange(V).expand(2, L, V)  # K = V: the whole support, so renormalising changes nothing
    spec = T.TermSpec({"forward_kl": 1.0, "skew_kl": 1.0, "lm": 0.5}, [], {"skew_alpha": 0.2})
    live = T.compute_terms(spec, s, t, data["labels"], temperature=1.0, task="causal-lm", valid=data["valid"])
    cached = T.compute_terms(spec, s, None, data["labels"], temperature=1.0, task="causal-lm", valid=data["valid"],
                             teacher_topk=(log_probs, ids), skip=("lm",))
    assert set(live) == {"forward_kl", "skew_kl", "lm"} and set(cached) == {"forward_kl", "skew_kl"}
    for name in cached:
        assert float(cached[name][0]) == pytest.approx(float(live[name][0]), rel=1e-5)
    small = (log_probs[..., :4], ids[..., :4])  # a top-4 support: the student is gathered at the same ids
    topk = T.compute_terms(spec, s, None, data["labels"], temperature=1.0, task="causal-lm", valid=data["valid"],
                           teacher_topk=small, skip=("lm",))
    ref = losses.forward_kl_tokens(s.logits[..., :4], log_probs[..., :4], temperature=1.0, mask=data["valid"])
    assert float(topk["forward_kl"][0]) == pytest.approx(float(ref[0]))
    with pytest.raises(ValueError, match="loss term 'forward_kl' needs the teacher's outputs"):
        T.compute_terms(spec, s, None, data["labels"], temperature=1.0, task="causal-lm", valid=data["valid"])


def test_terms_refuse_a_task_they_do_not_apply_to():
    data = batch("classification", [0, 1])
    s = features(2, "classification", data["attention_mask"], 1)
    with pytest.raises(ValueError, match="loss term 'lm' does not apply to classification"):
        T.compute_terms(T.TermSpec({"lm": 1.0}, []), s, None, data["labels"], temperature=1.0, task="classification")
    with pytest.raises(ValueError, match="term.s. kd do not apply to causal-lm; use forward_kl, reverse_kl, jsd"):
        T.check_terms({"kd": 1.0, "lm": 1.0, "ce": 0.0}, "causal-lm")
    T.check_terms({"lm": 1.0, "hidden_mse": 0.5}, "causal-lm")


def test_spec_needs_follow_from_the_rows_reads():
    def spec(*names):
        return T.TermSpec(dict.fromkeys(names, 1.0), PAIRS)

    hidden = {"hidden_mse", "embedding_mse", "hidden_cosine", "cls_pkd"}
    for name in T.TERMS:
        s = spec(name)
        assert s.needs_hidden == (name in hidden), name
        assert s.needs_attentions == (name in {"attention_kl", "attention_mse"}), name
        assert s.needs_qkv == name.startswith("minilm_"), name
        assert s.needs_teacher_features == (s.needs_hidden or s.needs_attentions or s.needs_qkv)
    assert not spec("kd", "ce").needs_teacher_features and not spec("forward_kl", "lm").needs_teacher_features
    assert spec("cls_pkd").teacher_hidden_layers == ([2, 4], True)
    assert spec("cls_pkd", "embedding_mse").teacher_hidden_layers == ([0, 2, 4], False)
    assert spec("embedding_mse").teacher_hidden_layers == ([0], False)
    assert spec("kd", "attention_kl").teacher_hidden_layers == ([], False)
    assert T.uncacheable_terms(["kd", "minilm_vv", "attention_kl", "hidden_mse"]) == ["attention_kl", "minilm_vv"]
    assert {n for n, t in T.TERMS.items() if t.positional} >= {"hidden_mse", "embedding_mse", "hidden_cosine",
                                                               "attention_kl", "attention_mse", "minilm_qq"}
    assert not T.TERMS["cls_pkd"].positional and not T.TERMS["kd"].positional


def test_batch_units_count_causal_targets_and_step_loss_divides_by_them():
    data = batch("causal-lm", [0, 3])
    units = batch_units(data)
    assert float(units["targets"]) == float(data["valid"].sum()) == 2 * (L - 1) - 3
    term_sum, count = torch.tensor(6.0), torch.tensor(2 * int(data["valid"].sum()))  # 2 per target
    logged = {}
    step = {k: v * 2 for k, v in units.items()}  # this micro-batch is half of the step
    loss = T.step_loss({"hidden_mse": (term_sum, count)}, {"hidden_mse": 0.5}, units, step, 1, logged,
                       task="causal-lm")
    assert float(loss) == pytest.approx(0.5 * 6.0 / (2 * float(step["targets"])))
    assert logged["hidden_mse"] == pytest.approx(6.0 / (2 * float(step["targets"])))
    assert "targets" not in batch_units(batch("classification", [0, 1]))


@pytest.mark.parametrize("override, message", [
    ("distill.losses={forward_kl: 1.0}", "distill.losses.forward_kl: does not apply to task classification"),
    ("distill.losses={kd: 1.0, lm: 0.5}", "distill.losses.lm: does not apply to task classification"),
    ("distill.losses={hiden_mse: 1.0}", "distill.losses: unknown loss term 'hiden_mse' (did you mean 'hidden_mse'?)"),
])
def test_config_validates_terms_by_the_table(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^recipe 'lm' \+ --set: distill.losses.kd: does not apply to task "
                                          r"causal-lm; its terms are forward_kl"):
        load_config("lm", ["distill.losses={kd: 1.0, forward_kl: 1.0}"])
    assert load_config("lm", ["distill.losses={hidden_mse: 1.0, lm: 1.0}"]).distill.losses["hidden_mse"] == 1.0


def test_adding_a_term_is_one_function_and_one_row(monkeypatch, tiny_tokenizer):
    def logit_mse(x: T.TermInputs):
        """Ba & Caruana 2014: Σ_c (z_S(c) − z_T(c))² per example."""
        return losses.hidden_mse(x.student.logits[:, None], x.teacher.logits[:, None])

    monkeypatch.setitem(T.TERMS, "logit_mse", T.Term("logit_mse", logit_mse, unit="rows",
                                                     reads=frozenset({"logits"}), cacheable=False,
                                                     family="logits"))

    cfg = load_config("default", ["distill.losses={kd: 1.0, logit_mse: 0.5}"])  # the recipe may weight it
    assert cfg.distill.losses == {"kd": 1.0, "logit_mse": 0.5}
    with pytest.raises(ConfigError, match="distill.losses.logit_mse: does not apply to task causal-lm"):
        load_config("lm", ["distill.losses={forward_kl: 1.0, logit_mse: 0.5}"])

    data = batch("classification", [0, 2, 4])
    s, t = features(2, "classification", data["attention_mask"], 1), features(4, "classification",
                                                                                data["attention_mask"], 2)
    spec = T.TermSpec(dict(cfg.distill.losses), PAIRS)
    assert not spec.needs_teacher_features and T.uncacheable_terms(spec.active) == ["logit_mse"]
    out = T.compute_terms(spec, s, t, data["labels"], temperature=2.0, task="classification")
    assert set(out) == {"kd", "logit_mse"}
    assert float(out["logit_mse"][0]) == pytest.approx(float(((s.logits - t.logits) ** 2).sum()))
    units = batch_units(data)
    logged = {}
    # normalised per example, as its row says
    loss = T.step_loss(out, spec.active, units, units, 1, logged, task="classification")
    assert logged["logit_mse"] == pytest.approx(float(((s.logits - t.logits) ** 2).sum()) / (B * C))
    assert float(loss) == pytest.approx(logged["kd"] + 0.5 * logged["logit_mse"])

    teacher, student, _ = tiny_pair(tiny_tokenizer)  # and a strategy trains with it, logging it every step
    history = distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                                     data=toy_encoded(tiny_tokenizer), spec=T.TermSpec(dict(cfg.distill.losses), []),
                                     distill=cfg.distill, train=tiny_train(max_steps=2), task="classification"))
    assert [s["step"] for s in history.steps] == [1, 2] and all(s["logit_mse"] > 0 for s in history.steps)
