"""Token-classification files: every line ending read the same, what makes no sense said in one line naming the
file and line, unpaired surrogates found inside the token and tag lists, tags that are one printable word."""

from __future__ import annotations

import json

import pytest

from kdistill.config import DataConfig
from kdistill.data import load_token_data, read_conll, read_token_file, read_token_jsonl
from kdistill.errors import DataError

SENTENCES = [{"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]},
             {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
             {"tokens": ["BRUSSELS", "1996-08-22"], "tags": ["B-LOC", "O"]}]
ENDINGS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}


def _conll(sentences, end: str, columns: int = 2) -> str:
    blocks = ["-DOCSTART- -X- -X- O" if columns == 4 else "-DOCSTART- O"]
    for s in sentences:
        blocks.append(end.join(" ".join([t, *["X"] * (columns - 2), tag]) for t, tag in zip(s["tokens"], s["tags"])))
    return (end + end).join(blocks) + end


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("columns", [2, 4])
def test_conll_reads_every_line_ending_the_same(tmp_path, ending, columns):
    path = tmp_path / "train.conll"
    path.write_bytes(_conll(SENTENCES, ENDINGS[ending], columns).encode())
    assert read_conll(path) == SENTENCES


@pytest.mark.parametrize("ending", ENDINGS)
def test_jsonl_reads_every_line_ending_the_same(tmp_path, ending):
    path = tmp_path / "train.jsonl"
    path.write_bytes(ENDINGS[ending].join(json.dumps(s) for s in SENTENCES).encode())
    assert read_token_file(path) == SENTENCES


def test_a_cr_only_train_file_is_many_sentences_not_one_token(tmp_path):
    sentences = [{"tokens": ["EU", f"w{i}", "call"], "tags": ["B-ORG", "O", "O"]} for i in range(40)]
    path = tmp_path / "train.conll"
    path.write_bytes(_conll(sentences, "\r").encode())
    bundle = load_token_data(DataConfig(train_file=str(path)))
    assert sum(len(s) for s in bundle.splits.values()) == 40
    assert bundle.label_names == ["B-ORG", "O"]
    assert bundle.splits["train"][0]["tokens"][0] == "EU"


@pytest.mark.parametrize("ending", ["\n", "\r"])
def test_lines_with_another_column_count_are_named(tmp_path, ending):
    path = tmp_path / "bad.conll"
    path.write_bytes(ending.join(["EU NNP B-ORG", "rejects VBZ O", "German B-MISC", "call NN O"]).encode())
    with pytest.raises(DataError) as err:
        read_conll(path)
    assert str(err.value) == (f"{path}: line 3: 2 columns, but line 1 has 3; every line of a CoNLL file is one "
                              "token and the same columns (token ... tag), sentences separated by a blank line")


@pytest.mark.parametrize("field, row, item", [
    ("tokens", {"tokens": ["EU", "caf\ud800"], "tags": ["B-ORG", "O"]}, 1),
    ("tokens", {"tokens": ["\udfff"], "tags": ["O"]}, 0),
    ("tags", {"tokens": ["EU", "x"], "tags": ["B-ORG", "B-\ud800"]}, 1),
])
def test_surrogates_inside_the_lists_are_a_one_line_error(tmp_path, field, row, item):
    path = tmp_path / "train.jsonl"
    good = json.dumps(SENTENCES[0])
    path.write_text(good + "\n" + json.dumps(row) + "\n")  # json.dumps writes the surrogate as a "\udXXX" escape
    with pytest.raises(DataError) as err:
        read_token_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line 2: '{field}' item {item}: unpaired surrogate U+D"), message
    assert message.splitlines() == [message]
    message.encode("utf-8")  # printable as it is


@pytest.mark.parametrize("tag", ["B-ORG\nX\nY", "B-OR G", "I-\x00", "B-\u2028PER", "B-ORG\t"])
def test_a_tag_with_a_control_character_or_space_is_refused_in_one_line(tmp_path, tag):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"tokens": ["EU", "x"], "tags": [tag, "O"]}) + "\n")
    with pytest.raises(DataError) as err:
        read_token_jsonl(path)
    message = str(err.value)
    assert message.splitlines() == [message]
    assert message.startswith(f"{path}: line 1: tag {tag!r} holds whitespace or a control character")


def test_the_train_file_error_for_a_bad_tag_is_one_line(tmp_path):
    rows = [{"tokens": ["EU", f"w{i}"], "tags": ["B-ORG", "O"]} for i in range(20)]
    rows[7]["tags"][0] = "B-ORG\nX"
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"line 8: tag 'B-ORG\\nX'") as err:
        load_token_data(DataConfig(train_file=str(path)))
    assert len(str(err.value).splitlines()) == 1
