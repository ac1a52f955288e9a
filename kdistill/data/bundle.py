"""A task's data, split: `DataBundle` (train / validation / test, label names, source, what the leakage check
removed, the transfer rows of data.unlabeled_file), read by `load_data` (classification) and `load_token_data`
(token classification).

Classification: every split has the columns `text` (and `text_pair` for sentence pairs) and `label` (int). Label
names are sorted, so ids do not depend on file order or directory listing order, and they are saved with every
model. Token classification: the columns `tokens` and `tags` (kdistill.data.tags).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

from seqeval.metrics.sequence_labeling import get_entities

from kdistill.config import DataConfig
from kdistill.data.labels import TRANSFER, UNLABELED, class_labels, label_names
from kdistill.data.readers import read_table, read_token_file, show
from kdistill.data.registry import TOKEN_DATASETS, builtin_rows, builtin_texts, is_builtin_source
from kdistill.data.splits import (
    SPLITS,
    capped,
    remove_leaks,
    sample,
    sentence_split,
    stratified_split,
    without_held_out,
)
from kdistill.data.tags import MIN_TRANSFER_WORDS, transfer_sentences
from kdistill.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    splits: DatasetDict
    """train / validation / test, columns: text, [text_pair], label (int)."""
    label_names: list[str]
    source: str
    leakage: dict = field(default_factory=dict)
    """Texts shared between train and the held-out splits, found and removed."""
    unlabeled: list[dict] = field(default_factory=list)
    """data.unlabeled_file's rows (text, [text_pair]; token classification: sentences {"tokens"}), none of them a
    held-out text: the student's transfer rows (augment.with_transfer), kept out of `splits` so that the teacher and
    the no-KD baseline never see them."""
    test_only_tags: list[str] = field(default_factory=list)
    """Token classification: test tags that training never saw, ids len(label_names) on in the test split; no
    model predicts them, so their entities score as misses (`scored_tags`)."""

    @property
    def scored_tags(self) -> list[str]:
        """The names of every tag id of the test split: the model's tags, then the test-only ones."""
        return self.label_names + self.test_only_tags

    @property
    def has_pair(self) -> bool:
        return "text_pair" in self.splits["train"].column_names

    def summary(self) -> dict:
        return {
            "source": self.source,
            "labels": self.label_names,
            "sizes": {s: len(self.splits[s]) for s in SPLITS},
            "unlabeled_train": sum(1 for y in self.splits["train"]["label"] if y == UNLABELED)
            if "label" in self.splits["train"].column_names else 0,
            "leakage": self.leakage,
            **({"test_only_tags": self.test_only_tags} if self.test_only_tags else {}),
            "unlabeled_file_rows": len(self.unlabeled),
            "transfer_sentences": sum(1 for tags in self.splits["train"]["tags"] if tags and tags[0] == TRANSFER)
            if "tags" in self.splits["train"].column_names else 0,
        }


def _select_columns(rows: list[dict], cfg: DataConfig, source: str, unit: str) -> list[dict]:
    if not rows:
        raise DataError(f"{source}: no rows")
    columns = list(rows[0].keys())
    wanted = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
    if cfg.text_pair_column:
        wanted.append(("data.text_pair_column", cfg.text_pair_column))
    for key, col in wanted:
        if col not in columns:
            raise DataError(f"{source}: column '{show(col)}' not found (columns: {', '.join(map(show, columns))}); "
                            f"set {key}")
    out = []
    # CSV rows are numbered from 2: line 1 is the header.
    first = 2 if unit == "data row" else 1
    unit = "line" if unit == "data row" else unit
    for i, row in enumerate(rows, first):
        where = f"{source}: {unit} {i}"
        item = {"text": _text(row.get(cfg.text_column), where, cfg.text_column)}
        if cfg.text_pair_column:
            item["text_pair"] = _text(row.get(cfg.text_pair_column), where, cfg.text_pair_column)
        out.append(item)
    labels = class_labels([row.get(cfg.label_column) for row in rows], f"{unit} {{}}", first,
                          f"{source}: column '{show(cfg.label_column)}'")
    for item, label in zip(out, labels):
        item["label"] = label
    return out


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        what = "no text" if value is None else f"{type(value).__name__}, expected text"
        raise DataError(f"{where}: column '{show(column)}' holds {what}")
    if not value.strip():
        raise DataError(f"{where}: empty text in column '{show(column)}'")
    return value


def _read(path: str, cfg: DataConfig) -> list[dict]:
    rows, unit = read_table(path)
    return _select_columns(rows, cfg, str(path), unit)


