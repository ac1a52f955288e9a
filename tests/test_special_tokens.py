"""User text is text: a literal "[SEP]", "[PAD]" or "<|endoftext|>" in it is split into ordinary tokens wherever
kdistill tokenizes user text (training splits, token classification, causal-LM blocks, every predictor), never read
as the special token; a text without such strings gets the ids it always got."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import BertForTokenClassification

from kdistill.data import encode_split, encode_token_split
from kdistill.data.lm import encode_blocks, pack_blocks, text_blocks
from kdistill.deploy.predict import load_predictor
from kdistill.models import save_model
from tests.conftest import make_toy_examples, tiny_bert_config

INJECTED = ["goal [SEP] match", "[CLS] vote [PAD] law [MASK]", "team[SEP]coach", "[sep] and [SEP]"]
TAGS = ["B-SPO", "O"]


def _normal_texts() -> list[str]:
    return [r["text"] for r in make_toy_examples(12)] + ["goals and chips, scored!", "big [ team ] report"]


def _special_ids(tokenizer) -> set[int]:
    """The ids a special string would give; less [UNK], which its ordinary pieces may well be."""
    return set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}


def _assert_only_framing_specials(ids: list[int], tokenizer) -> None:
    """[CLS] first and [SEP] last, as the tokenizer adds them; no special id in between."""
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id, ids
    assert not _special_ids(tokenizer) & set(ids[1:-1]), ids


def test_classification_split_reads_special_strings_as_text(tiny_tokenizer):
    split = Dataset.from_dict({"text": INJECTED, "label": [0] * len(INJECTED)})
    encoded = encode_split(split, tiny_tokenizer, 32)
    for ids in encoded["input_ids"]:
        _assert_only_framing_specials(ids, tiny_tokenizer)
    # "[SEP]" is the three pieces "[", "sep", "]" (unknown to this vocab: [UNK] each), as "[ sep ]" would be
    assert encoded["input_ids"][0] == tiny_tokenizer("goal [ sep ] match")["input_ids"]


def test_classification_split_of_normal_texts_keeps_its_ids(tiny_tokenizer):
    texts = _normal_texts()
    split = Dataset.from_dict({"text": texts, "label": [0] * len(texts)})
    assert encode_split(split, tiny_tokenizer, 32)["input_ids"] == tiny_tokenizer(
        texts, truncation=True, max_length=32)["input_ids"]
    pairs = Dataset.from_dict({"text": texts, "text_pair": texts[::-1], "label": [0] * len(texts)})
    assert encode_split(pairs, tiny_tokenizer, 32)["input_ids"] == tiny_tokenizer(
        texts, texts[::-1], truncation=True, max_length=32)["input_ids"]


def test_token_split_reads_special_strings_as_words(tiny_tokenizer):
    words = [["goal", "[SEP]", "match"], ["[PAD]", "vote"], ["team", "[CLS]"]]
    split = Dataset.from_dict({"tokens": words, "tags": [[1] * len(w) for w in words]})
    encoded = encode_token_split(split, tiny_tokenizer, 32)
    for ids, labels, w in zip(encoded["input_ids"], encoded["labels"], words):
        _assert_only_framing_specials(ids, tiny_tokenizer)
        assert sum(label != -100 for label in labels) == len(w)  # each word, "[SEP]" too, keeps its tag

    normal = [s.split() for s in _normal_texts()]
    split = Dataset.from_dict({"tokens": normal, "tags": [[1] * len(w) for w in normal]})
    assert encode_token_split(split, tiny_tokenizer, 32)["input_ids"] == tiny_tokenizer(
        normal, is_split_into_words=True, truncation=True, max_length=32)["input_ids"]


def test_lm_blocks_read_the_eos_string_as_text(bpe_tokenizer, docs):
    eos = bpe_tokenizer.eos_token_id
    injected = ["The team won <|endoftext|> the vote.", "Story: <|endoftext|><|endoftext|> said."]
    blocks = pack_blocks(injected, bpe_tokenizer, 16)
    real = blocks.input_ids[blocks.attention_mask.bool()].tolist()
    assert real.count(eos) == len(injected)  # only the one pack_blocks puts after each document
    pieces = text_blocks(injected, bpe_tokenizer, 8)
    encoded = encode_blocks(pieces, bpe_tokenizer, 8)
    assert not (encoded.input_ids[encoded.attention_mask.bool()] == eos).any()

    # documents without the string: the ids are those of a plain call
    plain = bpe_tokenizer(docs[:10], add_special_tokens=False)["input_ids"]
    expected = [i for doc in plain for i in doc + [eos]]
    blocks = pack_blocks(docs[:10], bpe_tokenizer, 16)
    assert blocks.input_ids[blocks.attention_mask.bool()].tolist() == expected
    pieces = text_blocks(docs[:10], bpe_tokenizer, 8)
    assert pieces == _text_blocks_by_plain_call(docs[:10], bpe_tokenizer, 8)
    assert encode_blocks(pieces, bpe_tokenizer, 8).input_ids.tolist() == _padded(
        bpe_tokenizer(pieces, truncation=True, max_length=8)["input_ids"], eos)


def _text_blocks_by_plain_call(texts, tokenizer, block_size):
    out = []
    for doc, offsets in zip(texts, tokenizer(texts, add_special_tokens=False,
                                             return_offsets_mapping=True)["offset_mapping"]):
        for a in range(0, len(offsets), block_size):
            span = offsets[a: a + block_size]
            piece = doc[span[0][0]: span[-1][1]].strip()
            if piece and len(span) > 1:
                out.append(piece)
    return out


def _padded(rows, pad):
    length = max(map(len, rows))
    return [row + [pad] * (length - len(row)) for row in rows]


def test_predictor_reads_special_strings_as_text(tiny_bert_dir, tiny_tokenizer):
    predictor = load_predictor(tiny_bert_dir, backend="torch")
    batch, _ = predictor.encode(INJECTED)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        _assert_only_framing_specials(ids[mask.astype(bool)].tolist(), tiny_tokenizer)
    texts = _normal_texts()
    batch, _ = predictor.encode(texts)
    expected = tiny_tokenizer(texts, padding=True, truncation=True, max_length=predictor.max_length)["input_ids"]
    assert batch["input_ids"].tolist() == expected


@pytest.fixture(scope="module")
def all_b_token_dir(tmp_path_factory, tiny_tokenizer):
    """A token classifier that tags every token B-SPO: each word it sees is an entity of its own."""
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config(tiny_tokenizer, num_labels=2, id2label=dict(enumerate(TAGS)),
                                                        label2id={t: i for i, t in enumerate(TAGS)}))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, -5.0]))
    return save_model(model.eval(), tiny_tokenizer, tmp_path_factory.mktemp("all_b") / "model",
                      {"task": "token-classification", "max_length": 32})


def test_token_predictor_finds_no_entity_made_of_a_special_token(all_b_token_dir, tiny_tokenizer):
    predictor = load_predictor(all_b_token_dir, backend="torch")
    text = "goal [SEP] match"
    entities = predictor.predict([text])[0]["entities"]
    assert "[SEP]" not in [e["text"] for e in entities]
    assert [e["text"] for e in entities] == ["goal", "[", "SEP", "]", "match"]  # ordinary words, every one
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)
    batch, _, _, _ = predictor.encode_tokens([text])
    _assert_only_framing_specials(batch["input_ids"][0].tolist(), tiny_tokenizer)
    # a text without special strings: the ids of a plain call
    normal = _normal_texts()
    batch, _, _, _ = predictor.encode_tokens(normal)
    assert np.array_equal(batch["input_ids"], tiny_tokenizer(normal, padding=True, truncation=True, max_length=32,
                                                             return_tensors="np")["input_ids"])
