"""Helpers shared by several test modules: toy data, tiny models, recipes, kdistill subprocesses, run outputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, BertModel

from kdistill.config import TrainConfig, load_config
from kdistill.data import DataBundle, tokenize_splits
from kdistill.strategies.causal import lm_terms
from kdistill.engine import backward_group
from kdistill.models import save_sentence_encoder
from kdistill.student import build_student
from kdistill.terms import TermSpec
from kdistill.training import History, make_accelerator
from tests.conftest import LABELS, make_toy_examples, tiny_bert_config, tiny_gpt2

SPEC_WEIGHTS = {"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}


# ------------------------------------------------------------------------------------- toy data, tiny models

def toy_bundle(n_train: int = 48) -> DataBundle:
    def split(n, seed):
        rows = make_toy_examples(n, seed)
        return Dataset.from_dict({"text": [r["text"] for r in rows], "label": [LABELS.index(r["label"]) for r in rows]})

    return DataBundle(DatasetDict(train=split(n_train, 0), validation=split(12, 1), test=split(12, 2)), LABELS, "toy")


def toy_encoded(tokenizer, n_train: int = 48, max_length: int = 16) -> DatasetDict:
    """The toy splits tokenized, as the pipeline hands them to the training loops."""
    return tokenize_splits(toy_bundle(n_train), tokenizer, max_length)


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
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])  # on CPU: comparable across devices


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


# ------------------------------------------------------------------------------ teacher dirs, recipes, runs

def save_teacher_dir(path, tokenizer, **config):
    """A random 4-layer teacher dir whose label ids follow the data's (sorted) label names, as teacher.path needs,
    with `config` changed in its config.json."""
    names = sorted(LABELS)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(tokenizer, id2label=dict(enumerate(names)),
                                                           label2id={n: i for i, n in enumerate(names)}))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if config:
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        (path / "config.json").write_text(json.dumps({**saved, **config}), encoding="utf-8")
    return path


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


def start_kdistill(*args, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **popen.pop("env", {})}  # tiny models: one thread beats two
    return subprocess.Popen([sys.executable, "-m", "kdistill.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------------- files

def write_csv(path, rows, fields=("text", "label"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields, delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_toy_csv(path, n: int = 90, seed: int = 1):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(make_toy_examples(n, seed=seed))
    return path


def scratch_teacher_recipe(tmp_path, tokenizer, data: dict, **sections) -> Path:
    """tmp_path/toy.yaml: a tiny run whose teacher is a 2-layer BERT trained from scratch over `tokenizer`'s vocab
    (1 epoch), a 1-layer student, kd + ce with the no-KD baseline, 2 steps; `data` and the other `sections` as
    given."""
    return write_recipe(tmp_path / "toy.yaml", {
        **sections,
        "data": data,
        "teacher": {"epochs": 1, "batch_size": 8,
                    "from_scratch": {"tokenizer": str(write_vocab(tmp_path / "vocab.txt", tokenizer)),
                                     "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                     "intermediate_size": 64}},
        "student": {"layers": 1},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5}, "baseline": True},
        "train": {"max_steps": 2, "batch_size": 8},
        "eval": {"repeats": 1, "warmup": 0},
    })


def write_vocab(path, tokenizer):
    """The tokenizer's vocab.txt: a from-scratch teacher over a given vocab is the same in every process (a WordPiece
    trained in the run is not: the tokenizers trainer breaks ties differently from one process to the next)."""
    vocab = tokenizer.get_vocab()
    path.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    return path


def write_recipe(path, recipe: dict):
    path.write_text("# kdistill run " + path.name + "\n" + yaml.safe_dump(recipe), encoding="utf-8")
    return path


def write_lm_recipe(tmp_path: Path, teacher, tokenizer, docs: list[str], *, name: str, block_size: int,
                    **sections) -> Path:
    """A tiny causal-LM run's recipe at tmp_path/lm.yaml: `teacher` and `tokenizer` saved to tmp_path/teacher,
    `docs` as the JSON-lines corpus tmp_path/news.jsonl (20% test, 10% validation), and the other `sections`
    (student, distill, train, eval) as given."""
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    corpus = tmp_path / "news.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    return write_recipe(tmp_path / "lm.yaml", {
        "name": name, "task": "causal-lm",
        "data": {"train_file": str(corpus), "block_size": block_size, "test_fraction": 0.2,
                 "validation_fraction": 0.1},
        "teacher": {"model": str(teacher_dir)}, **sections})


# ------------------------------------------------------------------------------------------------ run output

def given_teacher_recipe(root, tokenizer, losses: dict[str, float]):
    """A recipe over in seconds: a given 4-layer tiny teacher (hidden 32, 4 heads, 64 positions), 45 toy rows at 16
    tokens, a 2-layer student, 2 steps, no baseline."""
    return write_recipe(root / "toy.yaml", {
        "name": "toy",
        "data": {"train_file": str(write_toy_csv(root / "toy.csv", 45)), "max_length": 16},
        "teacher": {"path": str(save_teacher_dir(root / "teacher", tokenizer))},
        "student": {"layers": 2},
        "distill": {"losses": losses, "baseline": False},
        "train": {"max_steps": 2, "batch_size": 8},
        "eval": {"repeats": 1, "warmup": 0},
    })


def history(run_dir, name: str) -> dict:
    return json.loads((run_dir / "logs" / f"history_{name}.json").read_text(encoding="utf-8"))


def accuracies(run_dir) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {name: m["accuracy"] for name, m in metrics["models"].items()}


def assert_same_steps(a: list[dict], b: list[dict], rel: float, abs: float = 1e-7):
    assert [s["step"] for s in a] == [s["step"] for s in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=rel, abs=abs), (x["step"], key)


# ------------------------------------------------------------------------------------- sentence encoders

def tiny_encoder_dir(path, tokenizer, pooling, seed: int = 0, **config):
    """A random tiny BERT encoder (`features.Pooling` `pooling`) saved as a sentence-transformers dir (Transformer,
    Pooling[, Normalize]), as task embedding's teacher and student dirs are."""
    torch.manual_seed(seed)
    model = BertModel(tiny_bert_config(tokenizer, **config), add_pooling_layer=False)
    return save_sentence_encoder(model, tokenizer, path, {"task": "embedding", "role": "teacher"}, pooling, 32)


