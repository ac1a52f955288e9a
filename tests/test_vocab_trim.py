"""Vocabulary trimming (student.trim_vocab, kdistill.student.trim_vocabulary): text made of kept tokens reads the
same pieces and gives the same outputs; unseen words fall back to smaller pieces; special tokens, saving, predict
and ONNX export work on a trimmed dir; a run writes a smaller student and records its vocabulary."""

from __future__ import annotations

import json
import random

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import BertForMaskedLM, BertForSequenceClassification, BertTokenizer

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import DataBundle
from kdistill.deploy.export import export_model
from kdistill.deploy.predict import load_predictor
from kdistill.errors import ConfigError
from kdistill.features import Pooling
from kdistill.models import load_dir_tokenizer, load_model_dir, save_model
from kdistill.pipeline.encoder import learned_texts
from kdistill.student import trim_vocabulary
from kdistill.student.vocab import kept_token_ids
from kdistill.tokenization import SPECIAL_TOKENS, tokenizer_from_vocab
from tests.conftest import FILLER, KEYWORDS, make_toy_examples, tiny_bert_config
from tests.helpers import save_teacher_dir, tiny_encoder_dir, write_recipe, write_toy_csv

WORDS = sorted({w for ws in KEYWORDS.values() for w in ws} | set(FILLER))
PIECES = ["play", "##ing", "##er", "foot", "##ball", "un", "##seen", "zebra", "violin"]
CHARS = list("abcdefghijklmnopqrstuvwxyz.,")
VOCAB = list(dict.fromkeys(SPECIAL_TOKENS + WORDS + PIECES + CHARS + [f"##{c}" for c in CHARS]
                           + [f"[unused{i}]" for i in range(150)]))
"""A vocabulary with rows the toy task never reads: pieces of unseen words, and 150 tokens nothing tokenizes to."""

TRAIN = [r["text"] for r in make_toy_examples(60, seed=3)] + ["playing football today", "the coach says unseen ★"]
"""The texts the student learned from: toy news, two words in pieces, and a character the vocabulary lacks."""


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory):
    """The vocabulary as kdistill's own WordPiece over a vocab.txt (a BertProcessing post-processor)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return tokenizer_from_vocab(path, model_max_length=32)


@pytest.fixture(scope="module", params=["fast", "bert"])
def tokenizer(request, fast_tokenizer):
    """The vocabulary as kdistill's own WordPiece and as a BertTokenizer (a TemplateProcessing post-processor, as
    the built-in teachers save theirs)."""
    if request.param == "bert":
        return BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, model_max_length=32)
    return fast_tokenizer


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(tokenizer)).eval()


@pytest.fixture(scope="module")
def trimmed(classifier, tokenizer):
    return trim_vocabulary(classifier, tokenizer, TRAIN)


def pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of training words, other vocabulary words and random letter strings, in random order."""
    rng = random.Random(seed)
    seen = " ".join(TRAIN).split()
    return [" ".join(rng.choice([rng.choice(seen), rng.choice(WORDS + PIECES[::3]),
                                 "".join(rng.choices("abcdeilnorsty", k=rng.randint(1, 7)))])
                     for _ in range(rng.randint(1, 9))) for _ in range(n)]


def test_text_of_kept_tokens_splits_into_the_same_pieces(tokenizer, trimmed):
    model, small, info = trimmed
    keep = kept_token_ids(tokenizer, TRAIN)
    assert info["teacher"] == len(VOCAB) and info["student"] == len(keep) == len(small) < len(VOCAB) - 150
    old_to_new = {old: new for new, old in enumerate(keep)}
    checked = 0
    for text in TRAIN + random_texts(300):
        ids = tokenizer(text)["input_ids"]
        if not set(ids) <= set(keep):
            continue  # an unseen word in pieces that were dropped: it may split otherwise
        checked += 1
        assert pieces(small, text) == pieces(tokenizer, text), text
        assert small(text)["input_ids"] == [old_to_new[i] for i in ids], text
    assert checked > 200
    assert "[UNK]" in pieces(small, TRAIN[-1])  # ★: unknown before, unknown now


