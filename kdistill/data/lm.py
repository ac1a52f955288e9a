"""Causal LM data: a corpus of documents split by document (`load_lm_corpus`), and token blocks (`LMBlocks`).

Documents come from a built-in dataset (its texts; labels are ignored) or from `data.train_file` (+ optional
`validation_file` / `test_file`), column `data.text_column`. They are split BY DOCUMENT with a seeded shuffle
(`data.test_fraction`, then `data.validation_fraction` of the rest), so no held-out text was seen in training. Each
split is then tokenised (no special tokens), documents joined with the tokenizer's EOS, and cut into blocks of
`data.block_size` tokens (`pack_blocks`); the last, shorter block is padded (attention mask 0), so the losses'
padding masks apply. In a block, position t predicts token t+1: `next_token_targets` gives the labels and the mask
of positions whose own token and next token are both real; every LM loss term and the perplexity count exactly
these positions. Two models with different tokenizers read the same text pieces instead (`text_blocks`,
`encode_blocks`). A special token's string in a document ("<|endoftext|>", "<s>") is text: it is split into
ordinary tokens (`split_special_tokens`), so only the EOS that `pack_blocks` puts between documents is one.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdistill.config import DataConfig
from kdistill.data.readers import read_table
from kdistill.data.registry import builtin_rows
from kdistill.data.splits import SPLITS, capped, document_split, normalise, remove_leaks
from kdistill.errors import DataError
from kdistill.tokenalign import byte_ends

log = logging.getLogger(__name__)


@dataclass
class LMCorpus:
    """Documents per split (train / validation / test), split by document."""

    docs: dict[str, list[str]]
    source: str
    leakage: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"source": self.source, "documents": {s: len(self.docs[s]) for s in SPLITS}, "leakage": self.leakage}


@dataclass
class LMBlocks:
    """Token blocks of one split: input_ids and attention_mask, both (N, L) int64. Packed documents
    (`pack_blocks`), or, for two models with different tokenizers, pieces of documents that each model tokenises
    on its own (`text_blocks`, `encode_blocks`): then `texts` holds each block's text and `ends` (N, L) int32 the
    byte where each token ends in it when it is an alignment boundary, else -1 (`tokenalign.byte_ends`)."""

    input_ids: Tensor
    attention_mask: Tensor
    texts: list[str] | None = None
    ends: Tensor | None = None
    prompt_lengths: Tensor | None = None
    """(N,) int64: rows that are a prompt followed by its response (task instruction), right-padded: the prompt's
    length in tokens; only the response is a target (`next_token_targets`). None: packed text, every token is."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batch(self, rows) -> dict[str, Tensor]:
        """input_ids, attention_mask (B, L) of `rows` (and prompt_length (B,) for prompt + response rows)."""
        out = {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}
        if self.prompt_lengths is not None:
            out["prompt_length"] = self.prompt_lengths[rows]
        return out


