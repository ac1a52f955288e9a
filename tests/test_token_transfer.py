"""Hinton's transfer set for token classification (data.unlabeled_file): texts split into sentences and words, the
student learns the teacher's soft tag of every word (label TRANSFER: `kd` counts it, `ce` does not), the teacher and
the no-KD baseline never see them, and no text holding a test or validation sentence gets through."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

import kdistill.data as data_module
import kdistill.pipeline
import kdistill.pipeline.distillation as pipeline
import kdistill.teacher as teacher_stage
from kdistill.config import TrainConfig, load_config, validate_config
from kdistill.data import (
    TRANSFER,
    UNLABELED,
    encode_token_split,
    load_token_data,
    text_sentences,
    transfer_sentences,
)
from kdistill.engine import backward_group
from kdistill.errors import ConfigError
from kdistill.features import Features, capture
from kdistill.models import save_model
from kdistill.terms import TermSpec, compute_terms
from kdistill.training import batch_units, make_accelerator
from tests.test_token_classification import _token_batch, tiny_token_model, toy_sentences, write_conll

# --------------------------------------------------------------------------------------- sentences, words


def test_english_text_splits_at_sentence_ends_into_conll_like_words():
    text = ('The U.S. team won 3-1 in Paris. Coach said "Don\'t worry." "Next season" starts in May! '
            'Ok. See you at the e.g. meeting? yes, at noon.')
    assert text_sentences(text, max_words=64) == [
        ["The", "U.S", ".", "team", "won", "3-1", "in", "Paris", "."],
        # no end after `worry."`: the full stop is followed by a quote, not by whitespace
        ["Coach", "said", '"', "Don't", "worry", ".", '"', '"', "Next", "season", '"', "starts", "in", "May", "!"],
        # "Ok." has 2 words: dropped; "?" before a lower-case word ends no sentence
        ["See", "you", "at", "the", "e.g", ".", "meeting", "?", "yes", ",", "at", "noon", "."],
    ]
    assert text_sentences("One two three four five.", max_words=3) == [["One", "two", "three"]]


def test_chinese_text_is_one_word_per_character_and_splits_after_its_full_stops():
    assert text_sentences("新华社北京电。中国队在２０２４年获胜！好", max_words=64) == [
        list("新华社北京电。"), list("中国队在２０２４年获胜！")]  # "好": one word, dropped


def test_a_text_holding_a_held_out_sentence_is_dropped_and_counted():
    held = [["EU", "rejects", "German", "call", "."]]
    texts = ["Peter Blackburn met them.  EU REJECTS  german call.", "Fischler proposed it. Britain refused."]
    out, leaks = transfer_sentences(texts, held, max_words=64, limit=None)
    assert leaks == 1
    assert out == [{"tokens": ["Fischler", "proposed", "it", "."]}, {"tokens": ["Britain", "refused", "."]}]


def test_load_token_data_reads_transfer_sentences_from_a_file_or_a_builtin(tmp_path, monkeypatch):
    train = write_conll(tmp_path / "train.conll", toy_sentences(20, seed=1))
    test_sentences = toy_sentences(6, seed=2)
    test = write_conll(tmp_path / "test.conll", test_sentences)
    unlabeled = tmp_path / "more.jsonl"
    rows = [{"text": "goal match win today. Team coach scored again."},
            {"text": "Intro here now. " + " ".join(test_sentences[0]["tokens"]).capitalize()}]  # a test sentence
    unlabeled.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = dict(train_file=str(train), test_file=str(test), unlabeled_file=str(unlabeled))
    bundle = load_token_data(validate_config({"task": "token-classification", "data": cfg}).data)
    assert bundle.unlabeled == [{"tokens": ["goal", "match", "win", "today", "."]},
                                {"tokens": ["Team", "coach", "scored", "again", "."]}]
    assert bundle.leakage["unlabeled_texts_also_held_out"] == 1
    assert all(TRANSFER not in tags for split in bundle.splits.values() for tags in split["tags"])

    monkeypatch.setitem(data_module.DATASETS, "bbc-news", data_module.BuiltinDataset(
        "bbc-news", "stand-in", data_module.TEXTS,
        lambda: {"train": [{"text": "Shares rose sharply. Banks gained most.", "label": "business"}],
                 "test": [{"text": "Rain fell all day.", "label": "weather"}]}))
    builtin = load_token_data(validate_config({"task": "token-classification",
                                               "data": {**cfg, "unlabeled_file": "bbc-news"}}).data)
    assert [r["tokens"] for r in builtin.unlabeled] == [["Shares", "rose", "sharply", "."],
                                                        ["Banks", "gained", "most", "."], ["Rain", "fell", "all",
                                                                                          "day", "."]]


def test_transfer_words_are_scored_on_their_first_sub_token(tiny_tokenizer):
    split = Dataset.from_dict({"tokens": [["goals", "team"]], "tags": [[TRANSFER, TRANSFER]]})
    first = encode_token_split(split, tiny_tokenizer, 32)["labels"][0]  # [CLS] goal ##s team [SEP]
    assert first == [UNLABELED, TRANSFER, UNLABELED, TRANSFER, UNLABELED]
    every = encode_token_split(split, tiny_tokenizer, 32, label_all_subtokens=True, label_names=["B-X", "I-X", "O"])
    assert every["labels"][0] == [UNLABELED, TRANSFER, TRANSFER, TRANSFER, UNLABELED]


# ------------------------------------------------------------------------------------------- loss terms


def test_kd_counts_transfer_tokens_and_ce_does_not():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3)
    labels = torch.tensor([[UNLABELED, 2, TRANSFER, UNLABELED], [TRANSFER, TRANSFER, 0, UNLABELED]])
    feats = Features(logits=logits, attention_mask=torch.ones(2, 4, dtype=torch.long))
    out = compute_terms(TermSpec({"kd": 1.0, "ce": 1.0}, []), feats, feats, labels, temperature=2.0,
                        task="token-classification")
    assert float(out["kd"][0]) == pytest.approx(0.0, abs=1e-6) and int(out["kd"][1]) == 5  # 2 gold + 3 transfer
    log_p = logits.log_softmax(-1)
    assert int(out["ce"][1]) == 2
    assert float(out["ce"][0]) == pytest.approx(float(-log_p[0, 1, 2] - log_p[1, 2, 0]), rel=1e-6)
    units = batch_units({"attention_mask": feats.attention_mask, "labels": labels})
    assert (float(units["labeled"]), float(units["scored"])) == (2.0, 5.0)
    teacher = Features(logits=logits + torch.tensor([0.0, 1.0, 0.0]), attention_mask=feats.attention_mask)
    kd = compute_terms(TermSpec({"kd": 1.0}, []), feats, teacher, labels, temperature=1.0,
                       task="token-classification")["kd"]
    counted = labels != UNLABELED
    p_t = teacher.logits.softmax(-1)
    ref = (p_t * (p_t.log() - log_p)).sum(-1)[counted].sum()  # the shift changes the distribution: kd > 0
    assert float(kd[0]) == pytest.approx(float(ref), rel=1e-5) and float(ref) > 0


def test_grad_accumulation_with_a_transfer_micro_batch_matches_one_big_batch(tiny_tokenizer):
    """The second micro-batch is transfer sentences (TRANSFER tags only): kd is normalised over the scored tokens,
    ce over the gold ones, of the whole step, so two micro-batches give one batch's loss and gradients."""
    big = _token_batch(tiny_tokenizer, toy_sentences(4, seed=5))
    labels = big["labels"]
    labels[2:] = torch.where(labels[2:] >= 0, TRANSFER, labels[2:])
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    assert (halves[1]["labels"] >= 0).sum() == 0 and (halves[1]["labels"] == TRANSFER).sum() > 0
    teacher = tiny_token_model(tiny_tokenizer, seed=1).double().eval()
    spec = TermSpec({"kd": 1.0, "ce": 0.5, "hidden_mse": 0.1}, [(1, 2), (2, 4)])
    accelerator = make_accelerator(TrainConfig())
    results = []
    for group in ([big], halves):
        student = tiny_token_model(tiny_tokenizer, layers=2, seed=2).double().eval()  # eval: no dropout

        def terms_of(batch):
            batch = dict(batch)
            labels = batch.pop("labels")
            t = capture(teacher, batch, hidden_states=True)
            s = capture(student, batch, hidden_states=True)
            return [(compute_terms(spec, s, t, labels, temperature=2.0, task="token-classification"), spec.active)]

        logged = {}
        backward_group(accelerator, [dict(b) for b in group], terms_of, [logged], task="token-classification")
        results.append((logged, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (one, g_one), (two, g_two) = results
    assert set(one) >= {"kd", "ce"}
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-6)
    for a, b in zip(g_one, g_two):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------ config


def test_config_takes_unlabeled_file_for_token_classification_and_refuses_augment():
    base = {"task": "token-classification", "data": {"train_file": "x.conll", "unlabeled_file": "more.jsonl"}}
    assert validate_config(base).data.unlabeled_file == "more.jsonl"
    with pytest.raises(ConfigError, match=r"data\.augment works with task classification only"):
        validate_config({**base, "data": {"train_file": "x.conll", "augment": {"multiplier": 2}}})
    with pytest.raises(ConfigError, match=r"data\.unlabeled_file: .*explicit.*not mutual"):
        validate_config({**base, "distill": {"strategy": "mutual"}})


# ------------------------------------------------------------------------------------------- tiny run


def test_transfer_sentences_reach_the_student_only(tmp_path, tiny_tokenizer, monkeypatch):
    teacher_dir = tmp_path / "teacher-init"
    save_model(tiny_token_model(tiny_tokenizer), tiny_tokenizer, teacher_dir, {"task": "token-classification"})
    train = write_conll(tmp_path / "train.conll", toy_sentences(24, seed=1))
    test = write_conll(tmp_path / "test.conll", toy_sentences(8, seed=2))
    unlabeled = tmp_path / "more.csv"
    unlabeled.write_text("text\ngoal match win today. Team coach scored again. Ok\nThe player scored a goal!\n",
                         encoding="utf-8")
    recipe = tmp_path / "ner.yaml"
    recipe.write_text(json.dumps({
        "name": "tiny-ner-transfer", "task": "token-classification",
        "data": {"train_file": str(train), "test_file": str(test), "unlabeled_file": str(unlabeled),
                 "max_length": 32},
        "teacher": {"model": str(teacher_dir), "epochs": 1, "batch_size": 8},
        "student": {"layers": 2},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5}, "baseline": True},
        "train": {"epochs": 1, "batch_size": 8},
        "eval": {"repeats": 1, "warmup": 0},
        "export": {"formats": []},
    }), encoding="utf-8")
    seen = {}  # each phase's training labels, as its loop receives them
    original = teacher_stage.distill_explicit

    def spy(phase, **kw):
        seen[phase.name] = list(phase.data["train"]["labels"])
        return original(phase, **kw)

    monkeypatch.setattr(teacher_stage, "distill_explicit", spy)  # the teacher and the no-KD baseline
    monkeypatch.setattr(pipeline, "distill_explicit", spy)  # the student
    run_dir = kdistill.pipeline.run(load_config(recipe, []), tmp_path / "run")

    def transfer_rows(rows):
        return [r for r in rows if TRANSFER in r]

    assert seen["teacher"] == seen["baseline"] and not transfer_rows(seen["teacher"])
    student = seen["student"]
    assert student[:len(seen["teacher"])] == seen["teacher"]
    extra = student[len(seen["teacher"]):]
    # 3 sentences ("Ok", one word, is dropped): goal match win today . / Team coach scored again . / The ... !
    assert [sum(y == TRANSFER for y in r) for r in extra] == [5, 5, 6]
    assert all(y in (TRANSFER, UNLABELED) for r in extra for y in r)
    summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["data"]
    assert summary["transfer_sentences"] == 3 and summary["leakage"]["unlabeled_texts_also_held_out"] == 0
