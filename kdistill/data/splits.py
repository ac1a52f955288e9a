"""Held-out splits and what keeps them honest: the seeded splits (stratified by class, by sentence, by document),
the leakage check (a held-out text that also occurs in train, compared case- and spacing-insensitively) and the
caps of `data.limit`.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

from sklearn.model_selection import train_test_split

from kdistill.errors import DataError


log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def stratified_split(rows: list[dict], fraction: float, seed: int, source: str,
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
    return normalise(row["text"]) + "\x00" + normalise(row.get("text_pair", ""))


def remove_leaks(train: list, held: list, drop: bool, key=text_key) -> tuple[list, int]:
    """`held` less the items whose `key` is also one of train's (when `drop`), and how many those are."""
    seen = {key(r) for r in train}
    leaked = sum(key(r) in seen for r in held)
    if drop:
        held = [r for r in held if key(r) not in seen]
    return held, leaked


def without_held_out(rows: list[dict], held_out: list[dict], limit: int | None) -> tuple[list[dict], int]:
    """The first `limit` of `rows` whose text is no held-out text; and how many were held-out texts."""
    held = {text_key(r) for r in held_out}
    kept = [r for r in rows if text_key(r) not in held]
    return kept[:limit] if limit else kept, len(rows) - len(kept)


def sample(rows: list[dict], limit: int | None, seed: int, source: str, split: str) -> list[dict]:
    """`limit` rows of a given held-out split (data.limit): a seeded stratified draw (each class keeps its share),
    not the first rows, which in a file sorted by label, as 20newsgroups' test split is, hold a few classes only."""
    if not limit or len(rows) <= limit:
        return rows
    return stratified_split(rows, limit / len(rows), seed, source, split)[1]


def capped(items: list, limit: int | None, source: str, split: str, empty: str = "is empty") -> list:
    """A split's first `limit` items (data.limit; all without one); DataError when none are left."""
    if limit:
        items = items[:limit]
    if not items:
        raise DataError(f"{source}: the {split} split {empty}; use more data or other split fractions")
    return items


def sentence_split(rows: list[dict], fraction: float, seed: int, source: str, split: str):
    """(rest, held out): a seeded random `fraction` of the sentences held out, at least one, such that every tag
    keeps a sentence in the rest (`kept_for_tags`). A tag in one sentence only is never held out (logged)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(rows) * fraction))
    reserved = kept_for_tags(rows, order)
    free = [i for i in order if i not in reserved]
    if n_held >= len(rows) or not free:
        raise DataError(f"{source}: {len(rows)} sentences are too few for a {split} split")
    held = set(free[:n_held])
    single = tag_sentence_counts(rows, only_once=True)
    if single:
        log.warning("%s: %d tag(s) occur in one sentence only and stay in train, none in the %s split: %s",
                    source, len(single), split, ", ".join(f"{t} (1 sentence)" for t in single[:20])
                    + (", ..." if len(single) > 20 else ""))
    return [rows[i] for i in order if i not in held], [rows[i] for i in order if i in held]


def tag_sentence_counts(rows: list[dict], only_once: bool = False):
    """How many sentences hold each tag ({tag: count}); with `only_once`, the sorted tags held by one sentence."""
    counts = Counter(t for r in rows for t in set(r.get("tags", ())))
    return sorted(t for t, c in counts.items() if c == 1) if only_once else counts


def kept_for_tags(rows: list[dict], order: list[int]) -> set[int]:
    """For every tag, the sentence holding it that comes last in the seeded `order`: kept out of the held-out draw,
    so that no tag loses all its training sentences. Where every tag is frequent, those sentences are past the
    held-out prefix of `order` anyway, and the split is the plain random draw."""
    last: dict[str, int] = {}
    for i in order:
        for t in rows[i].get("tags", ()):
            last[t] = i
    return set(last.values())


def document_split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(rest, held out): the first round(fraction * n) documents, at least one, are held out."""
    n_held = max(1, round(len(docs) * fraction))
    return docs[n_held:], docs[:n_held]
