"""Token data with rare tags: the validation draw keeps every tag in train, test-only tags score as misses, a
100-tag recipe runs end to end; and the report's words on a weak teacher."""

from __future__ import annotations

import json
import logging
import random

import torch
from transformers import BertForTokenClassification

from kdistill.config import DataConfig, load_config
from kdistill.data import load_token_data
from kdistill.data.splits import sentence_split
from kdistill.measure import token_quality_metrics
from kdistill.models import save_model
from kdistill.reporting import write_report
from tests.conftest import FILLER, tiny_bert_config
from tests.test_token_classification import toy_sentences, write_conll


def rare_tag_sentences(n: int, n_types: int, seed: int = 0) -> list[dict]:
    """`n` sentences of filler words over `n_types` entity types (B-T000 / I-T000 ...): types 0-4 are common, the
    others each in about one sentence in twenty; then one sentence each for T{n_types}..T{n_types + 2} (seen once)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens, tags = [], []
        for k in range(rng.randint(3, 7)):
            t = rng.randrange(5) if k == 0 else rng.randrange(5, n_types) if k == 1 and rng.random() < 0.9 else None
            if t is None:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
            else:
                tokens += [rng.choice(FILLER), rng.choice(FILLER)]
                tags += [f"B-T{t:03d}", f"I-T{t:03d}"]
        out.append({"tokens": tokens, "tags": tags})
    for t in range(n_types, n_types + 3):
        out.append({"tokens": [FILLER[0], FILLER[1], FILLER[2]], "tags": ["O", f"B-T{t:03d}", "O"]})
    return out


def old_sentence_split(rows, fraction, seed):
    """The plain seeded draw: a shuffled order, its first round(fraction * n) sentences held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(rows) * fraction))
    return [rows[i] for i in order[n_held:]], [rows[i] for i in order[:n_held]]


def test_validation_draw_keeps_a_training_sentence_for_every_tag(tmp_path, caplog):
    rows = rare_tag_sentences(200, 60)
    train = write_conll(tmp_path / "train.conll", rows)
    test = write_conll(tmp_path / "test.conll", rows[:5])
    for seed in range(5):
        with caplog.at_level(logging.WARNING):
            data = load_token_data(DataConfig(train_file=str(train), test_file=str(test), seed=seed,
                                              validation_fraction=0.3))
        names = data.label_names
        assert len(names) > 100 and data.test_only_tags == []
        train_tags = {names[t] for r in data.splits["train"]["tags"] for t in r}
        assert train_tags == {t for r in rows for t in r["tags"]}  # every tag of the file keeps a train sentence
        assert len(data.splits["validation"]) == round(len(rows) * 0.3)
    counts = {}
    for r in rows:
        for t in set(r["tags"]):
            counts[t] = counts.get(t, 0) + 1
    once = sorted(t for t, c in counts.items() if c == 1)
    assert len(once) > 3 and {"B-T060", "B-T061", "B-T062"} <= set(once)
    assert f"{len(once)} tag(s) occur in one sentence only and stay in train, none in the validation split: " \
           f"{once[0]} (1 sentence), {once[1]} (1 sentence)" in caplog.text


def test_split_of_frequent_tags_is_the_plain_random_draw():
    rows = toy_sentences(300, seed=3)
    for seed, fraction in ((0, 0.1), (42, 0.2), (7, 0.5)):
        assert sentence_split(rows, fraction, seed, "toy", "validation") == old_sentence_split(rows, fraction, seed)


def test_a_given_validation_files_unseen_tag_is_a_warning_and_a_head_output_nothing_teaches(tmp_path, caplog):
    train = write_conll(tmp_path / "train.conll", toy_sentences(40, seed=1))
    validation = write_conll(tmp_path / "validation.conll",
                             [{"tokens": ["red", "coach", "said"], "tags": ["B-NEW", "I-NEW", "O"]}])
    with caplog.at_level(logging.WARNING):
        data = load_token_data(DataConfig(train_file=str(train), validation_file=str(validation)))
    assert "2 validation tag(s) never seen in the training data, 1 validation entities" in caplog.text
    names = data.label_names
    assert {"B-NEW", "I-NEW"} <= set(names) and data.test_only_tags == []
    assert not {names.index("B-NEW"), names.index("I-NEW")} & {t for r in data.splits["train"]["tags"] for t in r}