def _file_texts(path: str, column: str, key: str) -> list[str]:
    """The non-empty texts of `column` in a data file: the documents of a corpus (`key`: the recipe key)."""
    rows, unit = read_table(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if column not in rows[0]:
        raise DataError(f"{path}: column '{column}' not found (columns: {', '.join(map(str, rows[0]))}); "
                        f"set data.text_column")
    texts = []
    first = 2 if unit == "data row" else 1
    for i, row in enumerate(rows, first):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # an empty document adds nothing to a corpus
        if not isinstance(value, str):
            raise DataError(f"{path}: {'line' if unit == 'data row' else unit} {i}: column '{column}' is "
                            f"{type(value).__name__}, expected text ({key})")
        texts.append(value)
    if not texts:
        raise DataError(f"{path}: column '{column}' holds no text")
    return texts


def load_lm_corpus(cfg: DataConfig) -> LMCorpus:
    """Documents of the configured data, split train / validation / test by document (seeded)."""
    if cfg.train_file:
        docs, source = _file_texts(cfg.train_file, cfg.text_column, "data.train_file"), cfg.train_file
    else:  # a built-in dataset's train split: its texts are the corpus, its labels and test split are not used
        docs, source = [r["text"] for r in builtin_rows(cfg.dataset)["train"] if r["text"].strip()], cfg.dataset
    test = _file_texts(cfg.test_file, cfg.text_column, "data.test_file") if cfg.test_file else None
    val = _file_texts(cfg.validation_file, cfg.text_column, "data.validation_file") if cfg.validation_file else None

    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    docs = [docs[i] for i in order]
    if test is None:
        docs, test = document_split(docs, cfg.test_fraction)
    if val is None:
        docs, val = document_split(docs, cfg.validation_fraction)

    leakage = {"removed": cfg.drop_test_duplicates}
    splits = {"train": docs}
    for name, held in (("validation", val), ("test", test)):
        splits[name], leakage[f"{name}_docs_also_in_train"] = remove_leaks(docs, held, cfg.drop_test_duplicates,
                                                                           key=normalise)
    if leakage["test_docs_also_in_train"] or leakage["validation_docs_also_in_train"]:
        log.warning("%s: %d test and %d validation documents also appear in train; %s", source,
                    leakage["test_docs_also_in_train"], leakage["validation_docs_also_in_train"],
                    "removed" if cfg.drop_test_duplicates else "kept (perplexity will be optimistic)")
    for name in SPLITS:
        splits[name] = capped(splits[name], cfg.limit, source, name, empty="has no documents")
    return LMCorpus(splits, str(source), leakage)


def pad_id_of(tokenizer) -> int:
    """The id that pads a batch: the pad token, else EOS (GPT-style tokenizers ship none: padded positions are
    masked, so any id serves), else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def pack_blocks(texts: list[str], tokenizer, block_size: int) -> LMBlocks:
    """Tokenise documents, join them with EOS, cut into blocks of `block_size`; the last block is padded."""
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    for doc in encoded:
        ids.extend(doc)
        if sep is not None:
            ids.append(sep)
    if not ids:
        raise DataError("no tokens to pack: the documents tokenise to nothing")
    n = math.ceil(len(ids) / block_size)
    flat = torch.full((n * block_size,), pad_id_of(tokenizer), dtype=torch.long)
    flat[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(n * block_size, dtype=torch.long)
    mask[: len(ids)] = 1
    return LMBlocks(flat.view(n, block_size), mask.view(n, block_size))


def text_blocks(texts: list[str], tokenizer, block_size: int) -> list[str]:
    """Each document cut into pieces of `block_size` of `tokenizer`'s tokens: the text of every piece, from its
    first token's first character to its last token's last one, without the spaces at either end (a space between
    two pieces belongs to neither; a piece may start inside a word).
    Two models with different tokenizers read the same pieces (`encode_blocks`), so their outputs over a piece can
    be compared where their tokens end together; a piece never spans two documents, unlike `pack_blocks`."""
    pieces = []
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True,
                        verbose=False)
    for doc, offsets in zip(texts, encoded["offset_mapping"]):
        for a in range(0, len(offsets), block_size):
            span = offsets[a: a + block_size]
            piece = doc[span[0][0]: span[-1][1]].strip()  # (a Metaspace token may hold the space after a word)
            if piece and len(span) > 1:  # a piece of one token predicts nothing
                pieces.append(piece)
    if not pieces:
        raise DataError("no tokens to cut into blocks: the documents tokenise to nothing")
    return pieces


def encode_blocks(pieces: list[str], tokenizer, block_size: int | None = None) -> LMBlocks:
    """Tokenise each text piece (`text_blocks`) on its own, special tokens as the tokenizer adds them (a BOS where
    the model expects one), truncated to `block_size` and padded to the longest; with the token byte ends.

    A piece re-tokenised alone may give a token or two more than it had inside its document: those past
    `block_size` are cut (the cut end is never an alignment boundary, see `tokenalign.byte_ends`).
    """
    encoded = tokenizer(pieces, return_offsets_mapping=True, truncation=block_size is not None,
                        max_length=block_size, split_special_tokens=True, verbose=False)
    length = max(len(ids) for ids in encoded["input_ids"])
    ids = torch.full((len(pieces), length), pad_id_of(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(pieces), length), dtype=torch.long)
    ends = torch.full((len(pieces), length), -1, dtype=torch.int32)
    for b, (piece, row, offsets) in enumerate(zip(pieces, encoded["input_ids"], encoded["offset_mapping"])):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
        ends[b, : len(row)] = torch.tensor(byte_ends(piece, offsets), dtype=torch.int32)
    return LMBlocks(ids, mask, list(pieces), ends)


def next_token_targets(input_ids: Tensor, attention_mask: Tensor, prompt_length: int | Tensor = 0
                       ) -> tuple[Tensor, Tensor]:
    """labels (B, L): labels[:, t] = input_ids[:, t+1]; valid (B, L) bool: position t counts.

    A position counts when it and the next one are real tokens and the next one lies at or after the prompt:
    valid[b, t] = mask[b, t] ∧ mask[b, t+1] ∧ t + 1 ≥ P_b, with P_b = `prompt_length` (an int for every row: for
    generated continuations only the generated tokens are targets; or (B,) per row: an instruction row's prompt,
    so that only its response is learned and scored). The last position of a block predicts nothing.
    """
    mask = attention_mask.bool()
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    valid = torch.zeros_like(mask)
    valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    if isinstance(prompt_length, Tensor):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        valid &= positions.unsqueeze(0) + 1 >= prompt_length.to(input_ids.device).unsqueeze(1)
    elif prompt_length > 1:
        valid[:, : prompt_length - 1] = False
    return labels, valid


def target_window(valid: Tensor) -> slice:
    """The columns of `valid` (B, L) from the first to the last that holds a next-token target of any row: where a
    model must compute its (B, ·, V) logits (transformers' `logits_to_keep`) when prompts hold no targets."""
    columns = valid.any(0).nonzero().flatten()
    return slice(int(columns[0]), int(columns[-1]) + 1) if len(columns) else slice(0, valid.shape[1])