def _read_unlabeled(cfg: DataConfig) -> list[dict]:
    """data.unlabeled_file's texts {text, [text_pair]}: a file's text columns, or a built-in dataset's texts."""
    path = cfg.unlabeled_file
    if is_builtin_source(path):
        if cfg.text_pair_column:
            raise DataError(f"data.unlabeled_file: built-in dataset {path} has no text pairs (data.text_pair_column "
                            f"is {cfg.text_pair_column}); use a file with both text columns")
        return [{"text": t} for t in builtin_texts(path)]
    rows, unit = read_table(path)
    if not rows:
        raise DataError(f"{path}: no rows (data.unlabeled_file)")
    columns = [("data.text_column", cfg.text_column)]
    if cfg.text_pair_column:
        columns.append(("data.text_pair_column", cfg.text_pair_column))
    for key, column in columns:
        if column not in rows[0]:
            raise DataError(f"{path}: column '{show(column)}' not found (columns: {', '.join(map(show, rows[0]))}); "
                            f"set {key} (data.unlabeled_file needs the training data's text columns)")
    first, unit = (2, "line") if unit == "data row" else (1, unit)
    out = []
    for i, row in enumerate(rows, first):
        item = {"text": _text(row.get(cfg.text_column), f"{path}: {unit} {i}", cfg.text_column)}
        if cfg.text_pair_column:
            item["text_pair"] = _text(row.get(cfg.text_pair_column), f"{path}: {unit} {i}", cfg.text_pair_column)
        out.append(item)
    return out


def load_data(cfg: DataConfig) -> DataBundle:
    """Read the configured data and return deterministic train/validation/test splits."""
    given_test = None
    if cfg.train_file:
        train_rows = _read(cfg.train_file, cfg)
        source = cfg.train_file
    else:
        builtin = builtin_rows(cfg.dataset)
        train_rows, given_test, source = builtin["train"], builtin.get("test"), cfg.dataset
    test_rows = _read(cfg.test_file, cfg) if cfg.test_file else given_test
    val_rows = _read(cfg.validation_file, cfg) if cfg.validation_file else None

    names = label_names([r["label"] for r in train_rows])
    if len(names) < 2:
        raise DataError(f"{source}: column '{cfg.label_column}' has {len(names)} class ({', '.join(names)}); "
                        "classification needs at least two")
    for split_name, rows, file in (("test", test_rows, cfg.test_file), ("validation", val_rows, cfg.validation_file)):
        if rows is None:
            continue
        unseen = sorted({r["label"] for r in rows} - set(names))
        if unseen:
            raise DataError(f"{file or source}: {split_name} label(s) {', '.join(map(repr, unseen[:5]))} never seen in "
                            f"training data {source} (column '{cfg.label_column}')")

    if test_rows is None:
        train_rows, test_rows = stratified_split(train_rows, cfg.test_fraction, cfg.seed, source, "test")
    else:
        test_rows = sample(test_rows, cfg.limit, cfg.seed, source, "test")
    if val_rows is None:
        train_rows, val_rows = stratified_split(train_rows, cfg.validation_fraction, cfg.seed, source, "validation")
    else:
        val_rows = sample(val_rows, cfg.limit, cfg.seed, source, "validation")

    test_rows, test_leaks = remove_leaks(train_rows, test_rows, cfg.drop_test_duplicates)
    val_rows, val_leaks = remove_leaks(train_rows, val_rows, cfg.drop_test_duplicates)
    leakage = {"test_texts_also_in_train": test_leaks, "validation_texts_also_in_train": val_leaks,
               "removed": cfg.drop_test_duplicates}
    if test_leaks or val_leaks:
        log.warning("%s: %d test and %d validation texts also appear in train; %s", source, test_leaks, val_leaks,
                    "removed from the held-out splits" if cfg.drop_test_duplicates else "kept (drop_test_duplicates "
                    "is off: accuracy will be inflated)")

    unlabeled = []
    if cfg.unlabeled_file:
        unlabeled, leaks = without_held_out(_read_unlabeled(cfg), test_rows + val_rows, cfg.limit)
        leakage["unlabeled_texts_also_held_out"] = leaks  # always dropped: their soft targets would leak the test
        if leaks:
            log.warning("%s: %d texts also appear in the test or validation split; dropped", cfg.unlabeled_file, leaks)

    label_id = {n: i for i, n in enumerate(names)}
    splits = {}
    for split_name, rows in zip(SPLITS, (train_rows, val_rows, test_rows)):
        rows = capped(rows, cfg.limit, source, split_name)
        columns = {"text": [r["text"] for r in rows]}
        if cfg.text_pair_column:
            columns["text_pair"] = [r["text_pair"] for r in rows]
        columns["label"] = [label_id[r["label"]] for r in rows]
        if split_name == "train" and cfg.labeled_limit:
            columns["label"][cfg.labeled_limit:] = [UNLABELED] * len(columns["label"][cfg.labeled_limit:])
        splits[split_name] = Dataset.from_dict(columns)
    return DataBundle(DatasetDict(splits), names, str(source), leakage, unlabeled)


