"""Checkpoints and resume: a run killed with SIGKILL mid-epoch and resumed with `--resume` ends exactly where an
uninterrupted run of the same seed ends; checkpoints are atomic (a half-written one is never loaded); in-process
resume of the explicit loop with gradient accumulation and learned projections."""

from __future__ import annotations

import glob
import json
import os
import signal
import time
from contextlib import contextmanager

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from kdistill.checkpoint import COMPLETE, Checkpoints, join_tensors, resume_config, split_tensors
from kdistill.config import DistillConfig, load_config
from kdistill.distill.explicit import distill_explicit
from kdistill.distill.terms import TermSpec
from kdistill.errors import UserError
from kdistill.student import build_student
from kdistill.training import Learner
from tests.conftest import tiny_bert_config
from tests.helpers import (
    accuracies,
    assert_same_steps,
    finish,
    history,
    save_teacher_dir,
    start_kdistill,
    tiny_pair,
    tiny_train,
    toy_bundle,
    write_recipe,
    write_toy_csv,
)


def write_vocab(path, tokenizer):
    """The tokenizer's vocab.txt: a from-scratch teacher over a given vocab is the same in every process (a WordPiece
    trained in the run is not: the tokenizers trainer breaks ties differently from one process to the next)."""
    vocab = tokenizer.get_vocab()
    path.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- kill, resume

STEPS_PER_EPOCH = 8  # 64 training examples (90 - 18 test - 8 validation) in batches of 8
CHECKPOINT_EVERY = 5  # checkpoints at 5, 8 (epoch end), 10, 15, 16 (epoch end), 20 (24, the last step, needs none)


@pytest.fixture(scope="module")
def toy_recipe(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("resume")
    teacher = {"model": None, "epochs": 8, "lr": 5e-3, "batch_size": 8,
               "from_scratch": {"tokenizer": str(write_vocab(root / "vocab.txt", tiny_tokenizer)), "hidden_size": 32,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}}
    recipe = {
        "name": "toy-resume",
        "data": {"train_file": str(write_toy_csv(root / "toy.csv")), "max_length": 16},
        "teacher": teacher,
        "student": {"layers": 1},
        "distill": {"losses": {"kd": 1.0, "ce": 0.2, "hidden_mse": 1.0}, "baseline": False},
        "train": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "checkpoint_every": CHECKPOINT_EVERY},
        "eval": {"repeats": 1, "warmup": 0},
    }
    return root, write_recipe(root / "toy.yaml", recipe)


def newest_checkpoint_step(run_dir, phase: str) -> int:
    done = glob.glob(str(run_dir / "checkpoints" / phase / "step-*" / COMPLETE))
    return max((int(os.path.basename(os.path.dirname(d)).removeprefix("step-")) for d in done), default=0)


