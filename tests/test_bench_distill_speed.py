"""benchmarks/distill_speed.py: the three systems optimise the same loss, and its smoke mode runs end to end on a
tiny random teacher (TextBrewer only where it is installed; without it the system is reported as skipped)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from transformers import BertForSequenceClassification

from benchmarks.distill_speed import LOSSES, TEXTBREWER_MISSING, main, plain_loss
from kdistill.features import capture
from kdistill.terms import TermSpec, compute_terms, step_loss
from kdistill.training import batch_units
from tests.conftest import LABELS, make_toy_examples, tiny_bert_config

PAIRS = [(1, 1), (2, 4)]  # (student, teacher) hidden_states indices: the default recipe's 2 of 4 layers, [0, 3]


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(make_toy_examples(60, seed=3))
    return path


def run_smoke(capsys, teacher_dir, toy_csv, *extra: str) -> dict:
    line = main(["--teacher", str(teacher_dir), "--smoke", "--threads", "1", "--max-length", "16",
                 "--set", f"data.train_file={toy_csv}", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0]) == json.loads(json.dumps(line))
    return line


def tiny_models(tokenizer):
    """A 4-layer teacher and a 2-layer student, unrelated (a student copied from a random teacher's layers computes
    almost what the teacher does: every term would be near 0), without dropout so that two forwards agree."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(tokenizer, **no_dropout)).eval()
    student = BertForSequenceClassification(tiny_bert_config(tokenizer, num_hidden_layers=2, initializer_range=0.5,
                                                             **no_dropout))
    return teacher, student.train()


def toy_batch(tokenizer):
    rows = make_toy_examples(6, seed=5)
    batch = dict(tokenizer([r["text"] for r in rows], padding="max_length", max_length=16, return_tensors="pt"))
    batch["attention_mask"][0, 5:] = 0  # a padded row: the hidden term must ignore those positions
    return batch, torch.tensor([LABELS.index(r["label"]) for r in rows])


def student_grads(student, loss) -> torch.Tensor:
    student.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]).clone()


@pytest.mark.parametrize("losses", list(LOSSES))
def test_plain_loss_equals_kdistills(tiny_tokenizer, losses):
    teacher, student = tiny_models(tiny_tokenizer)
    batch, labels = toy_batch(tiny_tokenizer)
    with torch.no_grad():
        t = capture(teacher, batch, hidden_states=True)
    s = capture(student, batch, hidden_states=True)
    weights = LOSSES[losses]
    spec = TermSpec(dict(weights), PAIRS)
    units = batch_units(batch)
    logged = {}
    ours = step_loss(compute_terms(spec, s, t, labels, temperature=4.0, task="classification"), spec.active, units, units, 1,
                     logged, task="classification")
    plain = plain_loss(s, t, labels, batch["attention_mask"], weights=weights, temperature=4.0, pairs=PAIRS)
    assert all(logged[term] > 0.01 for term in weights)  # every term weighs in the comparison
    torch.testing.assert_close(plain, ours)


@pytest.mark.parametrize("losses", list(LOSSES))
def test_textbrewer_objective_has_the_plain_loss_gradient(tiny_tokenizer, tmp_path, losses):
    pytest.importorskip("textbrewer")
    from textbrewer.distiller_utils import post_adaptor

    from benchmarks.distill_speed import textbrewer_adaptor, textbrewer_distiller

    teacher, student = tiny_models(tiny_tokenizer)
    batch, labels = toy_batch(tiny_tokenizer)
    weights = LOSSES[losses]
    with torch.no_grad():
        t = teacher(**batch, labels=labels, output_hidden_states=True)
    s = student(**batch, output_hidden_states=True)
    expected = student_grads(student, plain_loss(s, t, labels, batch["attention_mask"], weights=weights,
                                                 temperature=4.0, pairs=PAIRS))
    distiller = textbrewer_distiller(student, teacher, weights=weights, temperature=4.0, pairs=PAIRS, device="cpu",
                                     output_dir=str(tmp_path))
    s = student(**batch, labels=labels, output_hidden_states=True)
    loss, _ = distiller.compute_loss(post_adaptor(textbrewer_adaptor(batch, s)),
                                     post_adaptor(textbrewer_adaptor(batch, t)))
    torch.testing.assert_close(student_grads(student, loss), expected)


