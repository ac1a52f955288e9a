"""Task scores of generated responses: how well a model's free-text answers solve the task, in [0, 1] per row.

A scorer is called as `scorer(response, fields) -> float`, `fields` being the example's other keys (e.g. "answer",
"labels", "entities"). It also has `extract(response, fields) -> str | None`: the normalised answer it read in the
response (None: none), so that a student's answers can be compared with its teacher's (`agreement`).

Built-in scorers, by name (`get_scorer`):
  exact_match  the whole response equals fields["answer"], both normalised (`normalise`)
  pattern      the first match of the regex option `pattern` (one group: the answer) equals fields["answer"]
  label        the one allowed label (option `labels`, else fields["labels"]) the response names, as a whole word,
               equals fields["answer"]; a response naming none, or several (a list of the options), scores 0
  entity_f1    the first JSON list of strings in the response (a ```json block and text around it are fine),
               compared as a set with fields["entities"]: F1 per row; no such list scores 0
A user's scorer is "module:function": `function(response, fields)` returns a number in [0, 1] or a bool; its
`extract` is the normalised response.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import numbers
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kdistill.errors import ConfigError, DataError


def normalise(text: str) -> str:
    """`text` as answers are compared: NFKC (full-width forms as ASCII), case-folded, whitespace runs as one
    space, without whitespace and punctuation at either end: ' "Paris." ' -> 'paris'."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _edge(text[start]):
        start += 1
    while end > start and _edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _edge(c: str) -> bool:
    return c.isspace() or unicodedata.category(c).startswith("P")


@dataclass(frozen=True)
class Scorer:
    """A scorer named by its spec: `scorer(response, fields)` is the row's score in [0, 1]."""

    name: str
    """The spec it was made from: a built-in name or "module:function"."""
    score_fn: Callable[[str, dict], float]
    extract_fn: Callable[[str, dict], str | None]

    def __call__(self, response: str, fields: dict) -> float:
        return self.score_fn(response, fields)

    def extract(self, response: str, fields: dict) -> str | None:
        """The normalised answer read in `response`; None when it holds none."""
        return self.extract_fn(response, fields)


# ---------------------------------------------------------------------------------------------- built-in scorers

def _field(fields: dict, key: str, scorer: str, what: str):
    if key not in fields:
        raise DataError(f"scorer '{scorer}': an example has no '{key}' field ({what}); add it to every test row")
    return fields[key]


def _answer(fields: dict, scorer: str) -> str:
    value = _field(fields, "answer", scorer, "the expected answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"scorer '{scorer}': 'answer' must be a string or a number, got {value!r:.60}")
    return normalise(str(value))


def _compared(name: str, extract: Callable[[str, dict], str | None]) -> Scorer:
    """A scorer that scores 1 when the answer it extracts equals the normalised fields["answer"], else 0."""
    return Scorer(name, lambda response, fields: float(extract(response, fields) == _answer(fields, name)), extract)


def _exact_match() -> Scorer:
    return _compared("exact_match", lambda response, fields: normalise(response) or None)


def _pattern(pattern=None) -> Scorer:
    if not isinstance(pattern, str):
        raise ConfigError("scorer 'pattern': needs the option pattern, a regex whose one group is the answer "
                          "(e.g. 'answer is (\\\\w+)')")
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"scorer 'pattern': invalid regex {pattern!r}: {e}") from None
    if regex.groups != 1:
        raise ConfigError(f"scorer 'pattern': the regex {pattern!r} has {regex.groups} groups; it needs exactly one, "
                          "the answer (use (?:...) for the others)")

    def extract(response: str, fields: dict) -> str | None:
        match = regex.search(response)
        return normalise(match.group(1)) if match and match.group(1) is not None else None

    return _compared("pattern", extract)


def _spaced(c: str) -> bool:
    """A letter or digit of a script that separates words with spaces: two of them side by side are one word.
    CJK characters and kana are not: a label in Chinese text has no spaces around it."""
    return c.isalnum() and not ("\u3040" <= c <= "\u30ff" or "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff"
                                or "\U00020000" <= c <= "\U0003134f")


def _find_word(word: str, text: str) -> int | None:
    """Where `word` first occurs in `text` as a whole word; None if nowhere."""
    at = text.find(word)
    while at >= 0:
        before = text[at - 1] if at else " "
        after = text[at + len(word)] if at + len(word) < len(text) else " "
        if not (_spaced(word[0]) and _spaced(before)) and not (_spaced(word[-1]) and _spaced(after)):
            return at
        at = text.find(word, at + 1)
    return None


def _check_labels(labels, where: str, error: type[Exception]) -> list[str]:
    if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) for x in labels):
        raise error(f"{where}: the labels must be a non-empty list of strings, got {labels!r:.60}")
    allowed = [normalise(x) for x in labels]
    if not all(allowed):
        raise error(f"{where}: a label is empty once normalised (labels: {labels!r:.60})")
    return allowed


def _label(labels=None) -> Scorer:
    fixed = None if labels is None else _check_labels(labels, "scorer 'label': option labels", ConfigError)

    def extract(response: str, fields: dict) -> str | None:
        allowed = fixed or _check_labels(_field(fields, "labels", "label", "the allowed labels, or give the "
                                                "scorer option labels"), "scorer 'label': 'labels'", DataError)
        text = normalise(response)
        spans = [(at, at + len(x), x) for x in allowed if (at := _find_word(x, text)) is not None]
        # a label inside a longer one found ("negative" in "very negative") is that one; a response naming
        # several labels ("business, tech or sport") commits to none of them
        named = {x for a, b, x in spans if not any(c <= a and b <= d and (c, d) != (a, b) for c, d, _ in spans)}
        return named.pop() if len(named) == 1 else None

    return _compared("label", extract)


