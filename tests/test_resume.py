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
from kdistill.data import pack_blocks
from kdistill.strategies.alternating import distill_alternating
from kdistill.strategies.causal import distill_causal
from kdistill.strategies.explicit import distill_explicit
from kdistill.strategies.mutual import distill_mutual
from kdistill.errors import UserError
from kdistill.student import build_student
from kdistill.terms import TermSpec
from kdistill.training import Learner
from tests.conftest import tiny_bert_config
from tests.conftest import tiny_gpt2
from tests.helpers import (
    accuracies,
    assert_same_steps,
    finish,
    history,
    save_teacher_dir,
    start_kdistill,
    tiny_pair,
    tiny_lm_recipe,
    tiny_train,
    toy_encoded,
    toy_run_config,
    write_recipe,
    write_toy_csv,
    write_vocab,
)
from kdistill.strategies.phase import Phase


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


@pytest.mark.parametrize("strategy", ["explicit", "mutual", "alternating"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_result(toy_recipe, strategy):
    """SIGKILL in the student phase's second epoch, then `kdistill run --resume`: every phase's history and the
    weights equal those of an uninterrupted run (mutual, alternating: the teacher learning alongside too)."""
    root, recipe = toy_recipe
    reference, killed = root / f"reference-{strategy}", root / f"killed-{strategy}"
    chosen = ("--set", f"distill.strategy={strategy}")
    uninterrupted = start_kdistill("run", recipe, *chosen, "--out", reference)  # alongside: one thread each
    proc = start_kdistill("run", recipe, *chosen, "--out", killed)
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
    position, (student, *teacher_after) = state["positions"]["train"], state["learners"]
    assert position["epoch"] == 1 and 0 < position["batches_done"] < STEPS_PER_EPOCH  # mid-epoch
    assert [s["step"] for s in student["history"]["steps"]] == list(range(1, state["step"] + 1))
    assert [learner["name"] for learner in teacher_after] == ([] if strategy == "explicit" else ["teacher_after"])

    resumed = finish(start_kdistill("run", "--resume", killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stderr
    assert "teacher: trained before the run was resumed" in resumed.stderr
    done = finish(uninterrupted)
    assert done.returncode == 0, done.stderr[-3000:]

    learned = ("teacher", "student") + (() if strategy == "explicit" else ("teacher_after",))
    for name in learned:  # every step's loss terms, before and after the resume point
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


@pytest.mark.parametrize("strategy", ["mutual", "alternating"])
def test_a_run_of_a_strategy_where_the_teacher_learns_resumes(strategy, tmp_path, tiny_tokenizer, monkeypatch):
    """`kdistill run --resume` of a mutual / alternating run killed while distilling continues the student phase
    (student and teacher_after) from its checkpoint and ends as the uninterrupted run."""
    from kdistill.pipeline import run

    teacher = save_teacher_dir(tmp_path / "teacher", tiny_tokenizer)
    cfg = toy_run_config(tmp_path, teacher, strategy, student_steps=2)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 5, "checkpoint_every": 2})})
    reference = run(cfg, tmp_path / "reference")
    with killed_after_step(monkeypatch, 3):
        run(cfg, tmp_path / "killed")
    resumed = run(resume_config(tmp_path / "killed"), tmp_path / "killed", resume=True)
    for name in ("student", "teacher_after"):
        assert_same_steps(history(resumed, name)["steps"], history(reference, name)["steps"], rel=1e-6)
    assert accuracies(resumed) == accuracies(reference)


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
        history = distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                                         data=toy_encoded(tiny_tokenizer), spec=spec, distill=DistillConfig(),
                                         train=train, task="classification", checkpoints=checkpoints))
        return history, student, spec

    train = tiny_train(max_steps=7, batch_size=16, grad_accum=2)
    reference, reference_student, reference_spec = train_run()

    with killed_after_step(monkeypatch, 5):
        train_run(Checkpoints(tmp_path, every=2))
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000004"]
    assert json.loads((tmp_path / "step-0000004" / "state.json").read_text())["positions"]["train"] == \
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
    for key in ("train.lr=0.1", "teacher.epochs=1", "data.max_length=64", "distill.temperature=3"):
        assert run_fingerprint(load_config("default", [key]), {"train": ["a text", 1]})["config"] != base["config"]
    other_data = run_fingerprint(load_config("default"), {"train": ["a text", 0]})
    assert other_data["config"] == base["config"] and other_data["data"] != base["data"]