@pytest.mark.parametrize("losses", list(LOSSES))
def test_smoke_kdistill_and_plain(capsys, teacher_dir, toy_csv, losses):
    line = run_smoke(capsys, teacher_dir, toy_csv, "--losses", losses, "--systems", "kdistill", "plain")
    assert line["smoke"] and line["loss_weights"] == LOSSES[losses]
    assert line["layer_pairs"] == [list(p) for p in PAIRS]
    assert line["n_train"] == 32 and line["epochs"] == 0.5 and line["steps"] == 1
    assert set(line["systems"]) == {"kdistill", "plain"}
    for result in line["systems"].values():
        assert result["steps"] == line["steps"]
        assert result["samples_per_s"] == pytest.approx(line["n_train"] * line["epochs"] / result["wall_time_s"])
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["macro_f1"] <= 1.0
    ratio = line["systems"]["kdistill"]["samples_per_s"] / line["systems"]["plain"]["samples_per_s"]
    assert line["speedup_samples_per_s"] == {"kdistill_vs_plain": pytest.approx(ratio),
                                             "kdistill_vs_textbrewer": None}
    plain = line["systems"]["plain"]
    assert 0.0 < plain["teacher_forward_s"] < plain["wall_time_s"]
    assert line["teacher_caching_ceiling_vs_plain"] == pytest.approx(
        plain["wall_time_s"] / (plain["wall_time_s"] - plain["teacher_forward_s"]))


def test_smoke_kdistill_bf16_is_kdistill_under_bf16_autocast(capsys, teacher_dir, toy_csv, monkeypatch):
    from kdistill import pipeline

    precisions = []
    original = pipeline.distill_student
    monkeypatch.setattr(pipeline, "distill_student",
                        lambda cfg, *a, **k: precisions.append(cfg.train.mixed_precision) or original(cfg, *a, **k))
    line = run_smoke(capsys, teacher_dir, toy_csv, "--systems", "kdistill-bf16", "plain")
    assert precisions == ["bf16"] and line["systems"]["kdistill-bf16"]["steps"] == line["steps"]
    ratio = line["systems"]["kdistill-bf16"]["samples_per_s"] / line["systems"]["plain"]["samples_per_s"]
    assert line["speedup_samples_per_s"]["kdistill_bf16_vs_plain"] == pytest.approx(ratio)
    assert line["speedup_samples_per_s"]["kdistill_vs_plain"] is None


def test_textbrewer_missing_is_reported_as_skipped(capsys, teacher_dir, toy_csv, monkeypatch):
    monkeypatch.setitem(sys.modules, "textbrewer", None)  # `import textbrewer` raises ImportError
    line = run_smoke(capsys, teacher_dir, toy_csv, "--systems", "textbrewer")
    assert line["systems"]["textbrewer"]["skipped"].startswith(TEXTBREWER_MISSING)


def test_smoke_textbrewer(capsys, teacher_dir, toy_csv):
    pytest.importorskip("textbrewer")
    line = run_smoke(capsys, teacher_dir, toy_csv, "--losses", "logits+hidden", "--systems", "textbrewer")
    result = line["systems"]["textbrewer"]
    assert result["steps"] == line["steps"] and result["samples_per_s"] > 0 and 0.0 <= result["accuracy"] <= 1.0


def test_only_data_overrides(capsys, teacher_dir, toy_csv):
    with pytest.raises(SystemExit) as exit_info:
        main(["--teacher", str(teacher_dir), "--smoke", "--set", f"data.train_file={toy_csv}",
              "--set", "train.lr=0.1"])
    assert exit_info.value.code == 2
    assert "--set train.lr=0.1: only data.* keys apply here" in capsys.readouterr().err
