"""The run dir: a run never overwrites or deletes files it did not create. A non-empty --out is refused unless
--overwrite (which replaces kdistill's outputs only), names are plain names, and bad input leaves no run dir."""

from __future__ import annotations

import json
import shutil

import pytest

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import ConfigError, UserError
from tests.helpers import given_teacher_recipe


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_tokenizer):
    return given_teacher_recipe(tmp_path_factory.mktemp("rundir"), tiny_tokenizer, {"kd": 1.0, "ce": 0.5})


def kdistill_main(capsys, *args) -> tuple[int, str]:
    """(exit code, last stderr line) of the CLI run in this process."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
        raise SystemExit(0)
    lines = capsys.readouterr().err.strip().splitlines()
    return exited.value.code, lines[-1] if lines else ""


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(recipe, tmp_path_factory):
    from kdistill.pipeline import run

    return run(load_config(recipe), tmp_path_factory.mktemp("finished") / "run")


def test_a_non_empty_out_dir_that_is_not_a_run_is_refused_and_untouched(recipe, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "teacher").mkdir(parents=True)
    (out / "config.yaml").write_text("my own notes\n")
    (out / "teacher" / "weights.bin").write_bytes(b"\x00" * 10)
    before = snapshot(out)
    code, last = kdistill_main(capsys, "run", recipe, "--out", out)
    assert code == 2
    assert last.startswith(f"kdistill: --out {out}: ") and "--overwrite" in last
    assert snapshot(out) == before


@pytest.mark.parametrize("verb", ["run", "train-teacher"])
def test_a_finished_run_dir_is_refused_without_overwrite(finished_run, recipe, verb, capsys):
    before = snapshot(finished_run)
    code, last = kdistill_main(capsys, verb, recipe, "--out", finished_run)
    assert code == 2
    assert f"--out {finished_run}: " in last and "--overwrite" in last and "--resume" in last
    assert snapshot(finished_run) == before  # metrics.json and report.md above all


def test_overwrite_replaces_kdistill_outputs_and_keeps_other_files(finished_run, recipe, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(finished_run, out)
    (out / "checkpoints" / "student" / "step-0000001").mkdir(parents=True)  # stale: an older run's
    (out / "baseline").mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _ = kdistill_main(capsys, "run", recipe, "--out", out, "--overwrite")
    assert code == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "checkpoints").exists() and not (out / "baseline").exists()
    assert set(json.loads((out / "metrics.json").read_text())["models"]) == {"teacher", "student"}


def test_overwrite_never_removes_an_input_of_the_run(finished_run, recipe, tmp_path, capsys):
    code, last = kdistill_main(capsys, "distill", recipe, "--teacher", finished_run / "student", "--out",
                               finished_run, "--overwrite")
    assert code == 2
    assert "teacher.path" in last and "--overwrite" in last
    assert (finished_run / "student" / "model.safetensors").is_file()


def test_overwrite_and_resume_together_are_refused(finished_run, capsys):
    code, last = kdistill_main(capsys, "run", "--resume", finished_run, "--overwrite")
    assert code == 2 and "--overwrite" in last and "--resume" in last


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "", ".hidden", "..", "/abs"])
def test_the_run_name_is_a_plain_name(name):
    with pytest.raises(ConfigError, match=r"name: .*plain name"):
        load_config("default", [f"name={json.dumps(name)}"])


@pytest.mark.parametrize("key, value, message", [
    ("teacher.model", "{missing}", "teacher.model: "),
    ("teacher.from_scratch", "{{tokenizer: {missing}/vocab.txt, hidden_size: 32, num_attention_heads: 4}}",
     "teacher.from_scratch.tokenizer: "),
])
def test_a_missing_teacher_or_vocab_exits_2_and_leaves_no_run_dir(recipe, tmp_path, capsys, key, value, message):
    value = value.format(missing=tmp_path / "missing")
    out = tmp_path / "runs" / "r"
    code, last = kdistill_main(capsys, "run", recipe, "--set", "teacher.path=null", "--set", f"{key}={value}",
                               "--out", out)
    assert code == 2, last
    assert last.startswith(f"kdistill: {message}") and str(tmp_path / "missing") in last
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_user_error_before_any_phase_removes_only_what_the_run_created(recipe, tmp_path, monkeypatch, existing):
    """The backstop behind the checks: a UserError once the run dir exists, before anything resumable is saved."""
    import kdistill.pipeline
    import kdistill.pipeline.encoder as pipeline

    def refuse(*args, **kwargs):
        raise UserError("teacher.model: cannot load it")

    monkeypatch.setattr(pipeline, "train_teacher", refuse)
    out = tmp_path / "new" / "run"
    if existing:
        out.mkdir(parents=True)
    with pytest.raises(UserError, match="cannot load it"):
        kdistill.pipeline.run(load_config(recipe, ["teacher.path=null"]), out)
    if existing:
        assert out.is_dir() and not any(out.iterdir())  # the user's empty dir stays, emptied of what the run wrote
    else:
        assert not (tmp_path / "new").exists()
