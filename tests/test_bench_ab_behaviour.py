"""benchmarks/ab_behaviour.py: the comparison of two recordings (exact; timing, machine and path keys ignored) and
the recipe table (one entry per shipped recipe). Nothing is run: the recordings are written here."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks.ab_behaviour import OVERRIDES, compare_recipe, ignored_key, main, shipped_recipes, strip

REPO = Path(__file__).resolve().parents[1]


def recording() -> dict:
    step = {"step": 1, "loss": 0.5, "kd": 0.25, "ce": 1.25}
    return {
        "tiny": {
            "overrides": ["data.limit=64", "train.max_steps=6"],
            "steps": {"student": [step, {**step, "step": 2, "loss": 0.4375}]},
            "validation": {"student": [{"step": 2, "accuracy": 0.75, "loss": 1.0}]},
            "tensorboard": {"student": {"train/loss": [[1, 0.5], [2, 0.4375]]}},
            "metrics": {"models": {"student": {"accuracy": 0.75, "params": 1000, "size_mb": 3.5,
                                               "train_wall_time_s": 1.5, "latency_ms_batch1": 4.0,
                                               "throughput_per_s": 500.0, "threads": 2}},
                        "machine": {"cpu": "x86_64"}, "total_wall_time_s": 30.0},
            "weights": {"student/model.safetensors": "ab12"},
            "wall_s": 60.0,
        },
        "lm": {"overrides": [], "steps": {"student": [{"step": 1, "loss": 3.0, "forward_kl": 1.0, "lm": 2.0}]},
               "validation": {}, "tensorboard": {}, "metrics": {"samples": {"student": [{"completion": "a b"}]}},
               "weights": {}, "wall_s": 120.0},
    }


def run_compare(tmp_path, before: dict, after: dict, capsys) -> tuple[int, list[dict]]:
    (tmp_path / "before.json").write_text(json.dumps(before))
    (tmp_path / "after.json").write_text(json.dumps(after))
    code = main(["compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def by_recipe(lines: list[dict]) -> dict:
    return {line["recipe"]: line for line in lines if "recipe" in line}


def test_identical_recordings_exit_0(tmp_path, capsys):
    code, lines = run_compare(tmp_path, recording(), recording(), capsys)
    assert code == 0
    assert all(line["identical"] and line["max_abs_diff"] == 0 for line in by_recipe(lines).values())
    assert lines[-1] == {"identical": True, "recipes": 2, "differing": []}


def test_one_step_loss_differs_exit_1_naming_recipe_and_key(tmp_path, capsys):
    after = recording()
    after["tiny"]["steps"]["student"][1]["kd"] = 0.25 + 2 ** -40  # the last bits of one term of one step
    code, lines = run_compare(tmp_path, recording(), after, capsys)
    assert code == 1
    tiny = by_recipe(lines)["tiny"]
    assert not tiny["identical"] and tiny["differences"] == 1
    assert tiny["first"] == [{"key": "steps/student/1/kd", "before": 0.25, "after": 0.25 + 2 ** -40}]
    assert tiny["max_abs_diff"] == pytest.approx(2 ** -40)
    assert by_recipe(lines)["lm"]["identical"]
    assert lines[-1]["differing"] == ["tiny"]


def test_timing_machine_and_path_keys_are_ignored(tmp_path, capsys):
    after = recording()
    student = after["tiny"]["metrics"]["models"]["student"]
    student.update(train_wall_time_s=9.0, latency_ms_batch1=1.0, throughput_per_s=9000.0, threads=1)
    after["tiny"]["metrics"]["machine"] = {"cpu": "arm64"}
    after["tiny"]["metrics"]["total_wall_time_s"] = 1.0
    after["tiny"]["wall_s"] = 1.0
    code, lines = run_compare(tmp_path, recording(), after, capsys)
    assert code == 0, lines


@pytest.mark.parametrize("key", ["train_wall_time_s", "total_wall_time_s", "wall_time_s", "latency_ms_batch1",
                                 "throughput_per_s", "generate_tokens_per_s", "ms_per_token_batch1",
                                 "speedup_vs_teacher", "threads", "eval_threads", "machine", "path", "seconds",
                                 "torch_version", "date", "wall_s", "throughput_batch_size"])
def test_ignored_keys(key):
    assert ignored_key(key)


@pytest.mark.parametrize("key", ["loss", "kd", "hidden_mse", "temperature", "accuracy", "perplexity", "params",
                                 "size_mb", "size_ratio_vs_teacher", "param_ratio", "n_test", "sizes", "step",
                                 "block_params", "score_batch_size", "source_file_mb", "completion", "updates"])
def test_kept_keys(key):
    assert not ignored_key(key)


def test_label_names_are_never_dropped():
    metrics = {"per_class": {"comp.os.ms-windows.misc": {"precision": 0.5}, "time": {"recall": 0.25}},
               "per_type": {"S": {"f1": 0.125, "threads": 1}}}
    kept = {"per_class": {"comp.os.ms-windows.misc": {"precision": 0.5}, "time": {"recall": 0.25}},
            "per_type": {"S": {"f1": 0.125}}}
    assert strip(metrics) == kept
    before, after = {"metrics": metrics}, copy.deepcopy({"metrics": metrics})
    after["metrics"]["per_class"]["comp.os.ms-windows.misc"]["precision"] = 0.75
    assert compare_recipe(before, after)["first"][0]["key"] == "metrics/per_class/comp.os.ms-windows.misc/precision"


def test_strip_drops_ignored_keys_at_every_depth_and_replaces_paths():
    value = {"a": {"latency_ms_batch1": 1.0, "b": [{"threads": 1, "c": "/tmp/run/x"}]}, "seconds": 2}
    assert strip(value, {"/tmp/run": "<run>"}) == {"a": {"b": [{"c": "<run>/x"}]}}


def test_a_missing_or_failed_recipe_is_a_difference(tmp_path, capsys):
    after = recording()
    del after["lm"]
    after["tiny"] = {"overrides": [], "error": "exit 1: out of memory", "wall_s": 1.0}
    code, lines = run_compare(tmp_path, recording(), after, capsys)
    assert code == 1
    assert by_recipe(lines)["lm"]["problem"] == "missing in after"
    assert by_recipe(lines)["tiny"]["after"] == "exit 1: out of memory"


def test_a_missing_or_extra_key_and_a_changed_string_are_differences():
    before, after = recording()["lm"], recording()["lm"]
    after["steps"]["student"][0]["reverse_kl"] = 0.5
    after["metrics"]["samples"]["student"][0]["completion"] = "a c"
    result = compare_recipe(before, after)
    assert not result["identical"]
    assert {d["key"] for d in result["first"]} == {"steps/student/0/reverse_kl",
                                                    "metrics/samples/student/0/completion"}


def test_numbers_compare_exactly_but_int_and_float_of_one_value_agree():
    before, after = recording()["lm"], recording()["lm"]
    after["steps"]["student"][0]["loss"] = 3  # JSON 3 vs 3.0: the same number
    assert compare_recipe(before, after)["identical"]
    after["steps"]["student"][0]["loss"] = True  # a bool is not the number 1
    before["steps"]["student"][0]["loss"] = 1
    assert not compare_recipe(before, after)["identical"]


def test_every_shipped_recipe_has_overrides():
    assert set(shipped_recipes(REPO)) == set(OVERRIDES)


def test_a_recipe_without_overrides_stops_the_recording(tmp_path, monkeypatch):
    src = tmp_path / "checkout"
    (src / "kdistill" / "recipes").mkdir(parents=True)
    for name in [*OVERRIDES, "brand-new"]:
        (src / "kdistill" / "recipes" / f"{name}.yaml").write_text(f"name: {name}\n")
    with pytest.raises(SystemExit, match="brand-new"):
        main(["record", "--src", str(src), "--out", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_compare_does_not_change_its_inputs():
    before, after = recording()["tiny"], recording()["tiny"]
    kept = copy.deepcopy(before)
    compare_recipe(before, after)
    assert before == kept