# ------------------------------------------------------------------------------------------------ causal LM

def tiny_lm_recipe(root, tokenizer, docs, *, losses: dict[str, float], train: dict):
    """A causal-LM recipe over a saved tiny GPT-2 teacher (tests.conftest.tiny_gpt2) and `docs` as a JSONL corpus,
    blocks of 16 tokens, a 2-layer student."""
    teacher_dir = root / "teacher"
    tiny_gpt2(tokenizer).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    corpus = root / "news.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    return write_recipe(root / "lm.yaml", {
        "task": "causal-lm", "data": {"train_file": str(corpus), "block_size": 16},
        "teacher": {"model": str(teacher_dir)}, "student": {"layers": 2},
        "distill": {"losses": losses}, "train": train,
        "eval": {"repeats": 1, "warmup": 0, "throughput_batch_size": 2},
    })


def accumulate_step(student, teacher, group, *, spec, temperature, accelerator, cache=None):
    """One optimizer step's forwards and backwards through the engine (no optimizer step); each term's step mean."""
    logged = dict.fromkeys(spec.active, 0.0)
    backward_group(accelerator, group, lambda batch: [(lm_terms(student, teacher, batch, task="causal-lm", spec=spec,
                                                                temperature=temperature, accelerator=accelerator,
                                                                cache=cache), spec.active)],
                   [logged], task="causal-lm")
    return logged


def assert_halves_match_one_batch(new_student, teacher, big: dict, halves: list[dict], *, spec, cache=None):
    """The step means and gradients of one causal-LM batch and of the same rows as two micro-batches agree.

    new_student(): the same float64 student each time, so the forwards agree to ~1e-15 on any CPU; the losses still
    reduce in float32: summing n positive terms in float32 is exact to (n - 1) * eps relative, which bounds what the
    two paths may differ by; a wrong normalisation (a factor of the counts) is orders of magnitude above it."""
    accelerator = make_accelerator(TrainConfig())
    results = []
    for group in ([big], halves):
        student = new_student()
        logged = accumulate_step(student, teacher, group, spec=spec, temperature=2.0, accelerator=accelerator,
                                 cache=cache)
        results.append((logged, [p.grad.clone() for p in student.parameters()]))
    (one, g_one), (two, g_two) = results
    rel = int(big["valid"].sum()) * torch.finfo(torch.float32).eps
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=rel)
    for a, b in zip(g_one, g_two):
        torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))
