"""Mutual learning: who learns when (explicit: the teacher never; mutual: everyone, every step), the peers' KL
terms, and a tiny end-to-end run through the pipeline.

The helpers here (toy data, tiny models, update recording) are shared with test_alternating.py.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from tests.conftest import LABELS, make_toy_examples, tiny_bert_config
from kdistill import losses
from kdistill.config import DistillConfig, TrainConfig, load_config
from kdistill.data import DataBundle
from kdistill.distill.explicit import distill_explicit
from kdistill.distill.mutual import distill_mutual, peer_terms
from kdistill.distill.terms import TermSpec
from kdistill.errors import UserError
from kdistill.features import Features
from kdistill.pipeline import run
from kdistill.student import build_student
from kdistill.training import History

SPEC_WEIGHTS = {"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}


# --------------------------------------------------------------------------------- helpers (also for alternating)

def toy_bundle(n_train: int = 48) -> DataBundle:
    def split(n, seed):
        rows = make_toy_examples(n, seed)
        return Dataset.from_dict({"text": [r["text"] for r in rows], "label": [LABELS.index(r["label"]) for r in rows]})

    return DataBundle(DatasetDict(train=split(n_train, 0), validation=split(12, 1), test=split(12, 2)), LABELS, "toy")


def tiny_pair(tokenizer):
    """A random 4-layer teacher and a 2-layer student copied from its layers 1 and 3 (pairs (1, 2), (2, 4))."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(tokenizer))
    student = build_student(teacher, layers=[1, 3])
    return teacher.train(), student.train(), TermSpec(dict(SPEC_WEIGHTS), pairs=[(1, 2), (2, 4)])


def tiny_train(**overrides) -> TrainConfig:
    # no warmup: with it the first step's learning rate is 0 and nothing would move
    return TrainConfig(**{"max_steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0, **overrides})


def weights_of(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def record_updates(monkeypatch, teacher, student) -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """Every History.log_step (once per optimizer step of its model, right after it) as (history name, step,
    teacher weights, student weights) at that moment; the first entry is the state before training."""
    calls = [("start", 0, weights_of(teacher), weights_of(student))]
    original = History.log_step

    def log_step(self, step, values):
        calls.append((self.name, step, weights_of(teacher), weights_of(student)))
        original(self, step, values)

    monkeypatch.setattr(History, "log_step", log_step)
    return calls


def save_teacher_dir(path, tokenizer):
    """A random 4-layer teacher dir whose label ids follow the data's (sorted) label names, as teacher.path needs."""
    names = sorted(LABELS)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(tokenizer, id2label=dict(enumerate(names)),
                                                           label2id={n: i for i, n in enumerate(names)}))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return save_teacher_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer)


def toy_run_config(tmp_path, teacher_dir, strategy: str, **distill):
    data = tmp_path / "toy.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(make_toy_examples(60, seed=3))
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(json.dumps({
        "name": f"toy-{strategy}",
        "data": {"train_file": str(data), "max_length": 16},
        "teacher": {"path": str(teacher_dir)},
        "student": {"layers": 2},
        "distill": {"losses": SPEC_WEIGHTS, "baseline": False, "teacher_lr": 1e-3, **distill},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0},
        "eval": {"repeats": 1, "warmup": 0},
    }), encoding="utf-8")
    return load_config(recipe, [f"distill.strategy={strategy}"])  # as `kdistill run toy.yaml --set ...`


def check_run(run_dir, teacher_dir, strategy: str) -> dict:
    """The run wrote a student and a teacher_after, evaluated both, and the teacher really changed."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["strategy"] == strategy
    assert set(metrics["models"]) == {"teacher", "student", "teacher_after"}
    for name in ("student", "teacher_after"):
        assert 0.0 <= metrics["models"][name]["accuracy"] <= 1.0
    histories = {name: json.loads((run_dir / "logs" / f"history_{name}.json").read_text(encoding="utf-8"))
                 for name in ("student", "teacher_after")}
    assert histories["student"]["steps"] and histories["teacher_after"]["steps"]
    before = load_file(teacher_dir / "model.safetensors")
    after = load_file(run_dir / "teacher_after" / "model.safetensors")
    assert not all(torch.equal(before[k], after[k]) for k in before)
    assert (run_dir / "report.md").is_file()
    return histories


# ------------------------------------------------------------------------------------------------------ tests

def test_explicit_never_changes_the_teacher(monkeypatch, tiny_tokenizer):
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    calls = record_updates(monkeypatch, teacher, student)
    distill_explicit(student, [teacher], tiny_tokenizer, toy_bundle(), spec=spec, distill=DistillConfig(),
                     train=tiny_train(), max_length=16)
    assert [name for name, *_ in calls[1:]] == ["student"] * 4
    for (_, _, t0, s0), (_, _, t1, s1) in zip(calls, calls[1:]):
        assert torch.equal(t0, t1)
        assert not torch.equal(s0, s1)


def test_mutual_changes_teacher_and_student_every_step(monkeypatch, tiny_tokenizer):
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    calls = record_updates(monkeypatch, teacher, student)
    student_history, teacher_history = distill_mutual(
        student, teacher, tiny_tokenizer, toy_bundle(), spec=spec, distill=DistillConfig(teacher_lr=1e-3),
        train=tiny_train(), max_length=16)
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
    histories = distill_mutual(student, teacher, tiny_tokenizer, toy_bundle(), spec=spec,
                               distill=DistillConfig(peers=3, teacher_lr=1e-3), train=tiny_train(max_steps=2),
                               max_length=16)
    assert [h.name for h in histories] == ["student", "teacher_after"]
    assert [name for name, *_ in calls[1:]] == ["teacher_after", "student", "student_2"] * 2
    assert not torch.equal(calls[0][3], calls[-1][3])  # the student passed in is the one that learned


def test_peer_terms_average_the_kl_to_every_other_peer_and_stop_gradients():
    torch.manual_seed(0)
    logits = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    feats = [Features(logits=z) for z in logits]
    labels = torch.tensor([0, 1, 2, 0, 1])
    spec = TermSpec({"kd": 1.0, "ce": 1.0}, pairs=[])
    terms = peer_terms(1, feats, labels, spec=spec, teacher_terms=spec, temperature=2.0)
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
        distill_mutual(student, teacher, tiny_tokenizer, toy_bundle(), spec=TermSpec({"hidden_mse": 1.0}, [(1, 2)]),
                       distill=DistillConfig(), train=tiny_train(), max_length=16)


def test_shipped_mutual_recipe():
    cfg = load_config("mutual")
    assert cfg.distill.strategy == "mutual" and cfg.data.dataset == "bbc-news"


def test_tiny_mutual_run_end_to_end(tmp_path, teacher_dir):
    cfg = toy_run_config(tmp_path, teacher_dir, "mutual")
    histories = check_run(run(cfg, tmp_path / "run"), teacher_dir, "mutual")
    assert [s["step"] for s in histories["teacher_after"]["steps"]] == [1, 2, 3, 4]