def test_a_key_newer_than_a_run_is_fingerprinted_only_once_set():
    """A run started before student.from_scratch existed resumes: the key, unset, is not in the fingerprint."""
    import hashlib

    from kdistill.rundir import run_fingerprint

    cfg = load_config("llm-teacher")
    before = cfg.model_dump(mode="json")
    for key in ("name", "eval", "export"):
        before.pop(key)
    before["train"].pop("checkpoint_every")
    before["train"].pop("num_threads")
    del before["student"]["from_scratch"]  # as the config read before the key existed
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode("ascii")).hexdigest()
    assert run_fingerprint(cfg, [])["config"] == digest
    scratch = load_config("llm-teacher-chinese")
    assert run_fingerprint(scratch, [])["config"] != run_fingerprint(
        load_config("llm-teacher-chinese", ["student.from_scratch.hidden_size=128"]), [])["config"]



def test_a_checkpoint_of_another_config_or_data_is_refused(monkeypatch, tmp_path, tiny_tokenizer):
    """Checkpoints carry the fingerprint of the config and data they were written for; another one is refused."""
    train = tiny_train(max_steps=4, batch_size=16)
    fingerprint = {"config": "c1", "data": "d1"}

    def train_run(checkpoints):
        teacher, student, spec = tiny_pair(tiny_tokenizer)
        return distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                                      data=toy_encoded(tiny_tokenizer), spec=spec, distill=DistillConfig(),
                                      train=train, task="classification", checkpoints=checkpoints))

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

    monkeypatch.setattr("kdistill.pipeline.encoder.train_teacher", killed_before_the_first_save)
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


# ------------------------------------------------------------------------ every strategy resumes the same way

def two_learner_run(strategy: str, tokenizer, checkpoints=None):
    """A tiny mutual or alternating run (both models learn); returns (histories, student, teacher)."""
    teacher, student, spec = tiny_pair(tokenizer)
    loop = distill_mutual if strategy == "mutual" else distill_alternating
    histories = loop(Phase(student, [teacher], tokenizer, toy_encoded(tokenizer), spec,
                           DistillConfig(teacher_lr=1e-3, student_steps=2),
                           tiny_train(max_steps=7, batch_size=16, grad_accum=2), "classification",
                           checkpoints=checkpoints))
    return histories, student, teacher


@pytest.mark.parametrize("strategy", ["mutual", "alternating"])
def test_mutual_and_alternating_resume_to_the_uninterrupted_run(strategy, monkeypatch, tmp_path, tiny_tokenizer):
    """Killed after step 5 (checkpoints every 2 steps), resumed from step 4: both models' histories and weights equal
    the uninterrupted run's (alternating: the teacher's round steps and its quiz-set position too)."""
    reference, reference_student, reference_teacher = two_learner_run(strategy, tiny_tokenizer)
    with killed_after_step(monkeypatch, 5):
        two_learner_run(strategy, tiny_tokenizer, Checkpoints(tmp_path, every=2))
    state = json.loads((tmp_path / "step-0000004" / "state.json").read_text())
    assert [learner["name"] for learner in state["learners"]] == ["student", "teacher_after"]
    if strategy == "alternating":  # the quiz set is a data stream of its own, checkpointed with the training data
        assert set(state["positions"]) == {"train", "quiz"}

    resumed, student, teacher = two_learner_run(strategy, tiny_tokenizer, Checkpoints(tmp_path, every=2, resume=True))
    for got, want in zip(resumed, reference):
        assert_same_steps(got.steps, want.steps, rel=1e-6)
        assert_same_steps(got.evals, want.evals, rel=1e-6)
    for model, want in ((student, reference_student), (teacher, reference_teacher)):
        for a, b in zip(model.state_dict().values(), want.state_dict().values()):
            torch.testing.assert_close(a, b)