def test_unseen_words_fall_back_to_smaller_pieces(tokenizer, trimmed):
    _, small, _ = trimmed
    assert pieces(tokenizer, "player zebra")[1:-1] == ["play", "##er", "zebra"]
    assert pieces(small, "player zebra")[1:-1] == ["play", "##e", "##r", "z", "##e", "##b", "##r", "##a"]
    assert pieces(small, "violins")[1:-1] == list("v") + [f"##{c}" for c in "iolins"]
    assert pieces(small, "goal€") == pieces(tokenizer, "goal€") == ["[CLS]", "[UNK]", "[SEP]"]  # € never was


def test_special_tokens_pairs_padding_and_saving(tokenizer, trimmed, tmp_path):
    _, small, _ = trimmed
    vocab = small.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(5))  # the vocabulary's order: the specials first
    assert (small.pad_token_id, small.cls_token_id, small.sep_token_id) == (vocab["[PAD]"], vocab["[CLS]"],
                                                                              vocab["[SEP]"])
    pair = small("goal match", "vote law", return_token_type_ids=True)
    assert small.convert_ids_to_tokens(pair["input_ids"]) == \
        ["[CLS]", "goal", "match", "[SEP]", "vote", "law", "[SEP]"]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert set(small("goal")) == set(tokenizer("goal"))  # the same model inputs
    batch = small(["goal", "the big match today"], padding=True)
    assert batch["input_ids"][0][-1] == small.pad_token_id and batch["attention_mask"][0] == [1, 1, 1, 0, 0, 0]
    assert small.model_max_length == tokenizer.model_max_length == 32
    assert small.padding_side == tokenizer.padding_side
    small.save_pretrained(tmp_path)
    again = load_dir_tokenizer(tmp_path)
    assert again.get_vocab() == vocab
    assert again(["playing football", "player"])["input_ids"] == small(["playing football", "player"])["input_ids"]


