"""Splits through a tokenizer: `tokenize_splits` / `encode_split` (classification texts and text pairs, token
classification's words), `tokenizer_key` (what decides how a tokenizer encodes), and `Encodings`, which tokenizes
each split once per tokenizer for every phase of a run.
"""

from __future__ import annotations

import hashlib
import json

from datasets import Dataset, DatasetDict

from kdistill.data.bundle import DataBundle
from kdistill.data.tags import encode_token_split


def tokenize_splits(bundle: DataBundle, tokenizer, max_length: int, splits: tuple[str, ...] | None = None
                    ) -> DatasetDict:
    """input_ids / attention_mask (/ token_type_ids) / labels per split (`splits`, default all), unpadded: batches
    pad dynamically.

    One tokenizer call per split, not `Dataset.map`: map fingerprints its function by pickling the tokenizer
    (about 1 s per split here, every run, for a cache we do not use)."""

    wanted = bundle.splits.keys() if splits is None else splits
    return DatasetDict({name: encode_split(bundle.splits[name], tokenizer, max_length) for name in wanted})


def encode_split(split: Dataset, tokenizer, max_length: int) -> Dataset:
    """One split's texts (and text pairs) through `tokenizer`, truncated to `max_length`, with its labels.

    User text is text: a literal "[SEP]" or "<|endoftext|>" in it is split into ordinary tokens
    (`split_special_tokens`), never read as the special token; texts without such strings encode as before."""
    if "tokens" in split.column_names:  # token classification: the default alignment (first sub-token)
        return encode_token_split(split, tokenizer, max_length)
    pair = list(split["text_pair"]) if "text_pair" in split.column_names else None
    enc = tokenizer(list(split["text"]), pair, truncation=True, max_length=max_length, split_special_tokens=True)
    return Dataset.from_dict({**enc, "labels": list(split["label"])})


def tokenizer_key(tokenizer) -> str:
    """What decides how `tokenizer` encodes text (vocabulary, normaliser, pre-tokenizer, special tokens), hashed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # (less the truncation and padding state, which each call sets anew)
        spec = json.dumps({k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
                          sort_keys=True)
    else:
        spec = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{spec}|{tokenizer.padding_side}|{tokenizer.truncation_side}".encode()).hexdigest()


class Encodings:
    """The splits of one run, each tokenized once per tokenizer and kept for every phase that reads them (the
    teacher's fine-tune, the student's initialisation and distillation, the baseline, the evaluation).

    A split is known by its content fingerprint (a DataBundle with transfer rows has another training split, and the
    same validation and test splits), a tokenizer by `tokenizer_key` (the same tokenizer loaded again from a saved
    model dir is the same)."""

    def __init__(self, max_length: int, label_all_subtokens: bool = False):
        self.max_length = max_length
        self.label_all_subtokens = label_all_subtokens
        """Token classification: the alignment of tags to sub-words (data.label_all_subtokens)."""
        self._encoded: dict[tuple[str, str], Dataset] = {}

    def __call__(self, bundle: DataBundle, tokenizer, splits: tuple[str, ...] = ("train", "validation")
                 ) -> DatasetDict:
        key = tokenizer_key(tokenizer)
        out = {}
        for name in splits:
            split = bundle.splits[name]
            if (key, split._fingerprint) not in self._encoded:
                self._encoded[key, split._fingerprint] = encode_token_split(
                    split, tokenizer, self.max_length, label_all_subtokens=self.label_all_subtokens,
                    label_names=bundle.scored_tags) if "tokens" in split.column_names \
                    else encode_split(split, tokenizer, self.max_length)
            out[name] = self._encoded[key, split._fingerprint]
        return DatasetDict(out)