def test_test_only_tag_is_a_warning_and_its_entities_score_as_misses(tmp_path, caplog):
    train_rows = toy_sentences(40, seed=1)
    test_rows = [{"tokens": ["team", "coach", "red", "said"], "tags": ["B-SPO", "I-SPO", "B-NEW", "O"]},
                 {"tokens": ["vote", "said"], "tags": ["B-POL", "O"]}]
    train = write_conll(tmp_path / "train.conll", train_rows)
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in test_rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        data = load_token_data(DataConfig(train_file=str(train), test_file=str(test)))
    assert "1 test tag(s) never seen in the training data, 1 test entities" in caplog.text and "B-NEW" in caplog.text
    names = data.label_names
    assert "B-NEW" not in names and data.test_only_tags == ["B-NEW"] and data.scored_tags == names + ["B-NEW"]
    gold = data.splits["test"]["tags"]
    assert gold[0][2] == len(names)  # an id past the model's head: no prediction can match it
    ids = {n: i for i, n in enumerate(names)}
    preds = [[ids["B-SPO"], ids["I-SPO"], ids["O"], ids["O"]], [ids["B-POL"], ids["O"]]]
    m = token_quality_metrics(preds, gold, data.scored_tags)
    assert m["entity_precision"] == 1.0 and abs(m["entity_recall"] - 2 / 3) < 1e-9
    assert abs(m["entity_f1"] - 0.8) < 1e-9 and m["per_type"]["NEW"]["support"] == 1 and m["n_entities"] == 3


def test_ner_recipe_runs_on_a_hundred_rare_tags_with_a_test_only_tag(tmp_path, tiny_tokenizer, caplog):
    from kdistill.pipeline import run

    rows = rare_tag_sentences(120, 55, seed=4)
    train = write_conll(tmp_path / "train.conll", rows)
    seen = {t for r in rows for t in r["tags"]}
    test_rows = [r for r in rare_tag_sentences(40, 55, seed=5)[:40] if set(r["tags"]) <= seen][:20]
    test_rows.append({"tokens": [FILLER[3], FILLER[4]], "tags": ["B-ONLYTEST", "O"]})
    test = write_conll(tmp_path / "test.conll", test_rows)
    tags = sorted(seen)
    n_tags = len(tags)
    assert n_tags > 100
    teacher_dir = tmp_path / "teacher-init"
    torch.manual_seed(0)
    teacher = BertForTokenClassification(tiny_bert_config(tiny_tokenizer, num_labels=n_tags,
                                                          id2label=dict(enumerate(tags)),
                                                          label2id={t: i for i, t in enumerate(tags)}))
    save_model(teacher, tiny_tokenizer, teacher_dir, {"task": "token-classification"})
    cfg = load_config("ner", [f"data.train_file={train}", f"data.test_file={test}", "data.unlabeled_file=",
                              "data.max_length=32", f"teacher.model={teacher_dir}", "teacher.epochs=1",
                              "teacher.batch_size=16", "student.intermediate_size=32", "train.max_steps=4",
                              "train.eval_every=2", "train.batch_size=16", "export.formats=[]",
                              "eval.repeats=1", "eval.warmup=0"])
    with caplog.at_level(logging.WARNING):
        run_dir = run(cfg, tmp_path / "run")
    assert "1 test tag(s) never seen in the training data, 1 test entities" in caplog.text
    assert "B-ONLYTEST" in caplog.text
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert len(metrics["data"]["labels"]) == n_tags and metrics["data"]["test_only_tags"] == ["B-ONLYTEST"]
    for m in metrics["models"].values():
        assert 0.0 <= m["entity_f1"] <= 1.0 and m["per_type"]["ONLYTEST"]["recall"] == 0.0
    assert "entity F1" in (run_dir / "report.md").read_text(encoding="utf-8")


def report_of(tmp_path, models: dict, labels: list[str]) -> str:
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    metrics = {"run": "r", "data": {"sizes": {"test": 8}, "source": "toy", "labels": labels},
               "machine": {"eval_threads": 2}, "models": models}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return write_report([run]).read_text()


def test_report_says_first_when_the_teacher_is_below_the_no_kd_student(tmp_path):
    text = report_of(tmp_path, {"teacher": {"accuracy": 0.60}, "student": {"accuracy": 0.70,
                                "accuracy_retained_pct": 116.7}, "baseline": {"accuracy": 0.65}},
                     ["a", "b", "c", "d"])
    warning = text.index("**Weak teacher** (r): the teacher scores below the student trained without KD "
                         "(accuracy 0.6000 < 0.6500).")
    assert warning < text.index("| model |") and "passed a weak teacher" in text


def test_report_says_when_the_teacher_is_near_chance(tmp_path):
    labels = [f"c{i}" for i in range(10)]
    text = report_of(tmp_path, {"teacher": {"accuracy": 0.15}, "student": {"accuracy": 0.12}}, labels)
    assert "is near chance (accuracy 0.1500, at most 0.1500 = 1.5 / 10 classes)" in text
    assert text.index("Weak teacher") < text.index("| model |")
    ner = report_of(tmp_path / "ner", {"teacher": {"entity_f1": 0.18}, "student": {"entity_f1": 0.1},
                                       "baseline": {"entity_f1": 0.05}}, ["B-X", "O"])
    assert "is near chance (entity F1 0.1800, at most 0.2000)" in ner and "below the student" not in ner


def test_report_of_a_good_teacher_has_no_warning(tmp_path):
    text = report_of(tmp_path, {"teacher": {"accuracy": 0.9}, "student": {"accuracy": 0.85},
                                "baseline": {"accuracy": 0.8}}, ["a", "b"])
    assert "Weak teacher" not in text
