"""Transfer sets: unlabeled rows the student learns the teacher's soft targets on, and the teacher and the no-KD
baseline never see (data.unlabeled_file, data.augment).

Augmentation follows TinyBERT's data augmentation (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural
Language Understanding", Sec. 3.1 and Algorithm 1): each word is, with probability p_t, replaced by one of its K
nearest candidates, and every training text yields N new ones. Where we differ: TinyBERT draws the candidates of a
single-piece word from BERT's masked-LM predictions and those of a multi-piece word from GloVe neighbours; our
teachers are classifiers without an MLM head, and nothing outside the run is downloaded, so the candidates are the
nearest whole-word tokens in the teacher's own input-embedding space (cosine), and multi-piece words are kept as
they are. Augmented texts equal to a test or validation text are dropped and counted, and so are texts that come out
unchanged or twice.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import replace

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets

from kdistill.config import AugmentConfig, DataConfig
from kdistill.data import TRANSFER, UNLABELED, DataBundle, text_key

log = logging.getLogger(__name__)

WORD = re.compile(r"\w+")
"""What counts as a word: replaced in place, so spacing and punctuation around it stay as written."""


def whole_word_tokens(tokenizer) -> dict[int, str]:
    """Token id -> word, for the tokens that spell a word on their own: alphabetic, and a word the tokenizer turns
    back into that one token (not a continuation piece such as WordPiece's `##ing`, not a special token)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    words = [tokenizer.decode([i]).strip() for i in ids]
    candidates = [(i, w) for i, w in zip(ids, words) if w.isalpha()]
    encoded = tokenizer([w for _, w in candidates], add_special_tokens=False)["input_ids"]
    return {i: w for (i, w), enc in zip(candidates, encoded) if enc == [i]}


def neighbours(embeddings: torch.Tensor, queries: list[int], pool: list[int], k: int,
               chunk: int = 1024) -> dict[int, list[int]]:
    """The k ids of `pool` nearest to each id of `queries` by cosine in `embeddings` (V, H), the query excluded."""
    table = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
    pool_ids = torch.tensor(pool)
    pool_vectors = table[pool_ids]
    k = min(k, len(pool) - 1)
    out = {}
    for start in range(0, len(queries), chunk):
        q = torch.tensor(queries[start:start + chunk])
        sims = table[q] @ pool_vectors.T  # (chunk, P)
        sims[pool_ids.unsqueeze(0) == q.unsqueeze(1)] = -float("inf")  # a word is not its own replacement
        top = sims.topk(k, dim=-1).indices
        out.update({int(i): pool_ids[row].tolist() for i, row in zip(q, top)})
    return out


def augment_texts(texts: list[str], teacher, tokenizer, cfg: AugmentConfig) -> list[list[str]]:
    """cfg.multiplier variants of each text (TinyBERT word replacement, see the module doc), deterministic from
    cfg.seed, the teacher's embeddings and the texts; a variant may equal its text or another variant."""
    words = whole_word_tokens(tokenizer)
    distinct = sorted({w for text in texts for w in WORD.findall(text)})
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"] if distinct else []
    word_id = {w: enc[0] for w, enc in zip(distinct, encoded) if len(enc) == 1 and enc[0] in words}
    near = neighbours(teacher.get_input_embeddings().weight, sorted(set(word_id.values())), sorted(words),
                      cfg.candidates) if word_id and len(words) > 1 else {}
    rng = random.Random(cfg.seed)

    def replace_word(match: re.Match) -> str:
        word = match.group()
        if word not in word_id or rng.random() >= cfg.replace_prob:
            return word
        new = words[rng.choice(near[word_id[word]])]
        return new.capitalize() if word[0].isupper() and word[1:].islower() else new

    return [[WORD.sub(replace_word, text) for _ in range(cfg.multiplier)] for text in texts]


def augment_rows(rows: list[dict], teacher, tokenizer, cfg: AugmentConfig,
                 held_out: list[dict]) -> tuple[list[dict], dict]:
    """New unlabeled rows from `rows` (text, [text_pair]): none equal to a held-out text, to a row or to each other;
    and the counts of what was made and dropped."""
    fields = [f for f in ("text", "text_pair") if f in rows[0]] if rows else []
    variants = {f: augment_texts([r[f] for r in rows], teacher, tokenizer, cfg) for f in fields}
    held = {text_key(r) for r in held_out}
    seen = {text_key(r) for r in rows}
    out, dropped_held_out, dropped_same = [], 0, 0
    for i in range(len(rows)):
        for k in range(cfg.multiplier):
            row = {f: variants[f][i][k] for f in fields}
            key = text_key(row)
            if key in held:
                dropped_held_out += 1
            elif key in seen:
                dropped_same += 1
            else:
                seen.add(key)
                out.append(row)
    return out, {"augmented": len(out), "augmented_equal_to_held_out_dropped": dropped_held_out,
                 "augmented_unchanged_or_repeated_dropped": dropped_same}


def with_transfer(data: DataBundle, cfg: DataConfig, teacher, tokenizer) -> DataBundle:
    """The student's data: `data` with data.unlabeled_file's rows and (data.augment) augmented training texts
    appended to the train split as unlabeled rows (label UNLABELED: the `ce` term skips them, the soft-target terms
    read them; the explicit strategy's teacher cache labels them once). Token classification: the transfer sentences
    with the tag TRANSFER on every word (scored by `kd`, skipped by `ce`). `data` itself is left as it is, for the
    teacher and the no-KD baseline."""
    rows, counts = list(data.unlabeled), {}
    if cfg.augment:
        train = data.splits["train"]
        held = [r for split in ("validation", "test") for r in data.splits[split].to_list()]
        made, counts = augment_rows(train.remove_columns("label").to_list(), teacher, tokenizer, cfg.augment, held)
        log.info("augment: %d new texts from %d training texts (%s)", len(made), len(train),
                 ", ".join(f"{k} {v}" for k, v in counts.items() if k != "augmented"))
        rows += made
    if not rows:
        return data
    train = data.splits["train"]
    if "tags" in train.column_names:
        columns = {"tokens": [r["tokens"] for r in rows], "tags": [[TRANSFER] * len(r["tokens"]) for r in rows]}
    else:
        columns = {f: [r[f] for r in rows] for f in train.column_names if f != "label"}
        columns["label"] = [UNLABELED] * len(rows)
    extra = Dataset.from_dict(columns, features=train.features)
    splits = DatasetDict({**data.splits, "train": concatenate_datasets([train, extra])})
    return replace(data, splits=splits, leakage={**data.leakage, **counts})