def test_the_trimmed_classifier_computes_the_same_logits_on_kept_text(classifier, tokenizer, trimmed):
    model, small, info = trimmed
    keep = kept_token_ids(tokenizer, TRAIN)
    assert classifier.get_input_embeddings().num_embeddings == len(VOCAB)  # the input is left as it was
    assert model.config.vocab_size == model.get_input_embeddings().num_embeddings == len(keep)
    assert model.config.pad_token_id == small.pad_token_id
    assert torch.equal(model.get_input_embeddings().weight, classifier.get_input_embeddings().weight[keep])
    assert info["params_before"] - info["params_after"] == (len(VOCAB) - len(keep)) * 32
    texts = TRAIN[:8] + [t for t in random_texts(40, seed=1)
                         if set(tokenizer(t)["input_ids"]) <= set(keep)][:8]
    with torch.no_grad():
        before = classifier(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        after = model(**small(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_a_tied_output_layer_is_sliced_with_the_embeddings(tokenizer):
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config(tokenizer)).eval()
    model, small, _ = trim_vocabulary(mlm, tokenizer, TRAIN)
    keep = kept_token_ids(tokenizer, TRAIN)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        before = mlm(**tokenizer(TRAIN[:4], padding=True, return_tensors="pt")).logits
        after = model(**small(TRAIN[:4], padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(after, before[..., keep], rtol=1e-5, atol=1e-5)


def test_only_a_wordpiece_vocabulary_is_trimmed(bpe_tokenizer):
    with pytest.raises(ValueError, match="WordPiece"):
        kept_token_ids(bpe_tokenizer, ["a text"])


def test_a_trimmed_dir_predicts_and_exports_as_before(classifier, tokenizer, trimmed, tmp_path):
    model, small, _ = trimmed
    meta = {"task": "classification", "max_length": 16}
    full, cut = save_model(classifier, tokenizer, tmp_path / "full", meta), save_model(model, small, tmp_path / "cut",
                                                                                       meta)
    texts = [r["text"] for r in make_toy_examples(24, seed=7)]  # the training domain: its words, other sentences
    before = load_predictor(full, backend="torch").predict(texts)
    after = load_predictor(cut, backend="torch").predict(texts)
    assert [p["label"] for p in after] == [p["label"] for p in before]
    for a, b in zip(after, before):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    parity = export_model(cut, fmt="onnx", out_dir=tmp_path / "onnx", parity_texts=texts)
    assert parity["backends"]["onnx"]["max_abs_logit_diff"] <= 1e-3
    onnx = load_predictor(tmp_path / "onnx", backend="onnx").predict(texts)
    assert [p["label"] for p in onnx] == [p["label"] for p in before]


def test_pre_split_sentences_and_the_train_split_alone_are_read():
    fast = BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})
    ids = set(kept_token_ids(fast, [["zebras", "playing"], None]))  # token classification: words, pieces kept
    assert {fast.convert_tokens_to_ids(t) for t in ("zebra", "##s", "play", "##ing")} <= ids
    split = {"text": ["goal match"], "text_pair": ["violin"], "label": [0]}
    held = {"text": ["football"], "text_pair": ["unseen"], "label": [0]}
    data = DataBundle(DatasetDict(train=Dataset.from_dict(split), validation=Dataset.from_dict(held),
                                  test=Dataset.from_dict(held)), ["a"], "toy")
    assert learned_texts(data) == ["goal match", "violin"]  # never a held-out text


def test_a_run_with_trim_vocab_saves_a_smaller_student_and_records_it(fast_tokenizer, tmp_path):
    tokenizer = fast_tokenizer
    recipe = write_recipe(tmp_path / "toy.yaml", {
        "name": "toy",
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 45)), "max_length": 16},
        "teacher": {"path": str(save_teacher_dir(tmp_path / "teacher", tokenizer))},
        "student": {"layers": 2, "trim_vocab": True},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5}, "baseline": True},
        "train": {"max_steps": 2, "batch_size": 8},
        "eval": {"repeats": 1, "warmup": 0},
    })
    out = tmp_path / "run"
    main(["run", str(recipe), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    vocab = metrics["models"]["student"]["vocab"]
    student, student_tokenizer, meta = load_model_dir(out / "student")
    assert vocab["teacher"] == len(VOCAB) and vocab["student"] == len(student_tokenizer) < len(VOCAB) - 150
    assert meta["vocab"] == vocab and student.config.vocab_size == vocab["student"]
    assert metrics["models"]["student"]["params"] == vocab["params_after"] < vocab["params_before"]
    assert metrics["student_shape"]["student"]["params"] == vocab["params_after"]
    baseline, baseline_tokenizer, _ = load_model_dir(out / "baseline")  # the no-KD baseline keeps every token
    assert baseline.config.vocab_size == len(baseline_tokenizer) == len(VOCAB)
    assert "vocabulary trimmed" in (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("recipe", ["lm-depth", "instruct"])
def test_trim_vocab_is_for_the_encoder_tasks(recipe):
    with pytest.raises(ConfigError, match=r"student\.trim_vocab: trims the WordPiece vocabulary of classification "
                                          r"or token-classification or embedding students, not "):
        load_config(recipe, ["student.trim_vocab=true"])
    for encoder in (None, "ner", "embedding"):
        assert load_config(encoder, ["student.trim_vocab=true"]).student.trim_vocab


def test_an_embedding_run_trims_the_student_and_exports_it(fast_tokenizer, tmp_path):
    teacher = tiny_encoder_dir(tmp_path / "teacher", fast_tokenizer, Pooling("mean", True))
    recipe = write_recipe(tmp_path / "emb.yaml", {
        "name": "emb", "task": "embedding",
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 40)), "max_length": 16},
        "teacher": {"path": str(teacher)},
        "student": {"layers": 2, "trim_vocab": True},
        "distill": {"losses": {"pooled_mse": 1.0}},
        "train": {"max_steps": 2, "batch_size": 8},
        "eval": {"repeats": 1, "warmup": 0},
        "export": {"formats": ["onnx"]},  # its parity check runs on the trimmed student
    })
    out = tmp_path / "run"
    main(["run", str(recipe), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    vocab = metrics["models"]["student"]["vocab"]
    assert vocab["teacher"] == len(VOCAB) and vocab["student"] < len(VOCAB) - 150
    assert len(load_dir_tokenizer(out / "student")) == vocab["student"]
    assert len(load_dir_tokenizer(out / "baseline")) == len(VOCAB)  # the untrained control keeps every token
    assert metrics["exports"]["onnx"]["backends"]["onnx"]["max_abs_logit_diff"] <= 1e-3
