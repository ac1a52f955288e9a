"""The pipeline's stages share their inputs: each split is tokenized once per tokenizer per run."""

from __future__ import annotations

from collections import Counter

import pytest

import kdistill.data
from kdistill.config import load_config
from kdistill.data import tokenizer_key
from kdistill.pipeline import run
from tests.helpers import write_recipe, write_toy_csv, write_vocab


@pytest.mark.parametrize("augment", [False, True])
def test_each_split_is_tokenized_once_per_tokenizer(augment, monkeypatch, tmp_path, tiny_tokenizer):
    """A from-scratch teacher (fine-tuned), its student, the no-KD baseline and the evaluation of all three read the
    same splits through one tokenizer: train, validation and test are tokenized once each. With augmentation the
    student's training split is another one (the transfer rows added), tokenized once more, and only that one."""
    encoded = Counter()
    original = kdistill.data.encode_split

    def counting(split, tokenizer, max_length):
        encoded[tokenizer_key(tokenizer), split._fingerprint, len(split)] += 1
        return original(split, tokenizer, max_length)

    monkeypatch.setattr(kdistill.data, "encode_split", counting)
    recipe = write_recipe(tmp_path / "toy.yaml", {
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 60)), "max_length": 16,
                 **({"augment": {"multiplier": 1}} if augment else {})},
        "teacher": {"epochs": 1, "batch_size": 8,
                    "from_scratch": {"tokenizer": str(write_vocab(tmp_path / "vocab.txt", tiny_tokenizer)),
                                     "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "intermediate_size": 64}},
        "student": {"layers": 1},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5}, "baseline": True},
        "train": {"max_steps": 2, "batch_size": 8},
        "eval": {"repeats": 1, "warmup": 0},
    })
    run_dir = run(load_config(recipe), tmp_path / "run")

    assert (run_dir / "baseline" / "model.safetensors").is_file()
    assert set(encoded.values()) == {1}, encoded  # nothing tokenized twice
    assert len({key for key, _, _ in encoded}) == 1  # one tokenizer: the teacher's, which the student shares
    assert len(encoded) == 3 + augment  # train, validation, test (+ the student's train with the transfer rows)
