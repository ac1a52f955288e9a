import json

import pytest
import torch
from transformers import BertForSequenceClassification

from kdistill.config import DataConfig, EvalConfig
from kdistill.data import load_data, tokenize_splits
from kdistill.evaluate import compare_speed, evaluate_model, quality_metrics
from kdistill.report import summary_table, write_report
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
    speed = compare_speed({"big": big, "small": small}, enc, tiny_tokenizer, cfg)
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
