"""A run is reproducible from its seed on one machine: two processes given the same recipe train the same model.

Exact equality is right here, unlike between batch shapes or machines: the same process shape, the same machine and
the same kernels do the same float operations in the same order, so any difference comes from a random draw that
the seed does not govern (e.g. a new classifier head initialised before the seed is set).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel

from kdistill.measure import quality_metrics
from tests.conftest import tiny_bert_config
from tests.helpers import finish, history, start_kdistill, write_recipe, write_toy_csv

# what the model computes, not how fast (timings change from run to run on any machine)
QUALITY_KEYS = {*quality_metrics([0, 1], [0, 1], ["a", "b"]), "params", "size_mb", "accuracy_retained_pct"}


def quality(run_dir) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {name: {k: m[k] for k in QUALITY_KEYS} for name, m in metrics["models"].items()}


@pytest.mark.slow  # two `kdistill run` processes
def test_two_processes_with_one_seed_make_the_same_run(tmp_path, tiny_tokenizer):
    # a pretrained encoder without a classification head, as most hub checkpoints are: the head is new in every run
    encoder = tmp_path / "encoder"
    BertModel(tiny_bert_config(tiny_tokenizer)).save_pretrained(encoder)
    tiny_tokenizer.save_pretrained(encoder)
    recipe = write_recipe(tmp_path / "seeded.yaml", {
        "name": "seeded",
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", n=60)), "max_length": 16},
        "teacher": {"model": str(encoder), "epochs": 1, "batch_size": 8, "lr": 1e-3},
        # a narrower student: pruned init and a learned projection, both drawn from the seed too
        "student": {"layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                    "init": "pruned"},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}},
        "train": {"seed": 7, "max_steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"repeats": 1, "warmup": 0},
    })
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [start_kdistill("run", recipe, "--out", out) for out in runs]
    for proc in procs:
        done = finish(proc)
        assert done.returncode == 0, done.stderr[-2000:]

    for name in ("teacher", "student", "baseline"):
        first, second = history(runs[0], name), history(runs[1], name)
        assert len(first["steps"]) >= 4, name
        assert first["steps"] == second["steps"], name  # every term of every step, bit for bit
        assert first["evals"] == second["evals"], name
        weights = [load_file(run / name / "model.safetensors") for run in runs]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name
    assert quality(runs[0]) == quality(runs[1])


TRAIN_WORDPIECE = """
import json
from kdistill.tokenization import train_wordpiece
from tests.conftest import make_toy_examples
texts = [r["text"] for r in make_toy_examples(200)]
print(json.dumps(train_wordpiece(texts, vocab_size=120).get_vocab(), sort_keys=True))
"""


def test_two_processes_train_the_same_wordpiece_vocabulary():
    """A from-scratch teacher's embedding row i belongs to token i: the same tokens under other ids, or other
    merges, train another model. (tokenizers numbers the '##' tokens in hash-map order, which changes from process
    to process, and breaks ties between merges by those numbers; the toy texts tie a lot.)"""
    root = Path(__file__).resolve().parents[1]
    vocabs = [subprocess.run([sys.executable, "-c", TRAIN_WORDPIECE], cwd=root, capture_output=True, text=True,
                             check=True).stdout for _ in range(2)]
    assert len(json.loads(vocabs[0])) > 60
    assert vocabs[0] == vocabs[1]