def _json_list(response: str) -> list[str] | None:
    """The first JSON list of strings in `response` (inside a ```json fence or amid text); None if there is none."""
    decoder = json.JSONDecoder()
    at = response.find("[")
    while at >= 0:
        try:
            value, _ = decoder.raw_decode(response, at)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return value
        at = response.find("[", at + 1)
    return None


def _entity_set(response: str) -> set[str] | None:
    found = _json_list(response)
    return None if found is None else {e for e in map(normalise, found) if e}


def _gold_entities(fields: dict) -> set[str]:
    gold = _field(fields, "entities", "entity_f1", "the expected entities, a list of strings")
    if not isinstance(gold, list) or not all(isinstance(x, str) for x in gold):
        raise DataError(f"scorer 'entity_f1': 'entities' must be a list of strings, got {gold!r:.60}")
    return {e for e in map(normalise, gold) if e}


def _f1(found: set[str] | None, gold: set[str]) -> float:
    if found is None:
        return 0.0
    if not found and not gold:
        return 1.0  # rightly none
    return 2 * len(found & gold) / (len(found) + len(gold))


def _entity_f1() -> Scorer:
    def extract(response: str, fields: dict) -> str | None:
        found = _entity_set(response)
        return None if found is None else json.dumps(sorted(found), ensure_ascii=False)

    return Scorer("entity_f1", lambda response, fields: _f1(_entity_set(response), _gold_entities(fields)), extract)


BUILTIN_SCORERS: dict[str, Callable[..., Scorer]] = {
    "exact_match": _exact_match,
    "pattern": _pattern,
    "label": _label,
    "entity_f1": _entity_f1,
}
"""Built-in scorers by name: each makes a `Scorer` from its options."""


# ----------------------------------------------------------------------------------------------- users' scorers

def _checked(spec: str, function: Callable) -> Callable[[str, dict], float]:
    def call(response: str, fields: dict) -> float:
        value = function(response, fields)
        if isinstance(value, numbers.Real) and not math.isnan(value) and 0 <= value <= 1:
            return float(value)
        raise ConfigError(f"scorer '{spec}': returned {value!r:.60} ({type(value).__name__}); a scorer returns a "
                          "number in [0, 1] or a bool")

    return call


def _user_scorer(spec: str) -> Scorer:
    module_name, _, function_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` would: a module beside the user
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail to import in any way (a SyntaxError, its own)
        raise ConfigError(f"scorer '{spec}': cannot import module '{module_name}': {type(e).__name__}: "
                          f"{' '.join(str(e).split())}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"scorer '{spec}': module '{module_name}' has no function '{function_name}'")
    return Scorer(spec, _checked(spec, function), lambda response, fields: normalise(response) or None)


def get_scorer(spec: str, **options) -> Scorer:
    """The scorer named by `spec`: a built-in name (`BUILTIN_SCORERS`, with its options) or "module:function" (an
    importable function of (response, fields)). A bad spec or option is a one-line `ConfigError` naming it."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"scorer {spec!r}: a scorer is a built-in name ({', '.join(BUILTIN_SCORERS)}) or "
                          "'module:function'")
    if spec in BUILTIN_SCORERS:
        known = inspect.signature(BUILTIN_SCORERS[spec]).parameters
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"scorer '{spec}': unknown option '{unknown[0]}' (its options: "
                              f"{', '.join(known) or 'none'})")
        return BUILTIN_SCORERS[spec](**options)
    module_name, colon, function_name = spec.partition(":")
    if not colon:
        close = difflib.get_close_matches(spec, list(BUILTIN_SCORERS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"scorer '{spec}': not a built-in scorer{hint}; use one of {', '.join(BUILTIN_SCORERS)} "
                          "or 'module:function'")
    if not module_name or not function_name:
        raise ConfigError(f"scorer '{spec}': a user's scorer is 'module:function', both named")
    if options:
        raise ConfigError(f"scorer '{spec}': a user's scorer takes no options (got {', '.join(sorted(options))})")
    return _user_scorer(spec)


# ---------------------------------------------------------------------------------------------------- scoring

def score(scorer: Scorer, responses: Sequence[str], fields_list: Sequence[dict]) -> dict:
    """Every response scored against its example's fields: {"mean": the mean score, "scores": per row,
    "extracted": the answer read in each row (None: none)}."""
    if len(responses) != len(fields_list) or not responses:
        raise ValueError(f"score: {len(responses)} responses for {len(fields_list)} examples; need as many, >= 1")
    scores = []
    for n, (response, fields) in enumerate(zip(responses, fields_list), 1):
        try:
            scores.append(scorer(response, fields))
        except DataError as e:
            raise DataError(f"{e} (example {n} of {len(responses)})") from None
    return {"mean": sum(scores) / len(scores), "scores": scores,
            "extracted": [scorer.extract(r, f) for r, f in zip(responses, fields_list)]}


def agreement(extracted: Sequence[str | None], reference: Sequence[str | None]) -> float:
    """The share of rows where both read the same answer (e.g. student vs teacher); a row where either read none
    does not agree."""
    if len(extracted) != len(reference) or not extracted:
        raise ValueError(f"agreement: {len(extracted)} answers against {len(reference)}; need as many, >= 1")
    return sum(a is not None and a == b for a, b in zip(extracted, reference)) / len(extracted)