def entities_with_tags(rows: list[dict], tags: set[str]) -> int:
    """How many entities of the sentences' tags (seqeval's chunks) hold a tag in `tags`."""
    return sum(any(t in tags for t in r["tags"][start:end + 1])
               for r in rows for _, start, end in get_entities(list(r["tags"])))


def load_token_data(cfg: DataConfig) -> DataBundle:
    """Sentences of the configured token-classification data, as train / validation / test splits (the dataset's
    own where it has them or files are given; else seeded random splits by `data.test_fraction` and
    `data.validation_fraction`), tags as ids into the sorted tag names; with data.unlabeled_file, its transfer
    sentences (`transfer_sentences`) in `unlabeled`."""
    given: dict[str, list[dict]] = {}
    if cfg.train_file:
        given["train"], source = read_token_file(cfg.train_file), cfg.train_file
    else:
        if cfg.dataset not in TOKEN_DATASETS:
            raise DataError(f"data.dataset: '{cfg.dataset}' is not a token-classification dataset (known: "
                            f"{', '.join(TOKEN_DATASETS)}); or set data.train_file (CoNLL columns or JSONL)")
        given, source = TOKEN_DATASETS[cfg.dataset].load(), cfg.dataset
    for split, file in (("test", cfg.test_file), ("validation", cfg.validation_file)):
        if file:
            given[split] = read_token_file(file)
    train = given["train"]
    if "test" not in given:
        train, given["test"] = sentence_split(train, cfg.test_fraction, cfg.seed, str(source), "test")
    if "validation" not in given:
        train, given["validation"] = sentence_split(train, cfg.validation_fraction, cfg.seed, str(source),
                                                    "validation")
    given["train"] = train
    names = sorted({t for r in train for t in r["tags"]})
    if len(names) < 2:
        raise DataError(f"{source}: the training sentences have {len(names)} tag ({', '.join(names)}); token "
                        "classification needs at least two")
    unseen = sorted({t for r in given["validation"] for t in r["tags"]} - set(names))
    if unseen:  # (only a given validation file can have them: the seeded draw keeps every tag in training)
        # the models get an output for them, which nothing teaches: their entities score as misses in validation
        log.warning("%s: %d validation tag(s) never seen in the training data, %d validation entities; no model "
                    "learns them, so they score as misses: %s", cfg.validation_file or source, len(unseen),
                    entities_with_tags(given["validation"], set(unseen)), ", ".join(unseen[:20]))
        names = sorted({*names, *unseen})
    test_only = sorted({t for r in given["test"] for t in r["tags"]} - set(names))
    if test_only:
        log.warning("%s: %d test tag(s) never seen in the training data, %d test entities; no model can predict "
                    "them, so they score as misses: %s", cfg.test_file or source, len(test_only),
                    entities_with_tags(given["test"], set(test_only)), ", ".join(test_only[:20]))
    tag_id = {n: i for i, n in enumerate(names + test_only)}
    splits = {}
    for split in SPLITS:
        rows = capped(given[split], cfg.limit, str(source), split)
        splits[split] = Dataset.from_dict({"tokens": [r["tokens"] for r in rows],
                                           "tags": [[tag_id[t] for t in r["tags"]] for r in rows]})
    unlabeled, leakage = [], {}
    if cfg.unlabeled_file:
        held = [r["tokens"] for split in ("validation", "test") for r in given[split]]
        texts = [r["text"] for r in _read_unlabeled(cfg)]
        unlabeled, leaks = transfer_sentences(texts, held, cfg.max_length, cfg.limit)
        leakage["unlabeled_texts_also_held_out"] = leaks  # always dropped: their soft tags would leak the test
        if leaks:
            log.warning("%s: %d texts hold a test or validation sentence; dropped", cfg.unlabeled_file, leaks)
        if not unlabeled:
            raise DataError(f"{cfg.unlabeled_file}: no sentence of {MIN_TRANSFER_WORDS} or more words "
                            "(data.unlabeled_file)")
    return DataBundle(DatasetDict(splits), names, str(source), leakage, unlabeled, test_only)
