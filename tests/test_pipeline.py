"""The pipeline's stages share their inputs: each split is tokenized once per tokenizer per run."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

import kdistill.data.encodings
import kdistill.pipeline
import kdistill.pipeline.distillation
import kdistill.teacher
from kdistill.config import load_config
from kdistill.data import tokenizer_key
from kdistill.errors import ConfigError
from kdistill.pipeline import run
from kdistill.terms import split_stages
from tests.helpers import history, scratch_teacher_recipe, toy_run_config, write_recipe, write_toy_csv


@pytest.mark.parametrize("augment", [False, True])
def test_each_split_is_tokenized_once_per_tokenizer(augment, monkeypatch, tmp_path, tiny_tokenizer):
    """A from-scratch teacher (fine-tuned), its student, the no-KD baseline and the evaluation of all three read the
    same splits through one tokenizer: train, validation and test are tokenized once each. With augmentation the
    student's training split is another one (the transfer rows added), tokenized once more, and only that one."""
    encoded = Counter()
    original = kdistill.data.encodings.encode_split

    def counting(split, tokenizer, max_length):
        encoded[tokenizer_key(tokenizer), split._fingerprint, len(split)] += 1
        return original(split, tokenizer, max_length)

    monkeypatch.setattr(kdistill.data.encodings, "encode_split", counting)
    recipe = scratch_teacher_recipe(tmp_path, tiny_tokenizer, {
        "train_file": str(write_toy_csv(tmp_path / "toy.csv", 60)), "max_length": 16,
        **({"augment": {"multiplier": 1}} if augment else {})})
    run_dir = run(load_config(recipe), tmp_path / "run")

    assert (run_dir / "baseline" / "model.safetensors").is_file()
    assert set(encoded.values()) == {1}, encoded  # nothing tokenized twice
    assert len({key for key, _, _ in encoded}) == 1  # one tokenizer: the teacher's, which the student shares
    assert len(encoded) == 3 + augment  # train, validation, test (+ the student's train with the transfer rows)


def test_two_stage_distillation_learns_the_intermediate_terms_first_then_the_predictions(tmp_path, teacher_dir,
                                                                                       monkeypatch):
    cfg = toy_run_config(tmp_path, teacher_dir, "explicit", intermediate_epochs=1)  # kd, ce and hidden_mse
    starts = []  # (stage, the student's weights as it starts)
    distill_explicit = kdistill.pipeline.distillation.distill_explicit

    def spy(phase, **kwargs):
        starts.append((phase.name, {k: v.clone() for k, v in phase.student.state_dict().items()}))
        return distill_explicit(phase, **kwargs)

    monkeypatch.setattr(kdistill.pipeline.distillation, "distill_explicit", spy)
    run_dir = run(cfg, tmp_path / "run")

    assert [name for name, _ in starts] == ["student-intermediate", "student"]
    first, second = history(run_dir, "student-intermediate"), history(run_dir, "student")
    assert first["steps"] and all("hidden_mse" in s and "kd" not in s and "ce" not in s for s in first["steps"])
    assert second["steps"] and all("kd" in s and "ce" in s and "hidden_mse" not in s for s in second["steps"])
    (_, init), (_, after_first) = starts
    # the first stage trains the layers the hidden term reads, and leaves the classifier head, which no
    # intermediate term reaches, exactly as it was
    head = [k for k in init if k.startswith("classifier.")]
    assert head and all(torch.equal(init[k], after_first[k]) for k in head)
    assert not torch.equal(init["bert.encoder.layer.0.output.dense.weight"],
                           after_first["bert.encoder.layer.0.output.dense.weight"])
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["models"]["student"]["train_wall_time_s"] >= first["wall_time_s"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["distill.losses={kd: 1.0, ce: 0.5}"], "needs an intermediate term"),
    (["distill.losses={hidden_mse: 1.0}"], "needs an intermediate term (e.g. hidden_mse, attention_kl) and a "
                                           "prediction term"),
    (["distill.strategy=mutual"], "works with strategy explicit"),
])
def test_two_stage_distillation_without_two_stages_is_refused_naming_the_key(tmp_path, overrides, message):
    recipe = write_recipe(tmp_path / "r.yaml", {"distill": {"intermediate_epochs": 1,
                                                            "losses": {"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}}})
    with pytest.raises(ConfigError, match=r"distill\.intermediate_epochs: .*" + re.escape(message)):
        load_config(recipe, overrides)


def test_split_stages_puts_every_term_reading_teacher_internals_first():
    intermediate, prediction = split_stages({"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0, "attention_kl": 2.0,
                                             "embedding_mse": 1.0, "cls_pkd": 1.0, "minilm_vv": 1.0,
                                             "hidden_cosine": 0.0})
    assert intermediate == {"hidden_mse": 1.0, "attention_kl": 2.0, "embedding_mse": 1.0, "cls_pkd": 1.0,
                            "minilm_vv": 1.0}
    assert prediction == {"kd": 1.0, "ce": 0.5}


def test_a_teacher_trained_in_the_run_steps_over_the_labeled_rows_only(tmp_path, tiny_bert_dir, monkeypatch):
    write_toy_csv(tmp_path / "toy.csv")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "data": {"train_file": str(tmp_path / "toy.csv"), "max_length": 16, "labeled_limit": 10},
        "teacher": {"model": str(tiny_bert_dir), "epochs": 1, "batch_size": 4},
        "eval": {"repeats": 1, "warmup": 0}})
    seen = []
    finetune = kdistill.teacher.finetune

    def spy(model, tokenizer, encoded, train, **kwargs):
        seen.append(list(encoded["train"]["labels"]))
        return finetune(model, tokenizer, encoded, train, **kwargs)

    monkeypatch.setattr(kdistill.teacher, "finetune", spy)
    kdistill.pipeline.teacher_run(load_config(recipe, []), tmp_path / "run")
    labels, = seen
    assert len(labels) == 10 and kdistill.data.UNLABELED not in labels
    steps = history(tmp_path / "run", "teacher")["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]  # one epoch over 10 rows in batches of 4, not over all rows