def test_a_run_killed_mid_epoch_resumes_to_the_same_result(toy_recipe):
    root, recipe = toy_recipe
    reference, killed = root / "reference", root / "killed"
    uninterrupted = start_kdistill("run", recipe, "--out", reference)  # alongside: one thread each, two cores
    proc = start_kdistill("run", recipe, "--out", killed)
    deadline = time.monotonic() + 240
    while newest_checkpoint_step(killed, "student") <= STEPS_PER_EPOCH:  # wait for one in the second epoch
        assert proc.poll() is None, finish(proc).stderr[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()

    assert proc.returncode == -signal.SIGKILL
    assert (killed / "teacher" / "model.safetensors").is_file()  # the teacher phase had finished
    assert not (killed / "student").exists()  # the student phase had not
    # the newest (an older one too, when the kill came between the new one's rename and the old one's removal)
    checkpoint = max((killed / "checkpoints" / "student").glob("step-*"))
    state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    assert state["position"]["epoch"] == 1 and 0 < state["position"]["batches_done"] < STEPS_PER_EPOCH  # mid-epoch
    assert [s["step"] for s in state["history"]["steps"]] == list(range(1, state["step"] + 1))

    resumed = finish(start_kdistill("run", "--resume", killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stderr
    assert "teacher: trained before the run was resumed" in resumed.stderr
    done = finish(uninterrupted)
    assert done.returncode == 0, done.stderr[-3000:]

    for name in ("teacher", "student"):  # every step's loss terms, before and after the resume point
        assert_same_steps(history(killed, name)["steps"], history(reference, name)["steps"], rel=1e-6)
        assert_same_steps(history(killed, name)["evals"], history(reference, name)["evals"], rel=1e-6)
    assert accuracies(killed) == accuracies(reference)
    a, b = load_file(killed / "student" / "model.safetensors"), load_file(reference / "student" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not (killed / "checkpoints" / "student").exists()  # a finished phase leaves no checkpoint behind


def test_resume_refuses_a_changed_config_and_a_dir_that_is_not_a_run(toy_recipe, tmp_path):
    root, recipe = toy_recipe
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(UserError, match="no config.yaml"):
        resume_config(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(recipe.read_text())), encoding="utf-8")
    assert resume_config(run_dir, str(recipe)).train.checkpoint_every == CHECKPOINT_EVERY  # the same recipe: fine
    with pytest.raises(UserError, match=r"train\.lr is 0\.1 here but 0\.003"):
        resume_config(run_dir, str(recipe), ["train.lr=0.1"])
    with pytest.raises(UserError, match="--out"):
        resume_config(run_dir, out=tmp_path / "elsewhere")
    (run_dir / "config.yaml").write_text("mine: a config of another tool\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"its config\.yaml is not a kdistill config, so this is not a kdistill run"):
        resume_config(run_dir)


def test_resume_is_refused_for_strategies_that_do_not_checkpoint(tmp_path, tiny_tokenizer):
    recipe = {"data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 30)), "max_length": 16},
              "teacher": {"path": str(save_teacher_dir(tmp_path / "teacher", tiny_tokenizer))},
              "distill": {"strategy": "mutual", "losses": {"kd": 1.0, "ce": 1.0}}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    from kdistill.pipeline import run

    with pytest.raises(UserError, match="resume not supported for strategy mutual"):
        run(resume_config(run_dir), run_dir, resume=True)


# ------------------------------------------------------------------------------------ atomic, in-process

def test_a_checkpoint_without_its_complete_marker_is_never_loaded(tmp_path):
    checkpoints = Checkpoints(tmp_path, every=2, resume=True)
    assert checkpoints.latest() is None
    for step, complete in ((4, True), (6, True), (8, False)):  # step 8: killed while writing it
        (tmp_path / f"step-{step:07d}").mkdir()
        if complete:
            (tmp_path / f"step-{step:07d}" / COMPLETE).write_text(f"{step}\n")
    (tmp_path / ".step-0000010.tmp").mkdir()  # killed before the rename
    assert checkpoints.latest() == tmp_path / "step-0000006"
    assert Checkpoints(tmp_path / "missing").latest() is None


def test_optimizer_state_round_trips_through_json_and_tensors():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    saved, tensors = split_tensors(state)
    saved = json.loads(json.dumps(saved))  # as it is stored
    restored = join_tensors(saved, tensors, state["param_groups"])
    assert restored["param_groups"] == state["param_groups"]  # betas a tuple again
    for param, entries in state["state"].items():
        for key, value in entries.items():
            torch.testing.assert_close(restored["state"][param][key], value)


class Killed(Exception):
    pass


@contextmanager
def killed_after_step(monkeypatch, last_step: int):
    """The training loop dies (Killed) right after optimizer step `last_step`, as a SIGKILL would leave it."""
    original = Learner.step

    def step_then_die(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        if step == last_step:
            raise Killed

    monkeypatch.setattr(Learner, "step", step_then_die)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(Learner, "step", original)


def test_explicit_loop_resumes_in_process_with_accumulation_and_projections(monkeypatch, tmp_path, tiny_tokenizer):
    """max_steps 7 of 3 steps an epoch (grad_accum 2), checkpoints every 2 steps: killed after step 5, resumed from
    step 4 (epoch 1, one step in), the history and weights equal the uninterrupted run's."""
    def pair():
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer))
        student = build_student(teacher, layers=[1, 3], hidden_size=16, num_attention_heads=2, intermediate_size=32)
        spec = TermSpec({"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}, pairs=[(1, 2), (2, 4)])
        spec.add_projections(16, 32)  # learned 16 -> 32 projection: saved and restored with the student
        return teacher, student.train(), spec

    def train_run(checkpoints=None):
        teacher, student, spec = pair()
        history = distill_explicit(student, [teacher], tiny_tokenizer, toy_bundle(), spec=spec,
                                   distill=DistillConfig(), train=train, max_length=16, checkpoints=checkpoints)
        return history, student, spec

    train = tiny_train(max_steps=7, batch_size=16, grad_accum=2)
    reference, reference_student, reference_spec = train_run()

    with killed_after_step(monkeypatch, 5):
        train_run(Checkpoints(tmp_path, every=2))
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000004"]
    assert json.loads((tmp_path / "step-0000004" / "state.json").read_text())["position"] == \
        {"epoch": 1, "steps_done": 1, "batches_done": 2, "sampler_epoch": 1}

    resumed, student, spec = train_run(Checkpoints(tmp_path, every=2, resume=True))
    assert_same_steps(resumed.steps, reference.steps, rel=1e-6)
    for a, b in zip(student.state_dict().values(), reference_student.state_dict().values()):
        torch.testing.assert_close(a, b)
    for a, b in zip(spec.projections.parameters(), reference_spec.projections.parameters()):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------ fingerprints

def test_the_fingerprint_follows_what_is_trained_only():
    from kdistill.rundir import run_fingerprint

    base = run_fingerprint(load_config("default"), {"train": ["a text", 1]})
    untrained = ["name=other", "eval.repeats=1", "export.formats=[hf]", "train.checkpoint_every=5", "train.num_threads=1"]
    assert run_fingerprint(load_config("default", untrained), {"train": ["a text", 1]}) == base
    for key in ("train.lr=0.1", "teacher.epochs=1", "data.max_length=64", "distill.temperature=2"):
        assert run_fingerprint(load_config("default", [key]), {"train": ["a text", 1]})["config"] != base["config"]
    other_data = run_fingerprint(load_config("default"), {"train": ["a text", 0]})
    assert other_data["config"] == base["config"] and other_data["data"] != base["data"]



def test_a_checkpoint_of_another_config_or_data_is_refused(monkeypatch, tmp_path, tiny_tokenizer):
    """Checkpoints carry the fingerprint of the config and data they were written for; another one is refused."""
    train = tiny_train(max_steps=4, batch_size=16)
    fingerprint = {"config": "c1", "data": "d1"}

    def train_run(checkpoints):
        teacher, student, spec = tiny_pair(tiny_tokenizer)
        return distill_explicit(student, [teacher], tiny_tokenizer, toy_bundle(), spec=spec, distill=DistillConfig(),
                                train=train, max_length=16, checkpoints=checkpoints)

    with killed_after_step(monkeypatch, 3):
        train_run(Checkpoints(tmp_path, every=2, fingerprint=fingerprint))
    for other, what in (({"config": "c2", "data": "d1"}, "config"), ({"config": "c1", "data": "d2"}, "data"),
                        (None, "config")):
        with pytest.raises(UserError, match=f"cannot resume from {tmp_path / 'step-0000002'}: .*other {what}"):
            train_run(Checkpoints(tmp_path, every=2, resume=True, fingerprint=other))
    resumed = train_run(Checkpoints(tmp_path, every=2, resume=True, fingerprint=fingerprint))
    assert [s["step"] for s in resumed.steps] == [1, 2, 3, 4]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_checkpoint_files_get_a_plain_writes_mode(umask_022, killed_run):
    """safetensors writes owner-only files; checkpoints are as readable as any file written under the umask."""
    run_dir, _ = killed_run
    files = [f for f in (run_dir / "checkpoints").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o644)}


@pytest.fixture
def killed_run(toy_recipe, tmp_path, monkeypatch):
    """A run dir whose teacher phase was killed in step 3, after its step-2 checkpoint (in this process)."""
    from kdistill.pipeline import run

    root, recipe = toy_recipe
    cfg = load_config(recipe, ["train.checkpoint_every=2", "teacher.epochs=1", "train.max_steps=2"])
    with killed_after_step(monkeypatch, 3):
        run(cfg, tmp_path / "run")
    assert newest_checkpoint_step(tmp_path / "run", "teacher") == 2
    return tmp_path / "run", cfg


def test_resume_refuses_a_run_dir_whose_config_or_data_changed(killed_run, tmp_path):
    from kdistill.pipeline import run

    run_dir, cfg = killed_run
    saved = (run_dir / "config.yaml").read_text(encoding="utf-8")
    (run_dir / "config.yaml").write_text(saved.replace("lr: 0.005", "lr: 0.001"), encoding="utf-8")
    with pytest.raises(UserError, match=f"--resume {run_dir}: config.yaml is not the config"):
        run(resume_config(run_dir), run_dir, resume=True)
    (run_dir / "config.yaml").write_text(saved, encoding="utf-8")

    data = cfg.data.train_file
    original = open(data, encoding="utf-8").read()
    with open(data, "a", encoding="utf-8") as f:
        f.write("a new goal for the team,sport\n")
    try:
        with pytest.raises(UserError, match=f"--resume {run_dir}: data.train_file {data} holds other"):
            run(resume_config(run_dir), run_dir, resume=True)
    finally:
        with open(data, "w", encoding="utf-8") as f:
            f.write(original)


def test_a_fresh_run_into_a_used_dir_never_picks_up_its_checkpoints(killed_run, monkeypatch):
    from kdistill.pipeline import run

    run_dir, cfg = killed_run
    before = sorted(p.name for p in (run_dir / "checkpoints" / "teacher").iterdir())
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})})
    with pytest.raises(UserError, match=f"--out {run_dir}: .*--resume"):
        run(changed, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "teacher").iterdir()) == before
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == cfg.train.seed

    def killed_before_the_first_save(*args, **kwargs):
        raise Killed

    monkeypatch.setattr("kdistill.pipeline.train_teacher", killed_before_the_first_save)
    with pytest.raises(Killed):
        run(changed, run_dir, overwrite=True)  # replaces the older run: its checkpoints go with it
    assert not (run_dir / "checkpoints").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == 7


def test_a_run_killed_while_exporting_resumes_over_its_own_export_dir(tmp_path, tiny_tokenizer):
    from kdistill.pipeline import run

    recipe = write_recipe(tmp_path / "toy.yaml", {
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 45)), "max_length": 16},
        "teacher": {"path": str(save_teacher_dir(tmp_path / "teacher", tiny_tokenizer))},
        "distill": {"losses": {"kd": 1.0}, "baseline": False},
        "train": {"max_steps": 2, "batch_size": 8},
        "eval": {"repeats": 1, "warmup": 0},
        "export": {"formats": ["hf"]},
    })
    run_dir = run(load_config(recipe), tmp_path / "run")
    (run_dir / "metrics.json").unlink()  # killed after the export, before metrics.json: export/hf is the run's own
    run(resume_config(run_dir), run_dir, resume=True)
    assert json.loads((run_dir / "metrics.json").read_text())["exports"]["hf"]