def test_the_causal_lm_loop_resumes_to_the_uninterrupted_run(monkeypatch, tmp_path, bpe_tokenizer, docs):
    """The causal-LM loop through the same engine: killed after step 5, resumed from the step-4 checkpoint, its
    history (loss terms, which data source each step drew: on-policy generations included) and weights equal the
    uninterrupted run's."""
    blocks = pack_blocks(docs[:30], bpe_tokenizer, 16)
    teacher = tiny_gpt2(bpe_tokenizer)

    def train_run(checkpoints=None):
        student = tiny_gpt2(bpe_tokenizer, layers=2, seed=1).train()
        spec = TermSpec({"forward_kl": 1.0, "lm": 0.5, "hidden_mse": 1.0}, [(1, 2), (2, 4)])
        history = distill_causal(Phase(student=student, teachers=[teacher], tokenizer=None,
                                       data={"train": blocks, "validation": blocks}, spec=spec,
                                       distill=DistillConfig(losses=spec.weights, on_policy_fraction=0.5),
                                       train=tiny_train(max_steps=7, batch_size=4, grad_accum=2, eval_every=3),
                                       task="causal-lm", checkpoints=checkpoints), eos_id=bpe_tokenizer.eos_token_id)
        return history, student

    reference, reference_student = train_run()
    assert {s["on_policy"] for s in reference.steps} == {0.0, 1.0}  # both kinds of step before and after the kill
    with killed_after_step(monkeypatch, 5):
        train_run(Checkpoints(tmp_path, every=2))
    resumed, student = train_run(Checkpoints(tmp_path, every=2, resume=True))
    assert_same_steps(resumed.steps, reference.steps, rel=1e-6)
    assert_same_steps(resumed.evals, reference.evals, rel=1e-6)
    for a, b in zip(student.state_dict().values(), reference_student.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_a_causal_lm_run_resumes_after_a_kill(monkeypatch, tmp_path, bpe_tokenizer, docs):
    """`kdistill run --resume` of a causal-LM run killed in its baseline phase: the student phase (saved) is not
    trained again, the baseline continues from its checkpoint, and both end as in the uninterrupted run."""
    from kdistill.pipeline import run

    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tiny_lm_recipe(tmp_path, bpe_tokenizer, docs, losses={"forward_kl": 1.0, "lm": 0.5},
                            train={"max_steps": 5, "batch_size": 4, "checkpoint_every": 2})
    cfg = load_config(recipe)
    reference = run(cfg, tmp_path / "reference")
    killed = tmp_path / "killed"
    original = Learner.step

    def die_in_the_baseline(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        if self.history.name == "baseline" and step == 3:
            raise Killed

    monkeypatch.setattr(Learner, "step", die_in_the_baseline)
    with pytest.raises(Killed):
        run(cfg, killed)
    monkeypatch.setattr(Learner, "step", original)
    assert (killed / "student" / "model.safetensors").is_file() and not (killed / "baseline").exists()
    assert newest_checkpoint_step(killed, "baseline") == 2

    resumed = run(resume_config(killed), killed, resume=True)
    for name in ("student", "baseline"):
        assert_same_steps(history(resumed, name)["steps"], history(reference, name)["steps"], rel=1e-6)
    perplexities = [{n: m["perplexity"] for n, m in json.loads((d / "metrics.json").read_text())["models"].items()}
                    for d in (resumed, reference)]
    assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-6)


def test_a_causal_lm_run_killed_with_sigkill_resumes_to_the_same_result(tmp_path, bpe_tokenizer, docs):
    """A causal-LM run SIGKILLed after its fourth checkpoint (in whichever phase that is: student or baseline) and
    resumed with `kdistill run --resume` ends with the uninterrupted run's histories and perplexities."""
    recipe = tiny_lm_recipe(tmp_path, bpe_tokenizer, docs,  # (hidden_mse: no cache, slower steps)
                            losses={"forward_kl": 1.0, "lm": 0.5, "hidden_mse": 1.0},
                            train={"max_steps": 60, "batch_size": 4, "checkpoint_every": 3})
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = start_kdistill("run", recipe, "--out", reference)
    proc = start_kdistill("run", recipe, "--out", killed)
    deadline = time.monotonic() + 240
    while newest_checkpoint_step(killed, "student") < 12 and newest_checkpoint_step(killed, "baseline") < 3:
        assert proc.poll() is None, finish(proc).stderr[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (killed / "metrics.json").exists()

    resumed = finish(start_kdistill("run", "--resume", killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    done = finish(uninterrupted)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("student", "baseline"):
        assert_same_steps(history(killed, name)["steps"], history(reference, name)["steps"], rel=1e-6)
        assert_same_steps(history(killed, name)["evals"], history(reference, name)["evals"], rel=1e-6)
    perplexities = [{n: m["perplexity"] for n, m in json.loads((d / "metrics.json").read_text())["models"].items()}
                    for d in (killed, reference)]
    assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-6)
