"""Shared fixtures: a tiny tokenizer, a tiny random BERT classifier saved as a model dir, and toy data.

The toy task is learnable from words alone (each class has its own keywords), so a few dozen steps move accuracy.
"""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from kdistill.tokenization import SPECIAL_TOKENS, tokenizer_from_vocab

# Tiny models on a shared 2-core machine: one thread is 10x faster than two fighting over the cores.
torch.set_num_threads(1)

# tests/helpers.py asserts too (check_run, assert_same_steps): the same detailed messages as in a test module.
pytest.register_assert_rewrite("tests.helpers")

LABELS = ["sport", "tech", "politics"]
KEYWORDS = {
    "sport": ["goal", "match", "team", "coach", "league", "score"],
    "tech": ["chip", "software", "phone", "robot", "network", "data"],
    "politics": ["vote", "minister", "party", "law", "election", "senate"],
}
FILLER = ["the", "a", "today", "new", "big", "report", "says", "after", "week", "people", "city", "year"]


def make_toy_examples(n: int, seed: int = 0) -> list[dict]:
    """n short texts whose label is given by the keywords they contain, classes balanced."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.sample(KEYWORDS[label], 2) + rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def toy_examples() -> list[dict]:
    return make_toy_examples(90)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A WordPiece over a fixed vocab (every toy word whole): the same ids in every run, unlike a trained one."""
    words = sorted({w for ws in KEYWORDS.values() for w in ws} | set(FILLER))
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + words + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]))
    return tokenizer_from_vocab(vocab, model_max_length=32)


def tiny_bert_config(tokenizer, **overrides) -> BertConfig:
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    return BertConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer):
    """A saved, randomly initialised 4-layer BERT classifier (hidden 32) with its tokenizer and label names."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer)).eval()
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A saved random 4-layer teacher whose label ids follow the data's (sorted) label names, as teacher.path needs."""
    # not at the top: tests.helpers imports this module
    from tests.helpers import save_teacher_dir

    return save_teacher_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer)


# ------------------------------------------------------------------------------ causal LM: toy news, tiny GPT-2

SUBJECTS = ["the minister", "the team", "the company", "a new phone", "the coach", "the market", "the court"]
VERBS = ["said", "won", "lost", "announced", "rejected", "reported", "expects"]
OBJECTS = ["a big deal", "the final match", "record profits", "new rules", "the vote", "higher prices", "an appeal"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(rng.randint(3, 6))]
        docs.append(f"Story {i}: " + " ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs(60)


@pytest.fixture(scope="session")
def bpe_tokenizer(docs):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the toy corpus, EOS = <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=64)


def tiny_gpt2(tokenizer, layers: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=layers, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(autouse=True)
def own_teacher_logits_store(tmp_path_factory, monkeypatch):
    """Each test starts with an empty store of teacher logits (cache.logits_cache_root): logits one test stored
    never stand in for a teacher whose calls another test counts."""
    root = tmp_path_factory.mktemp("teacher-logits")
    monkeypatch.setattr("kdistill.strategies.explicit.logits_cache_root", lambda: root)
    return root
