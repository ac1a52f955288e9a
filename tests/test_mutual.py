"""Mutual learning: who learns when (explicit: the teacher never; mutual: everyone, every step), the peers' KL
terms, and a tiny end-to-end run through the pipeline."""

from __future__ import annotations

import pytest
import torch

from kdistill import losses
from kdistill.config import DistillConfig, load_config
from kdistill.strategies.explicit import distill_explicit
from kdistill.strategies.mutual import distill_mutual, peer_terms
from kdistill.errors import UserError
from kdistill.features import Features
from kdistill.pipeline import run
from kdistill.terms import TermSpec
from tests.helpers import check_run, record_updates, tiny_pair, tiny_train, toy_encoded, toy_run_config
from kdistill.strategies.phase import Phase


def test_explicit_never_changes_the_teacher(monkeypatch, tiny_tokenizer):
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    calls = record_updates(monkeypatch, teacher, student)
    distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                           data=toy_encoded(tiny_tokenizer), spec=spec, distill=DistillConfig(), train=tiny_train(),
                           task="classification"))
    assert [name for name, *_ in calls[1:]] == ["student"] * 4
    for (_, _, t0, s0), (_, _, t1, s1) in zip(calls, calls[1:]):
        assert torch.equal(t0, t1)
        assert not torch.equal(s0, s1)


def test_mutual_changes_teacher_and_student_every_step(monkeypatch, tiny_tokenizer):
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    calls = record_updates(monkeypatch, teacher, student)
    student_history, teacher_history = distill_mutual(Phase(student=student, teachers=[teacher],
                                                            tokenizer=tiny_tokenizer,
                                                            data=toy_encoded(tiny_tokenizer), spec=spec,
                                                            distill=DistillConfig(teacher_lr=1e-3),
                                                            train=tiny_train(), task="classification"))
    # per step: the teacher steps (and logs), then the student
    assert [(name, step) for name, step, *_ in calls[1:]] == \
        [(name, step) for step in range(1, 5) for name in ("teacher_after", "student")]
    ends = [calls[0]] + [c for c in calls if c[0] == "student"]  # the state at the end of each step
    for (_, _, t0, s0), (_, _, t1, s1) in zip(ends, ends[1:]):
        assert not torch.equal(t0, t1)
        assert not torch.equal(s0, s1)
    assert student_history.name == "student" and teacher_history.name == "teacher_after"
    assert set(teacher_history.steps[0]) >= {"kd", "ce", "loss"} and "hidden_mse" not in teacher_history.steps[0]
    assert set(student_history.steps[0]) >= {"kd", "ce", "hidden_mse", "loss"}
    assert teacher_history.evals and student_history.evals


def test_mutual_with_three_peers_returns_the_first_student(monkeypatch, tiny_tokenizer):
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    calls = record_updates(monkeypatch, teacher, student)
    histories = distill_mutual(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                                     data=toy_encoded(tiny_tokenizer), spec=spec,
                                     distill=DistillConfig(peers=3, teacher_lr=1e-3), train=tiny_train(max_steps=2),
                                     task="classification"))
    assert [h.name for h in histories] == ["student", "teacher_after"]
    assert [name for name, *_ in calls[1:]] == ["teacher_after", "student", "student_2"] * 2
    assert not torch.equal(calls[0][3], calls[-1][3])  # the student passed in is the one that learned


def test_peer_terms_average_the_kl_to_every_other_peer_and_stop_gradients():
    torch.manual_seed(0)
    logits = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    feats = [Features(logits=z) for z in logits]
    labels = torch.tensor([0, 1, 2, 0, 1])
    spec = TermSpec({"kd": 1.0, "ce": 1.0}, pairs=[])
    terms = peer_terms(1, feats, labels, spec=spec, teacher_terms=spec, temperature=2.0,
                       task="classification")
    expected = (losses.soft_kl(logits[1], logits[0].detach(), temperature=2.0)[0]
                + losses.soft_kl(logits[1], logits[2].detach(), temperature=2.0)[0]) / 2
    torch.testing.assert_close(terms["kd"][0], expected)
    assert int(terms["kd"][1]) == 5
    torch.testing.assert_close(terms["ce"][0], losses.hard_ce(logits[1], labels)[0])
    (terms["kd"][0] + terms["ce"][0]).backward()
    assert logits[0].grad is None and logits[2].grad is None and logits[1].grad.abs().sum() > 0


def test_mutual_needs_a_logit_term_for_the_teacher(tiny_tokenizer):
    teacher, student, _ = tiny_pair(tiny_tokenizer)
    with pytest.raises(UserError, match="kd and/or ce"):
        distill_mutual(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                             data=toy_encoded(tiny_tokenizer), spec=TermSpec({"hidden_mse": 1.0}, [(1, 2)]),
                             distill=DistillConfig(), train=tiny_train(), task="classification"))


def test_shipped_mutual_recipe():
    cfg = load_config("mutual")
    assert cfg.distill.strategy == "mutual" and cfg.data.dataset == "bbc-news"


def test_tiny_mutual_run_end_to_end(tmp_path, teacher_dir):
    cfg = toy_run_config(tmp_path, teacher_dir, "mutual")
    histories = check_run(run(cfg, tmp_path / "run"), teacher_dir, "mutual")
    assert [s["step"] for s in histories["teacher_after"]["steps"]] == [1, 2, 3, 4]
