"""Labels: the ids that mark an example without a class (`UNLABELED`, `TRANSFER`), and a file's raw label values
checked and turned into class names (`class_labels`, `label_names`).

Class labels are refused when they would be silently merged, split or invented: missing values, decimals (a
regression target), mixed kinds (integers beside names), one class written two ways (1 and 01). Label names are
sorted (numerically when every name is an integer), so ids do not depend on file order.
"""

from __future__ import annotations

import math
import re

from kdistill.errors import DataError


UNLABELED = -100
"""The label id of a training example without a label (data.labeled_limit): the loss functions' ignore_index."""
TRANSFER = -1
"""Token classification: the label of a transfer sentence's scored sub-token (data.unlabeled_file): the token `kd`
term reads it (labels != UNLABELED), `ce` skips it (it counts labels >= 0). Never in a validation or test split."""


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


def class_labels(values: list, where: str, first: int, column: str) -> list[str]:
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


def label_names(labels: list[str]) -> list[str]:
    unique = set(labels)
    if all(_INTEGER.fullmatch(v) for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)
