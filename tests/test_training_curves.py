"""Training curves a person can read: a term is recorded, and drawn, only at the steps that counted it; a smoothed
trend is drawn over the per-step values."""

import importlib
import math

import pytest
import torch

from kdistill.config import TrainConfig
from kdistill.data import UNLABELED
from kdistill.engine import backward_group
from kdistill.features import capture
from kdistill.reporting import curve_points, plot_curves, smoothed
from kdistill.terms import compute_terms
from kdistill.training import make_accelerator
from tests.conftest import make_toy_examples
from tests.helpers import tiny_pair

report_module = importlib.import_module("kdistill.reporting")  # (the attribute kdistill.reporting is also the verb)


def alternating_history() -> list[dict]:
    """Steps 1..40: kd at every step, ce only at the odd ones (the even ones: groups of unlabeled transfer rows,
    which the engine leaves ce out of); its value falls from 2 to ~0.1 with noise a smoothed trend should damp."""
    steps = []
    for step in range(1, 41):
        record = {"step": step, "loss": 3.0 / step, "kd": 1.0 / step, "temperature": 2.0}
        if step % 2:
            record["ce"] = 2.0 / step * (1.5 if step % 4 == 1 else 0.5)
        steps.append(record)
    return steps


def test_curve_points_skip_the_steps_that_did_not_count_a_term():
    steps = alternating_history()
    xs, ys = curve_points(steps, "ce")
    assert xs == list(range(1, 41, 2))
    assert ys == [s["ce"] for s in steps if s["step"] % 2]
    assert curve_points(steps, "kd")[0] == list(range(1, 41))
    # a history that logged the uncounted steps as 0: a log axis cannot show them either
    old = [{**s, "ce": s.get("ce", 0.0)} for s in steps]
    assert curve_points(old, "ce") == (xs, ys)
    assert curve_points([{"step": 1, "ce": float("nan")}, {"step": 2, "ce": 0.5}], "ce") == ([2], [0.5])
    assert curve_points(steps, "not_logged") == ([], [])


def test_plot_curves_draws_the_terms_at_their_counted_steps_only(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(report_module, "save_figure", lambda fig, path, title=None: figures.append(fig) or path)
    steps = alternating_history()
    plot_curves({"histories": {"student": {"name": "student", "steps": steps, "evals": []}}}, tmp_path / "c.png")
    ax = figures[0].axes[0]
    lines = ax.get_lines()
    trend = {line.get_label(): line for line in lines if not line.get_label().startswith("_")}
    assert set(trend) == {"loss", "kd", "ce"}  # not the temperature: it is not a loss term
    assert len(lines) == 6  # each term: its per-step line and its trend over it
    for term, line in trend.items():
        xs, ys = curve_points(steps, term)
        raw = [other for other in lines if other is not line and other.get_color() == line.get_color()]
        assert len(raw) == 1
        assert list(raw[0].get_xdata()) == xs and list(raw[0].get_ydata()) == ys
        assert list(line.get_xdata()) == xs and list(line.get_ydata()) == pytest.approx(smoothed(ys))
    assert not set(trend["ce"].get_xdata()) & set(range(2, 41, 2))


def test_smoothed_is_a_moving_geometric_mean_that_damps_the_noise():
    assert smoothed([4.0, 4.0, 4.0], span=5) == pytest.approx([4.0, 4.0, 4.0])
    assert smoothed([1.0, 10.0, 100.0], span=1) == pytest.approx([1.0, 10.0, 100.0])  # span 1: unchanged
    # span 3: weights 1/2 per step of age, each point the weighted mean of the logs so far
    expected = math.exp((0.25 * math.log(1.0) + 0.5 * math.log(10.0) + math.log(100.0)) / 1.75)
    assert smoothed([1.0, 10.0, 100.0], span=3)[-1] == pytest.approx(expected)
    noisy = [1.0, 100.0] * 50
    trend = smoothed(noisy, span=20)
    assert trend[-1] == pytest.approx(10.0, rel=0.3)  # the geometric mean of 1 and 100
    assert max(trend[20:]) / min(trend[20:]) < 3  # against 100 between neighbours of the raw curve
    assert smoothed([2.0, 3.0, 5.0, 7.0]) == pytest.approx([2.0, 3.0, 5.0, 7.0])  # default span of 4 points: 1


def test_a_step_without_labeled_rows_leaves_ce_out_of_its_record(tiny_tokenizer):
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    texts = [row["text"] for row in make_toy_examples(4)]

    def batch(texts, labels):
        return {**tiny_tokenizer(texts, padding=True, return_tensors="pt"), "labels": torch.tensor(labels)}

    def terms_of(batch):
        batch = dict(batch)
        labels = batch.pop("labels")
        with torch.no_grad():
            t = capture(teacher, batch, hidden_states=True)
        s = capture(student, batch, hidden_states=True)
        return [(compute_terms(spec, s, t, labels, temperature=2.0, task="classification"), spec.active)]

    labeled, unlabeled = batch(texts[:2], [0, 1]), batch(texts[2:], [UNLABELED, UNLABELED])
    accelerator = make_accelerator(TrainConfig())
    records = {}
    for name, group in {"transfer rows only": [unlabeled], "one labeled micro-batch": [labeled, unlabeled]}.items():
        logged = {}
        backward_group(accelerator, group, terms_of, [logged], task="classification")
        records[name] = logged
    assert set(records["transfer rows only"]) == {"kd", "hidden_mse"}  # ce counted nothing: not a 0
    assert set(records["one labeled micro-batch"]) == {"kd", "ce", "hidden_mse"}
    assert all(v > 0 for record in records.values() for v in record.values())
