"""Alternating (MetaDistil-style) distillation: each model changes only in its own steps, in the configured ratio;
the teacher's meta-gradient really flows through the student's look-ahead (checked against finite differences);
the quiz split; a tiny end-to-end run through the pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import BertForSequenceClassification

from kdistill.config import DistillConfig
from kdistill.strategies.alternating import distill_alternating, split_quiz, teacher_meta_gradients, trainable
from kdistill.features import capture
from kdistill.pipeline import run
from kdistill.terms import TermSpec, compute_terms
from tests.conftest import LABELS, make_toy_examples, tiny_bert_config
from tests.helpers import check_run, record_updates, tiny_pair, tiny_train, toy_encoded, toy_run_config
from kdistill.strategies.phase import Phase

TEMPERATURE = 2.0


def test_each_model_changes_only_in_its_own_steps_in_the_configured_ratio(monkeypatch, tiny_tokenizer):
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    calls = record_updates(monkeypatch, teacher, student)
    phase = Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer, data=toy_encoded(tiny_tokenizer),
                  spec=spec, distill=DistillConfig(student_steps=2, teacher_lr=1e-3), train=tiny_train(max_steps=5),
                  task="classification")
    student_history, teacher_history = distill_alternating(phase)
    names = [name for name, *_ in calls[1:]]
    assert names == ["teacher_after", "student", "student"] * 2 + ["teacher_after", "student"]
    for (_, _, t0, s0), (name, _, t1, s1) in zip(calls, calls[1:]):
        assert torch.equal(t0, t1) == (name == "student"), name  # the teacher moves in teacher steps only
        assert torch.equal(s0, s1) == (name == "teacher_after"), name  # the student in student steps only
    assert [s["step"] for s in student_history.steps] == [1, 2, 3, 4, 5]
    assert [s["step"] for s in teacher_history.steps] == [1, 3, 5]  # the student step each round opens with
    assert set(teacher_history.steps[0]) >= {"ce", "quiz", "loss"}


@pytest.fixture(scope="module")
def meta_setup(tiny_tokenizer):
    """Float64 tiny models in eval mode (no dropout: finite differences need a deterministic loss)."""
    torch.manual_seed(0)
    config = tiny_bert_config(tiny_tokenizer, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32)
    teacher = BertForSequenceClassification(config).double().eval()
    student = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=32))
    student = student.double().eval()
    spec = TermSpec({"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}, pairs=[(1, 2)])

    def encode(rows):
        enc = tiny_tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        return dict(enc), torch.tensor([LABELS.index(r["label"]) for r in rows])

    return teacher, student, spec, encode(make_toy_examples(6, seed=4)), encode(make_toy_examples(6, seed=5))


def lookahead_quiz_loss(teacher, student, spec, train_batch, quiz_batch, lr) -> float:
    """The quiz loss of the student after one plain SGD step against the teacher: computed without any graph to
    the teacher, so that finite differences of it check the second-order gradient independently."""
    (batch, labels), (quiz, quiz_labels) = train_batch, quiz_batch
    with torch.no_grad():
        teacher_feats = capture(teacher, batch)
    terms = compute_terms(spec, capture(student, batch), teacher_feats, labels, temperature=TEMPERATURE,
                          task="classification")
    loss = sum(spec.weights[k] * total / count for k, (total, count) in terms.items())
    params = dict(student.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    stepped = {n: p.detach() - lr * (0 if g is None else g) for (n, p), g in zip(params.items(), grads)}
    with torch.no_grad():
        return F.cross_entropy(functional_call(student, stepped, args=(), kwargs=quiz).logits, quiz_labels).item()


def meta(teacher, student, spec, train_batch, quiz_batch, *, lr, task_weight):
    (batch, labels), (quiz, quiz_labels) = train_batch, quiz_batch
    return teacher_meta_gradients(student, teacher, batch, labels, quiz, quiz_labels, spec=spec, task="classification",
                                  temperature=TEMPERATURE, lookahead_lr=lr, task_weight=task_weight)


def test_meta_gradient_flows_through_the_lookahead_and_matches_finite_differences(meta_setup):
    teacher, student, spec, train_batch, quiz_batch = meta_setup
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    student_before = [p.detach().clone() for p in student.parameters()]
    lr = 0.5  # a large look-ahead step: a large second-order term, well above finite-difference noise
    grads, parts = meta(teacher, student, spec, train_batch, quiz_batch, lr=lr, task_weight=0.0)
    # the quiz term alone: the teacher does not appear in the quiz forward, only in the look-ahead step
    assert sum(float(g.abs().sum()) for g in grads) > 1e-6
    assert parts["quiz"] == pytest.approx(lookahead_quiz_loss(teacher, student, spec, train_batch, quiz_batch, lr))
    # nothing moved and nothing was accumulated
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before))
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), student_before))
    assert all(p.grad is None for p in [*teacher.parameters(), *student.parameters()])

    # directional derivative along a random direction, by central differences of the quiz loss
    torch.manual_seed(1)
    direction = [torch.randn_like(p) for p in trainable(teacher)]
    h = 1e-5

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(trainable(teacher), direction):
                p.add_(sign * h * d)
        value = lookahead_quiz_loss(teacher, student, spec, train_batch, quiz_batch, lr)
        with torch.no_grad():
            for p, d in zip(trainable(teacher), direction):
                p.sub_(sign * h * d)
        return value

    finite_difference = (shifted(+1) - shifted(-1)) / (2 * h)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(finite_difference, rel=1e-4, abs=1e-9)


def test_meta_gradient_parts(meta_setup):
    teacher, student, spec, train_batch, quiz_batch = meta_setup
    # without a look-ahead step the quiz loss does not depend on the teacher: no first-order shortcut exists
    zero, _ = meta(teacher, student, spec, train_batch, quiz_batch, lr=0.0, task_weight=0.0)
    assert all(float(g.abs().max()) == 0.0 for g in zero)
    # the task term adds exactly the gradient of the teacher's own cross-entropy, times its weight
    quiz_only, _ = meta(teacher, student, spec, train_batch, quiz_batch, lr=0.5, task_weight=0.0)
    both, parts = meta(teacher, student, spec, train_batch, quiz_batch, lr=0.5, task_weight=0.3)
    batch, labels = train_batch
    ce = F.cross_entropy(teacher(**batch).logits, labels)
    assert parts["ce"] == pytest.approx(ce.item())
    task = torch.autograd.grad(ce, trainable(teacher), allow_unused=True)
    for b, q, t in zip(both, quiz_only, task):
        torch.testing.assert_close(b - q, 0.3 * (torch.zeros_like(b) if t is None else t))


def test_quiz_split_is_held_out_and_deterministic(tiny_tokenizer):
    encoded = toy_encoded(tiny_tokenizer, 40)["train"]
    train_a, quiz_a = split_quiz(encoded, 0.1, seed=7)
    train_b, quiz_b = split_quiz(encoded, 0.1, seed=7)
    assert (len(train_a), len(quiz_a)) == (36, 4)
    assert quiz_a["input_ids"] == quiz_b["input_ids"] and train_a["input_ids"] == train_b["input_ids"]
    assert split_quiz(encoded, 0.1, seed=8)[1]["input_ids"] != quiz_a["input_ids"]
    assert len(split_quiz(encoded, 0.001, seed=7)[1]) == 1  # at least one quiz example


def test_tiny_alternating_run_end_to_end(tmp_path, teacher_dir):
    cfg = toy_run_config(tmp_path, teacher_dir, "alternating", student_steps=2)
    histories = check_run(run(cfg, tmp_path / "run"), teacher_dir, "alternating")
    assert [s["step"] for s in histories["teacher_after"]["steps"]] == [1, 3]
