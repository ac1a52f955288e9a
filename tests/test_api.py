"""The Python API: `import kdistill` gives the command's verbs, with its arguments, and the config types, loaded on
first use; a verb raises kdistill.UserError where the command exits with code 2."""

import inspect
import json
import subprocess
import sys

import pytest

import kdistill
from kdistill import cli
from tests.conftest import LABELS
from tests.helpers import save_teacher_dir, write_toy_csv

TINY_WIDTH = ["student.hidden_size=16", "student.num_attention_heads=2", "student.intermediate_size=32"]
"""The tiny recipe's pruned student, scaled to the test teacher (hidden 32, 4 heads of 8, feed-forward 64)."""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer):
    """`kdistill.run("tiny", ...)` on toy data with a given tiny teacher, two steps: (toy csv, run dir)."""
    root = tmp_path_factory.mktemp("api")
    data = write_toy_csv(root / "toy.csv", 60)
    teacher = save_teacher_dir(root / "teacher", tiny_tokenizer)
    run_dir = kdistill.run("tiny", set=[f"data.train_file={data}", "data.max_length=16", f"teacher.path={teacher}",
                                        *TINY_WIDTH, "train.max_steps=2", "train.batch_size=8",
                                        "distill.baseline=false", "eval.repeats=1", "eval.warmup=0"],
                           out=root / "run")
    return data, run_dir


def test_a_whole_run_from_python(tiny_run):
    _, run_dir = tiny_run
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["run"] == "tiny" and metrics["task"] == "classification" and metrics["strategy"] == "explicit"
    assert set(metrics["models"]) == {"teacher", "student"}
    student = metrics["models"]["student"]
    for key in ("accuracy", "macro_f1", "params", "size_mb", "latency_ms_batch1", "throughput_per_s",
                "train_wall_time_s", "confusion_matrix", "speedup_vs_teacher", "accuracy_retained_pct"):
        assert key in student, key
    assert 0.0 <= student["accuracy"] <= 1.0
    assert student["params"] < metrics["models"]["teacher"]["params"]  # pruned to width 16 of 32
    config = kdistill.load_config(run_dir / "config.yaml")
    assert isinstance(config, kdistill.RunConfig) and isinstance(config.student, kdistill.StudentConfig)
    assert (config.student.hidden_size, config.student.init, config.train.max_steps) == (16, "pruned", 2)


def test_evaluate_and_predict_the_student_from_python(tiny_run, tmp_path):
    data, run_dir = tiny_run
    metrics = kdistill.evaluate(run_dir / "student", data=str(data), set=["data.max_length=16"],
                                out=tmp_path / "m.json")
    run_metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["models"]["student"]
    assert metrics["accuracy"] == pytest.approx(run_metrics["accuracy"])  # same split, same model
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["accuracy"] == metrics["accuracy"]
    preds = kdistill.predict(run_dir / "student", ["goal match team today", "vote law minister"])
    assert len(preds) == 2
    for p in preds:
        assert p["label_name"] in LABELS and sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["label_name"] == max(p["probabilities"], key=p["probabilities"].get)


def test_a_verb_raises_user_error_instead_of_exiting(tiny_run):
    _, run_dir = tiny_run
    with pytest.raises(kdistill.UserError, match="give TEXT arguments or --file"):
        kdistill.predict(run_dir / "student")
    with pytest.raises(kdistill.UserError, match="recipe not found: nosuchrecipe"):
        kdistill.validate("nosuchrecipe")
    with pytest.raises(kdistill.UserError, match="unknown key 'train.epochz'"):
        kdistill.load_config("tiny", ["train.epochz=1"])


def test_the_verbs_are_the_commands_functions():
    assert set(kdistill.__all__) >= {*kdistill.VERBS, *kdistill.CONFIG_TYPES, "UserError"}
    assert set(dir(kdistill)) >= set(kdistill.__all__)
    for name in kdistill.VERBS:
        verb = getattr(kdistill, name)
        assert callable(verb) and inspect.signature(verb) == inspect.signature(getattr(cli, name)), name
    assert kdistill.run is cli.run and kdistill.train_teacher is cli.train_teacher
    assert "default" in kdistill.recipes()


def test_the_verbs_stay_verbs_once_every_module_is_imported():
    """No module of the package is named like a verb: importing them all leaves kdistill.evaluate, .report and
    .distill the functions."""
    import kdistill.measure  # noqa: F401
    import kdistill.reporting  # noqa: F401
    import kdistill.strategies.explicit  # noqa: F401

    for name in ("evaluate", "report", "distill"):
        assert getattr(kdistill, name) is getattr(cli, name), name
    with pytest.raises(kdistill.UserError, match="no metrics.json"):
        kdistill.report([kdistill.strategies.explicit.__file__])  # a file, not a run dir: the verb ran


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'kdistill' has no attribute 'nope'"):
        kdistill.nope  # noqa: B018
    assert not hasattr(kdistill, "Run")
    with pytest.raises(ImportError):
        from kdistill import nope  # noqa: F401


def test_import_kdistill_loads_neither_torch_nor_transformers():
    result = subprocess.run([sys.executable, "-c", "import kdistill, sys; print('torch' in sys.modules, "
                                                   "'transformers' in sys.modules, kdistill.__all__[0])"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "run"]
