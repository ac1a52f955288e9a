"""The teacher's budget follows the data: a step cap with epochs, validation often enough to see a plateau,
patience, a time cap; how each phase ended is recorded and reported."""

from __future__ import annotations

import json

import pytest
import torch

from kdistill.config import DistillConfig, load_config
from kdistill.pipeline import run
from kdistill.strategies import explicit
from kdistill.strategies.explicit import distill_explicit
from kdistill.strategies.phase import Phase
from kdistill.teacher import teacher_budget
from kdistill.terms import TermSpec
from tests.helpers import scratch_teacher_recipe, tiny_pair, tiny_train, toy_encoded, weights_of, write_toy_csv


@pytest.mark.parametrize("examples, steps, every", [
    (14_041, 878, 88),   # CoNLL-sized: the cap is 2 epochs of 439 steps; validated 10 times
    (2_000, 878, 63),    # 63 steps an epoch: ~14 epochs under the cap, validated each epoch
    (300, 300, 10),      # 10 steps an epoch: the 30 epochs come first; validated every epoch
])
def test_the_ner_teachers_budget_is_capped_in_steps_and_validated_at_least_ten_times(examples, steps, every):
    train = teacher_budget(load_config("ner"), examples)
    assert (train.max_steps, train.eval_every, train.early_stopping_patience) == (steps, every, 3)
    assert (train.batch_size, train.lr, train.grad_accum) == (32, 1e-4, 1)


def test_without_patience_the_teacher_trains_its_epochs_and_validates_once_an_epoch():
    cfg = load_config(None, ["teacher.epochs=2", "teacher.batch_size=16", "train.eval_every=5",
                             "train.early_stopping_patience=4", "train.max_minutes=1"])
    train = teacher_budget(cfg, 100)  # 7 steps an epoch
    # the student's own validation, patience and time cap are not the teacher's
    assert (train.max_steps, train.eval_every, train.early_stopping_patience, train.max_minutes) == (14, 7, None, None)


def _train(tiny_tokenizer, train, monkeypatch, scores=None):
    """A tiny supervised phase; with `scores`, each validation reports the next of them as its accuracy."""
    if scores is not None:
        given = iter(scores)
        monkeypatch.setattr(explicit, "validation_metrics",
                            lambda *a, **k: {"accuracy": next(given), "loss": 1.0})
    _, student, _ = tiny_pair(tiny_tokenizer)
    phase = Phase(student, [], tiny_tokenizer, toy_encoded(tiny_tokenizer), TermSpec({"ce": 1.0}, pairs=[]),
                  DistillConfig(losses={"ce": 1.0}), train, "classification", name="teacher")
    return student, distill_explicit(phase)


def test_patience_stops_the_phase_after_that_many_validations_without_a_better_score(tiny_tokenizer, monkeypatch):
    kept = {}
    original = explicit.make_learner

    def spy(*args, **kwargs):  # the weights at the best validation (step 2), to compare with the ones left
        learner = original(*args, **kwargs)
        update = learner.stopper.update

        def recording(model, metrics):
            better = update(model, metrics)
            if learner.stopper.bad_evals == 0:
                kept["best"] = weights_of(learner.model).clone()
            return better

        learner.stopper.update = recording
        return learner

    monkeypatch.setattr(explicit, "make_learner", spy)
    student, history = _train(tiny_tokenizer, tiny_train(max_steps=20, eval_every=1, early_stopping_patience=2),
                              monkeypatch, scores=[0.5, 0.7, 0.6, 0.65, 0.9])
    assert (history.steps_run, history.planned_steps, history.stopped, history.best_step) == (4, 20, "patience", 2)
    assert [e["step"] for e in history.evals] == [1, 2, 3, 4]
    assert torch.equal(weights_of(student), kept["best"])


def test_a_time_cap_stops_the_phase_after_its_first_step_validated_there(tiny_tokenizer, monkeypatch):
    _, history = _train(tiny_tokenizer, tiny_train(max_steps=20, max_minutes=1e-9), monkeypatch)
    assert (history.steps_run, history.stopped, history.best_step) == (1, "time", 1)
    assert [e["step"] for e in history.evals] == [1]  # validated at the step it stopped: no eval point there


def test_a_phase_that_runs_its_plan_says_so(tiny_tokenizer, monkeypatch):
    _, history = _train(tiny_tokenizer, tiny_train(max_steps=4, eval_every=2), monkeypatch, scores=[0.4, 0.3])
    assert history.budget() == {"steps_run": 4, "planned_steps": 4, "stopped": "budget", "best_step": 2}


def test_each_models_training_budget_is_in_metrics_and_the_report(tmp_path, tiny_tokenizer):
    recipe = scratch_teacher_recipe(tmp_path, tiny_tokenizer, {
        "train_file": str(write_toy_csv(tmp_path / "toy.csv", 60)), "max_length": 16})
    cfg = load_config(recipe, ["teacher.epochs=3", "teacher.max_steps=4", "teacher.patience=5"])
    run_dir = run(cfg, tmp_path / "run")
    models = json.loads((run_dir / "metrics.json").read_text())["models"]
    teacher = models["teacher"]["training"]
    assert teacher["planned_steps"] == 4 and teacher["steps_run"] <= 4
    assert teacher["stopped"] in ("budget", "patience") and 1 <= teacher["best_step"] <= teacher["steps_run"]
    assert models["student"]["training"]["planned_steps"] == 2
    report = (run_dir / "report.md").read_text()
    assert f"teacher {teacher['steps_run']} of 4 planned steps" in report
    assert "student 2 of 2 planned steps" in report
