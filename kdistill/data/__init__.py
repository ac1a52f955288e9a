"""Data in: built-in datasets and users' files -> deterministic train/validation/test splits.

Classification (`load_data`): every split has the columns `text` (and `text_pair` for sentence pairs) and `label`
(int). Label names are sorted, so ids do not depend on file order or directory listing order, and they are saved
with every model.

Causal LM (`load_lm_corpus`, `pack_blocks`): documents come from a built-in dataset (its texts; labels are
ignored) or from `data.train_file` (+ optional `validation_file` / `test_file`), column `data.text_column`. They
are split BY DOCUMENT with a seeded shuffle (`data.test_fraction`, then `data.validation_fraction` of the rest), so
no held-out text was seen in training. Each split is then tokenised (no special tokens), documents joined with the
tokenizer's EOS, and cut into blocks of `data.block_size` tokens; the last, shorter block is padded (attention mask
0), so the losses' padding masks apply. In a block, position t predicts token t+1: `next_token_targets` gives the
labels and the mask of positions whose own token and next token are both real; every LM loss term and the
perplexity count exactly these positions.

Token classification (`load_token_data`): sentences of words with one BIO tag per word, aligned to sub-words by
`encode_token_split`.

All tasks share the leakage check (held-out texts that also occur in train, compared case- and spacing-insensitively,
are dropped: `data.drop_test_duplicates`) and `data.limit` (a cap per split).
Bad input raises `DataError` with one line naming the file, row and column.

The modules, each one job:
  registry   the built-in datasets (`DATASETS`, one `BuiltinDataset` each) and their lookups
  readers    users' files read into rows: CSV/TSV, JSON Lines, Parquet, Orange .tab, CoNLL, token JSON Lines
  labels     the UNLABELED / TRANSFER ids, and raw class labels checked and named
  splits     seeded held-out splits, the leakage check, data.limit
  bundle     `DataBundle`, `load_data`, `load_token_data`
  tags       token classification: IOB2, tags aligned to sub-words, transfer sentences
  encodings  splits through a tokenizer, once per tokenizer (`Encodings`)
  lm         causal LM: documents, packed or per-piece token blocks, next-token targets
  chat       instruction: chat rows (prompt -> response) read and encoded with a model's chat template
"""

import datasets

from kdistill.data.bundle import DataBundle, load_data, load_token_data
from kdistill.data.chat import ROLES, ChatExample, EncodedChat, encode_chat, read_chat_file
from kdistill.data.encodings import Encodings, encode_split, tokenize_splits, tokenizer_key
from kdistill.data.labels import TRANSFER, UNLABELED
from kdistill.data.lm import (
    LMBlocks,
    LMCorpus,
    encode_blocks,
    load_lm_corpus,
    next_token_targets,
    pack_blocks,
    pad_id_of,
    target_window,
    text_blocks,
)
from kdistill.data.readers import (
    PEOPLES_DAILY_TYPES,
    TOKEN_FILE_SUFFIXES,
    peoples_daily_sentence,
    read_conll,
    read_orange_tab,
    read_table,
    read_token_file,
    read_token_jsonl,
)
from kdistill.data.registry import (
    BUILTIN_DATASETS,
    DATASETS,
    SENTENCES,
    TEXTS,
    TOKEN_DATASETS,
    BuiltinDataset,
)
from kdistill.data.instructions import INSTRUCTION_DATASETS, InstructionData, list_datasets, load_instruction_data
from kdistill.data.splits import SPLITS, text_key
from kdistill.data.tags import (
    MIN_TRANSFER_WORDS,
    SENTENCE_END,
    TRANSFER_WORD,
    align_tags,
    continuation_ids,
    encode_token_split,
    join_words,
    text_sentences,
    to_iob2,
    transfer_sentences,
)

datasets.disable_progress_bars()  # its bars (loading from disk, relabelling a split) take a second and only add noise

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "MIN_TRANSFER_WORDS",
    "PEOPLES_DAILY_TYPES",
    "SENTENCE_END",
    "SPLITS",
    "TOKEN_DATASETS",
    "TOKEN_FILE_SUFFIXES",
    "TRANSFER",
    "TRANSFER_WORD",
    "UNLABELED",
    "BuiltinDataset", "SENTENCES", "TEXTS",
    "ROLES",
    "ChatExample",
    "DataBundle",
    "EncodedChat",
    "Encodings",
    "LMBlocks",
    "LMCorpus",
    "align_tags",
    "continuation_ids",
    "encode_blocks",
    "encode_chat",
    "encode_split",
    "encode_token_split",
    "join_words",
    "list_datasets",
    "INSTRUCTION_DATASETS",
    "InstructionData",
    "load_instruction_data",
    "load_data",
    "load_lm_corpus",
    "load_token_data",
    "next_token_targets",
    "pack_blocks",
    "pad_id_of",
    "peoples_daily_sentence",
    "read_chat_file",
    "read_conll",
    "read_orange_tab",
    "read_table",
    "read_token_file",
    "read_token_jsonl",
    "target_window",
    "text_blocks",
    "text_key",
    "text_sentences",
    "to_iob2",
    "tokenize_splits",
    "tokenizer_key",
    "transfer_sentences",
]
