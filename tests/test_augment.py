"""Transfer sets: data.unlabeled_file and data.augment (TinyBERT-style word replacement) reach the student as
unlabeled rows, never the teacher or the no-KD baseline, and never hold a test or validation text."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, BertForSequenceClassification

import kdistill.strategies.explicit as explicit
import kdistill.pipeline
import kdistill.pipeline.distillation as pipeline
import kdistill.teacher as teacher_stage
from kdistill.augment import augment_rows, augment_texts, with_transfer
from kdistill.cli import main
from kdistill.config import AugmentConfig, DataConfig
from kdistill.data import UNLABELED, DataBundle
from tests.conftest import FILLER, KEYWORDS, LABELS, make_toy_examples
from tests.helpers import toy_run_config, write_csv

TEXTS = [r["text"] for r in make_toy_examples(30, seed=5)]
VOCAB_WORDS = {w for ws in KEYWORDS.values() for w in ws} | set(FILLER)


@pytest.fixture()
def teacher(tiny_bert_dir):
    return BertForSequenceClassification.from_pretrained(tiny_bert_dir)


def twin(teacher, tokenizer, word: str, of: str) -> None:
    """Give `word` the input embedding of `of`: `word` becomes the nearest whole word to `of`."""
    a, b = tokenizer.convert_tokens_to_ids([word, of])
    with torch.no_grad():
        teacher.get_input_embeddings().weight[a] = teacher.get_input_embeddings().weight[b]


def test_augmentation_is_deterministic_from_its_seed(teacher, tiny_tokenizer):
    cfg = AugmentConfig(multiplier=3, replace_prob=0.3, seed=1)
    first = augment_texts(TEXTS, teacher, tiny_tokenizer, cfg)
    assert first == augment_texts(TEXTS, teacher, tiny_tokenizer, cfg)
    assert first != augment_texts(TEXTS, teacher, tiny_tokenizer, cfg.model_copy(update={"seed": 2}))


def test_augmentation_replaces_about_replace_prob_of_the_words_by_vocabulary_words(teacher, tiny_tokenizer):
    variants = augment_texts(TEXTS, teacher, tiny_tokenizer, AugmentConfig(multiplier=20, replace_prob=0.3))
    changed = total = 0
    for text, copies in zip(TEXTS, variants):
        assert len(copies) == 20
        for copy in copies:
            old, new = text.split(), copy.split()
            assert len(new) == len(old) and set(new) <= VOCAB_WORDS
            changed += sum(a != b for a, b in zip(old, new))
            total += len(old)
    assert 0.27 < changed / total < 0.33  # 3600 words: 0.3 ± 4 standard deviations


def test_the_multiplier_sets_how_many_texts_each_training_text_gives(teacher, tiny_tokenizer):
    rows = [{"text": t} for t in TEXTS]
    for multiplier in (1, 3):
        made, counts = augment_rows(rows, teacher, tiny_tokenizer,
                                    AugmentConfig(multiplier=multiplier, replace_prob=1.0), held_out=[])
        assert len(made) == counts["augmented"] == multiplier * len(rows)
        assert not {r["text"] for r in made} & set(TEXTS)


def test_augmentation_never_emits_a_test_or_validation_text(teacher, tiny_tokenizer):
    twin(teacher, tiny_tokenizer, "match", of="goal")  # "goal" -> "match", its one candidate
    twin(teacher, tiny_tokenizer, "law", of="vote")
    cfg = AugmentConfig(multiplier=1, replace_prob=1.0, candidates=1)
    train = [{"text": "goal"}, {"text": "vote"}, {"text": "Chip"}]
    made, _ = augment_rows(train, teacher, tiny_tokenizer, cfg, held_out=[])
    assert [r["text"] for r in made[:2]] == ["match", "law"]  # the case is real: both would be emitted

    def split(texts):
        return Dataset.from_dict({"text": texts, "label": [0] * len(texts)})

    data = DataBundle(DatasetDict({"train": split([r["text"] for r in train]), "validation": split(["MATCH"]),
                                   "test": split([" law "])}), LABELS, "toy")
    out = with_transfer(data, DataConfig(augment=cfg), teacher, tiny_tokenizer)
    added = out.splits["train"].to_list()[3:]
    assert [r["text"] for r in added] == [made[2]["text"]] and added[0]["label"] == UNLABELED
    assert out.leakage["augmented_equal_to_held_out_dropped"] == 2
    assert len(data.splits["train"]) == 3  # the teacher's and the baseline's data are left as they were


def test_transfer_rows_reach_the_student_unlabeled_and_never_the_teacher_or_the_baseline(tmp_path, teacher_dir,
                                                                                        monkeypatch):
    test_rows = make_toy_examples(12, seed=9)
    unlabeled = [{"text": r["text"], "label": "?"} for r in make_toy_examples(10, seed=11)]
    unlabeled.append({"text": "  " + test_rows[0]["text"].upper(), "label": "?"})  # a test text: leakage
    cfg = toy_run_config(tmp_path, teacher_dir, "explicit")
    data = cfg.data.model_copy(update={
        "test_file": str(write_csv(tmp_path / "test.csv", test_rows)),
        "unlabeled_file": str(write_csv(tmp_path / "unlabeled.csv", unlabeled)),
        "augment": AugmentConfig(multiplier=2)})
    cfg = cfg.model_copy(update={
        "data": data, "distill": cfg.distill.model_copy(update={"baseline": True}),
        "teacher": cfg.teacher.model_copy(update={"path": None, "model": str(teacher_dir), "epochs": 0.3})})
    seen = {}  # each phase's training split, as its loop receives it: token ids and labels
    original = explicit.distill_explicit

    def spy(phase, **kw):
        seen[phase.name] = {"ids": [tuple(x) for x in phase.data["train"]["input_ids"]],
                            "labels": list(phase.data["train"]["labels"])}
        return original(phase, **kw)

    monkeypatch.setattr(teacher_stage, "distill_explicit", spy)  # the teacher and the no-KD baseline
    monkeypatch.setattr(pipeline, "distill_explicit", spy)  # the student
    run_dir = kdistill.pipeline.run(cfg, tmp_path / "run")

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)

    def ids(rows):
        return [tuple(x) for x in tokenizer([r["text"] for r in rows], truncation=True, max_length=16)["input_ids"]]

    assert seen["teacher"] == seen["baseline"]
    labeled = seen["teacher"]["ids"]
    assert UNLABELED not in seen["teacher"]["labels"]
    student = seen["student"]
    assert student["ids"][:len(labeled)] == labeled
    extra = student["ids"][len(labeled):]
    assert set(student["labels"][len(labeled):]) == {UNLABELED}  # soft targets only: ce skips these rows
    assert extra[:10] == ids(unlabeled[:10])  # the file's rows, less the test text
    assert len(extra) > 10 and not set(extra) & set(ids(test_rows))
    data_summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["data"]
    assert data_summary["unlabeled_train"] == len(extra)
    assert data_summary["leakage"]["unlabeled_texts_also_held_out"] == 1
    assert data_summary["leakage"]["augmented"] == len(extra) - 10


@pytest.mark.parametrize("case", ["missing", "no text column"])
def test_a_bad_unlabeled_file_is_one_line_and_exit_2(tmp_path, teacher_dir, capsys, case):
    toy_run_config(tmp_path, teacher_dir, "explicit")  # writes toy.yaml
    path = tmp_path / "unlabeled.csv"
    if case == "no text column":
        write_csv(path, [{"body": "goal match"}], fields=("body",))
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(tmp_path / "toy.yaml"), "--set", f"data.unlabeled_file={path}", "--out",
              str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert ("not found" in err) and (case == "missing" or "data.text_column" in err)
    assert not (tmp_path / "run").exists()


def test_transfer_sets_are_refused_for_causal_lm():
    from kdistill.config import validate_config
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="data.unlabeled_file and data.augment work with the encoder tasks, not "
                                          "causal-lm"):
        validate_config({"task": "causal-lm", "data": {"augment": {"multiplier": 2}}})
