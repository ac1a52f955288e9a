import json
import struct
import time
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from kdistill.config import DataConfig, EvalConfig
from kdistill.data import load_data, tokenize_splits
from kdistill.measure import compare_speed, evaluate_model, quality_metrics
from kdistill import reporting as report_module
from kdistill.reporting import most_confused, summary_table, write_report
from tests.conftest import tiny_bert_config
from tests.helpers import write_csv


def test_quality_metrics_against_hand_computed_values():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = quality_metrics(preds, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class precision: a 1/2, b 2/3, c 1/1; recall: a 1/2, b 1, c 1/2
    assert m["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"]["recall"] == 1.0


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory, toy_examples):
    path = write_csv(tmp_path_factory.mktemp("ev") / "toy.csv", toy_examples)
    return load_data(DataConfig(train_file=str(path)))


def test_evaluate_model_and_interleaved_speed(toy_data, tiny_tokenizer):
    torch.manual_seed(0)
    big = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer, num_hidden_layers=12)).eval()
    small = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer, num_hidden_layers=1)).eval()
    enc = tokenize_splits(toy_data, tiny_tokenizer, 32)["test"]
    cfg = EvalConfig(repeats=9, warmup=2, throughput_batch_size=4)
    m = evaluate_model(big, tiny_tokenizer, enc, toy_data.label_names, cfg)
    with torch.no_grad():
        batch = tiny_tokenizer(list(toy_data.splits["test"]["text"]), padding=True, return_tensors="pt")
        expected = big(**batch).logits.argmax(-1).tolist()
    assert m["accuracy"] == pytest.approx(sum(p == y for p, y in zip(expected, enc["labels"])) / len(expected))
    assert m["params"] == sum(p.numel() for p in big.parameters())
    assert m["latency_ms_batch1"] > 0 and m["throughput_per_s"] > 0 and m["threads"] >= 1
    speed = compare_speed({"big": big, "small": small}, {"big": (enc, tiny_tokenizer), "small": (enc, tiny_tokenizer)},
                          cfg)
    assert set(speed) == {"big", "small"}
    assert speed["small"]["latency_ms_batch1"] < speed["big"]["latency_ms_batch1"]  # 1 layer vs 12: a gap no machine noise hides


def test_report_table_and_plots(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    model = {"accuracy": 0.9, "macro_f1": 0.88, "params": 100, "size_mb": 1.0, "latency_ms_batch1": 2.0,
             "throughput_per_s": 50.0, "speedup_vs_teacher": 1.0, "size_ratio_vs_teacher": 1.0,
             "accuracy_retained_pct": 100.0, "train_wall_time_s": 3.0, "confusion_matrix": [[3, 1], [0, 4]]}
    metrics = {"run": "r", "data": {"sizes": {"test": 8}, "source": "toy", "labels": ["x", "y"]},
               "machine": {"eval_threads": 2},
               "models": {"teacher": model, "student": {**model, "accuracy": 0.85, "speedup_vs_teacher": 3.0}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "logs" / "history_student.json").write_text(json.dumps(
        {"name": "student", "steps": [{"step": 1, "loss": 1.0, "kd": 0.5}, {"step": 2, "loss": 0.5, "kd": 0.2}],
         "evals": [{"step": 2, "accuracy": 0.8}]}))
    report = write_report([run])
    text = report.read_text()
    assert "| student | 85.00% | 0.8800 | 100 |" in text and "3.00x" in text
    for png in ("tradeoff.png", "curves_run.png", "confusion_run.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert summary_table([{"metrics": metrics}]).count("\n") == 3


def report_run(tmp_path, n_classes: int, confusion) -> Path:
    """A run dir whose student has `confusion` over `n_classes` classes, as pipeline.evaluate_run writes it."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    model = {"accuracy": 0.5, "latency_ms_batch1": 2.0, "size_mb": 1.0, "confusion_matrix": confusion}
    metrics = {"run": "r", "data": {"sizes": {"test": 8}, "source": "toy",
                                    "labels": [f"class-{i}" for i in range(n_classes)]},
               "models": {"teacher": model, "student": model}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def png_size(path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk follows the 8-byte signature
    return width, height


def test_the_confusion_plot_of_600_classes_is_quick_and_its_canvas_bounded(tmp_path):
    n = 600
    cm = [[0] * n for _ in range(n)]
    for i in range(n):
        cm[i][i] = 5
        cm[i][(7 * i + 1) % n] = i % 4
    run = report_run(tmp_path, n, cm)
    start = time.perf_counter()
    report = write_report([run])
    assert time.perf_counter() - start < 30  # ~2 s alone; the pathological plot took minutes (shared CI: slack)
    assert "![confusion](plots/confusion_run.png)" in report.read_text()
    width, height = png_size(run / "plots" / "confusion_run.png")
    assert width * height <= 2000 * 2000  # the canvas (4 bytes a pixel) is what ran out of memory at 600 classes


def test_a_large_confusion_plot_shows_the_most_confused_classes():
    cm = [[10 if i == j else 0 for j in range(8)] for i in range(8)]
    cm[5][2], cm[6][5], cm[1][1] = 7, 3, 50  # 5 and 2 mixed up most, then 6 (into 5); 1 is large but never confused
    assert most_confused(cm, 3) == [2, 5, 6]
    assert most_confused(cm, 20) == list(range(8))  # few classes: every one, in order


def test_a_plot_that_fails_is_logged_and_skipped_and_the_report_still_written(tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise MemoryError("canvas too large")

    monkeypatch.setattr(report_module, "plot_tradeoff", broken)
    run = report_run(tmp_path, 2, [[3, 1], [0, 4]])
    text = write_report([run]).read_text()
    assert "| student | 50.00% |" in text
    assert "tradeoff" not in text and "![confusion](plots/confusion_run.png)" in text
    assert "plot tradeoff.png skipped (MemoryError: canvas too large)" in caplog.text


def test_peers_join_the_table_and_the_tradeoff_plot(tmp_path, capsys):
    """`kdistill report RUN --peers DIR`: the tools of a peers table (benchmarks/peers' peers.json) sit beside the
    run's models, kdistill's own rows of that table left out, a failed tool named; another task's table is refused
    in one line."""
    from kdistill.cli import main
    from tests.test_bench_peers import peers_doc

    run = report_run(tmp_path, 2, [[3, 1], [0, 4]])
    speed = {"latency_ms_batch1": 4.0, "size_mb": 2.0, "throughput_per_s": 10.0}
    doc = peers_doc("peers-kd", {
        "kdistill:student": {"system": "kdistill", "label": "student", "accuracy": 0.5, **speed},
        "textbrewer": {"system": "textbrewer", "label": "TextBrewer", "accuracy": 0.625, **speed},
        "hf-trainer-kd": {"system": "hf-trainer-kd", "label": "Trainer KD", "failed": "out of time"}})
    (tmp_path / "peers-kd").mkdir()
    (tmp_path / "peers-kd" / "peers.json").write_text(json.dumps(doc))
    main(["report", str(run), "--peers", str(tmp_path / "peers-kd"), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| peers-kd/textbrewer | 62.50% |" in text and "| r/student | 50.00% |" in text
    assert "peers-kd/hf-trainer-kd (failed) |" in text and "kdistill:student" not in text
    assert (tmp_path / "out" / "plots" / "tradeoff.png").stat().st_size > 1000

    (tmp_path / "peers-kd" / "peers.json").write_text(json.dumps({**doc, "task": "embedding"}))
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(run), "--peers", str(tmp_path / "peers-kd" / "peers.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: --peers ") and "a table of embedding systems" in err and "\n" not in err
