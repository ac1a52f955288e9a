"""Token classification (`task: token-classification`, NER): tags per word, aligned to sub-words, and transfer
sentences.

A sentence is a list of words (`tokens`) with one tag per word (`tags`, BIO / IOB2: B-TYPE starts an entity,
I-TYPE continues it, O is outside). `load_token_data` returns a DataBundle whose splits have the columns tokens
(list[str]) and tags (list[int], ids into the sorted tag names, `label_names`). `encode_token_split` aligns them to
sub-words through the fast tokenizer's word_ids: a word's tag goes on its first sub-token; the other sub-tokens,
the special tokens and the padding get -100 (UNLABELED), which every loss and metric ignores
(`data.label_all_subtokens: true`: every sub-token gets the word's tag, B- becoming I- after the first).

Transfer sentences (data.unlabeled_file): texts cut into sentences and words (`text_sentences`), less every text
that holds a held-out sentence (`transfer_sentences`).
"""

from __future__ import annotations

import re

from datasets import Dataset

from kdistill.data.labels import UNLABELED
from kdistill.data.splits import normalise
from kdistill.errors import DataError


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 (I- starts an entity unless it follows the same type; B- only between two adjacent entities) to IOB2
    (every entity starts with B-). IOB2 input comes back unchanged."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-"):
            prev = out[i - 1] if i else "O"
            if prev == "O" or prev[2:] != tag[2:]:
                tag = "B-" + tag[2:]
        out.append(tag)
    return out


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'“‘])|(?<=[。！？])")
"""Where a transfer text is split into sentences: after . ! ? followed by whitespace and an upper-case letter or a
quote (English), after 。！？ (Chinese, written without spaces)."""
TRANSFER_WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")
"""A word of a transfer sentence, close to CoNLL-2003's tokenisation: letters and digits, joined by inner - ' .
(`well-known`, `don't`, `U.S`), or one punctuation mark. A word with a CJK character becomes one word per
character, as in peoples-daily-ner."""
MIN_TRANSFER_WORDS = 3
"""Shorter transfer sentences (headings, list items, stray punctuation) are dropped."""


def text_sentences(text: str, max_words: int) -> list[list[str]]:
    """A text's sentences as words (SENTENCE_END, TRANSFER_WORD), each cut to `max_words` words, those shorter than
    MIN_TRANSFER_WORDS dropped."""
    out = []
    for sentence in SENTENCE_END.split(text):
        words = [piece for w in TRANSFER_WORD.findall(sentence)
                 for piece in (list(w) if any(_is_cjk(c) for c in w) else [w])]
        if len(words) >= MIN_TRANSFER_WORDS:
            out.append(words[:max_words])
    return out


def _sentence_key(words: list[str]) -> str:
    return normalise(join_words(words))


def transfer_sentences(texts: list[str], held_out: list[list[str]], max_words: int,
                       limit: int | None) -> tuple[list[dict], int]:
    """Token classification's transfer set: the sentences {"tokens"} of `texts` (text_sentences), the first `limit`,
    less every text that holds a held-out sentence (compared as joined words, case and spacing ignored: its tags
    would come from the teacher's view of a test sentence); and how many texts those were."""
    held = {_sentence_key(words) for words in held_out}
    out, leaks = [], 0
    for text in texts:
        sentences = text_sentences(text, max_words)
        if any(_sentence_key(words) in held for words in sentences):
            leaks += 1
        else:
            out += [{"tokens": words} for words in sentences]
    return out[:limit] if limit else out, leaks


def continuation_ids(label_names: list[str]) -> list[int]:
    """For each tag id, the id of the tag a later sub-token of the same word gets with `label_all_subtokens`:
    I-X for B-X (where I-X exists), itself otherwise."""
    ids = {n: i for i, n in enumerate(label_names)}
    return [ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(label_names)]


def align_tags(word_ids: list[int | None], tags: list[int], *, all_subtokens: bool = False,
               continuation: list[int] | None = None) -> list[int]:
    """One label per sub-token from one tag per word: the word's tag on its first sub-token, UNLABELED (-100) on
    special tokens and (unless `all_subtokens`) on the word's other sub-tokens; with `all_subtokens` those get
    `continuation[tag]` (B-X -> I-X)."""
    out, prev = [], None
    for w in word_ids:
        if w is None:
            out.append(UNLABELED)
        elif w != prev:
            out.append(tags[w])
        elif not all_subtokens:
            out.append(UNLABELED)
        else:  # (a transfer sentence's TRANSFER stays TRANSFER: it names no tag to continue)
            out.append(continuation[tags[w]] if continuation and tags[w] >= 0 else tags[w])
        prev = w
    return out


def encode_token_split(split: Dataset, tokenizer, max_length: int, *, label_all_subtokens: bool = False,
                       label_names: list[str] | None = None) -> Dataset:
    """One split's sentences (pre-split words) through a fast `tokenizer`, truncated to `max_length` sub-tokens,
    with `labels` aligned to the sub-tokens (`align_tags`). Words cut off by truncation are not scored. A word that
    spells a special token ("[SEP]") is an ordinary word (`split_special_tokens`), as at prediction."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("token classification needs a fast tokenizer (its word_ids align tags to sub-words)")
    enc = tokenizer(list(split["tokens"]), is_split_into_words=True, truncation=True, max_length=max_length,
                    split_special_tokens=True)
    continuation = continuation_ids(label_names) if label_all_subtokens and label_names else None
    labels = [align_tags(enc.word_ids(i), tags, all_subtokens=label_all_subtokens, continuation=continuation)
              for i, tags in enumerate(split["tags"])]
    return Dataset.from_dict({**enc, "labels": labels})


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef"


def join_words(words: list[str]) -> str:
    """A sentence's words as plain text: joined by single spaces, but without a space between two CJK characters
    (Chinese is written without spaces; character-level data has one character a word)."""
    out = ""
    for w in words:
        if out and not (_is_cjk(out[-1]) and _is_cjk(w[0])):
            out += " "
        out += w
    return out
