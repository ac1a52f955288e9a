"""Task scorers of generated responses: the built-ins on hand-made answers, users' module:function scorers and
each way one can be wrong, the mean score and agreement with a teacher."""

from __future__ import annotations

import re
import sys

import pytest

from kdistill.errors import ConfigError, DataError
from kdistill.scorers import BUILTIN_SCORERS, agreement, get_scorer, normalise, score


def test_normalise_drops_case_outer_whitespace_and_punctuation_only():
    assert normalise('  "Paris."\n') == "paris"
    assert normalise("¿Qué?  Sí ,  señor!") == "qué? sí , señor"  # inner punctuation stays; spaces collapse
    assert normalise("ＡＢＣ１２３。") == "abc123"  # full-width forms, the ideographic full stop
    assert normalise("U.S.") == "u.s" and normalise(" ... ") == ""


def test_exact_match_compares_the_normalised_response_with_the_answer():
    scorer = get_scorer("exact_match")
    assert scorer("Paris.", {"answer": "paris"}) == 1.0
    assert scorer(" 42 ", {"answer": 42}) == 1.0
    assert scorer("The answer is Paris", {"answer": "Paris"}) == 0.0
    assert scorer.extract("  The  Answer!", {}) == "the answer" and scorer.extract("?!", {}) is None
    with pytest.raises(DataError, match="^scorer 'exact_match': an example has no 'answer' field"):
        scorer("Paris", {"label": "Paris"})
    with pytest.raises(DataError, match="'answer' must be a string or a number, got"):
        scorer("Paris", {"answer": ["Paris"]})


def test_pattern_reads_its_one_group():
    scorer = get_scorer("pattern", pattern=r"answer is\s+(\S+)")
    assert scorer("Let me think. The answer is Blue. Or is the answer is red?", {"answer": "blue"}) == 1.0
    assert scorer.extract("the answer is **42**.", {}) == "42"  # Markdown's ** is punctuation at the ends
    assert scorer.extract("no idea", {}) is None
    assert scorer("no idea", {"answer": "blue"}) == 0.0
    optional = get_scorer("pattern", pattern=r"#+\s*(\d+)?")
    assert optional.extract("####", {}) is None  # the group took part in no match


@pytest.mark.parametrize("options, message", [
    ({}, "needs the option pattern"),
    ({"pattern": r"(\d+) and (\d+)"}, "has 2 groups; it needs exactly one"),
    ({"pattern": r"\d+"}, "has 0 groups"),
    ({"pattern": r"(unclosed"}, "invalid regex"),
    ({"pattern": r"(\d+)", "flags": "i"}, r"unknown option 'flags' \(its options: pattern\)"),
])
def test_pattern_options_are_checked_when_the_scorer_is_made(options, message):
    with pytest.raises(ConfigError, match=rf"^scorer 'pattern': .*{message}"):
        get_scorer("pattern", **options)


def test_label_reads_the_one_allowed_label_named_as_a_whole_word():
    scorer = get_scorer("label", labels=["positive", "negative", "very negative"])
    assert scorer("Negative, clearly.", {"answer": "negative"}) == 1.0
    assert scorer.extract("It is positive, not negative.", {}) is None  # two labels named: no answer
    assert scorer("Positive, negative or very negative?", {"answer": "positive"}) == 0.0  # listing the options
    assert scorer.extract("Very negative!", {}) == "very negative"  # the longer label holding the shorter
    assert scorer.extract("positively negatives", {}) is None  # whole words only
    assert scorer("I cannot tell.", {"answer": "negative"}) == 0.0
    from_fields = get_scorer("label")
    fields = {"answer": "sport", "labels": ["sport", "tech"]}
    assert from_fields("Topic: SPORT.", fields) == 1.0 and from_fields("tech", fields) == 0.0
    assert from_fields.extract("10 points", {"labels": ["1", "10"]}) == "10"  # "1" inside "10" is no word
    chinese = {"answer": "体育", "labels": ["体育", "科技"]}  # no spaces between words: any occurrence counts
    assert from_fields("这篇文章是关于体育的。", chinese) == 1.0
    assert from_fields.extract("答案是tech。", {"labels": ["sport", "tech"]}) == "tech"
    with pytest.raises(DataError, match="^scorer 'label': an example has no 'labels' field"):
        from_fields("sport", {"answer": "sport"})
    with pytest.raises(DataError, match="^scorer 'label': 'labels': the labels must be a non-empty list of strings"):
        from_fields("sport", {"answer": "sport", "labels": "sport,tech"})
    with pytest.raises(ConfigError, match="^scorer 'label': option labels: the labels must be a non-empty list"):
        get_scorer("label", labels=[])


def test_entity_f1_reads_the_first_json_list_of_strings_and_scores_the_sets():
    scorer = get_scorer("entity_f1")
    gold = {"entities": ["Paris", "EU"]}
    assert scorer('```json\n["paris", "EU", "Paris"]\n```', gold) == 1.0  # a set: case and repeats do not count
    assert scorer('Entities [see below]: ["Paris", "Berlin"] and more', gold) == pytest.approx(0.5)
    assert scorer('[1, 2] then ["EU"]', gold) == pytest.approx(2 / 3)  # the first list OF STRINGS
    assert scorer("[]", {"entities": []}) == 1.0 and scorer("[]", gold) == 0.0
    assert scorer("Paris, EU", gold) == 0.0 and scorer('["Paris", ', gold) == 0.0  # no list: 0
    assert scorer.extract("Paris, EU", gold) is None
    assert scorer.extract('["EU", "Paris"]', {}) == scorer.extract('Sure: ["paris", "eu"]', {}) == '["eu", "paris"]'
    with pytest.raises(DataError, match="'entities' must be a list of strings"):
        scorer("[]", {"entities": "Paris"})


def test_score_gives_the_mean_each_row_and_what_was_read():
    result = score(get_scorer("exact_match"), ["Paris", "Rome", "?"], [{"answer": "paris"}] * 3)
    assert result == {"mean": pytest.approx(1 / 3), "scores": [1.0, 0.0, 0.0], "extracted": ["paris", "rome", None]}
    with pytest.raises(DataError, match=r"no 'answer' field .* \(example 2 of 2\)$"):
        score(get_scorer("exact_match"), ["a", "b"], [{"answer": "a"}, {}])
    with pytest.raises(ValueError, match="2 responses for 1 examples"):
        score(get_scorer("exact_match"), ["a", "b"], [{"answer": "a"}])


def test_agreement_counts_rows_where_both_read_the_same_answer():
    assert agreement(["paris", None, "rome", "oslo"], ["paris", None, "madrid", "oslo"]) == 0.5
    with pytest.raises(ValueError):
        agreement(["a"], ["a", "b"])


# ----------------------------------------------------------------------------------------------- users' scorers

MODULE = """
def first_word(response, fields):
    return response.split()[0].lower() == fields["answer"]

def half(response, fields):
    return 0.5

def text(response, fields):
    return "yes"

def too_big(response, fields):
    return 2

def nan(response, fields):
    return float("nan")

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(MODULE, encoding="utf-8")
    (tmp_path / "broken_scores.py").write_text("def f(:\n", encoding="utf-8")
    (tmp_path / "failing_scores.py").write_text("import no_such_module_here\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_scores", "broken_scores", "failing_scores"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_users_scorer_returns_a_bool_or_a_number(user_module):
    scorer = get_scorer("my_scores:first_word")
    assert scorer.name == "my_scores:first_word"
    assert scorer("Paris is it", {"answer": "paris"}) == 1.0 and scorer("Rome", {"answer": "paris"}) == 0.0
    assert scorer.extract(" Paris is it. ", {}) == "paris is it"  # what agreement compares: the whole response
    assert score(get_scorer("my_scores:half"), ["a", "b"], [{}, {}])["mean"] == 0.5


@pytest.mark.parametrize("spec, options, message", [
    ("exact-match", {}, r"not a built-in scorer \(did you mean 'exact_match'\?\); use one of exact_match, pattern, "
                        r"label, entity_f1 or 'module:function'"),
    ("exact_match", {"labels": ["a"]}, r"unknown option 'labels' \(its options: none\)"),
    ("no_such_module_here:f", {}, "cannot import module 'no_such_module_here': ModuleNotFoundError"),
    ("broken_scores:f", {}, "cannot import module 'broken_scores': SyntaxError"),
    ("failing_scores:f", {}, "cannot import module 'failing_scores': ModuleNotFoundError: No module named "
                             "'no_such_module_here'"),
    ("my_scores:missing", {}, "module 'my_scores' has no function 'missing'"),
    ("my_scores:NOT_A_FUNCTION", {}, "module 'my_scores' has no function 'NOT_A_FUNCTION'"),
    ("my_scores:", {}, "a user's scorer is 'module:function', both named"),
    ("my_scores:half", {"pattern": "x"}, r"a user's scorer takes no options \(got pattern\)"),
])
def test_a_bad_scorer_spec_is_one_line_naming_it(user_module, spec, options, message):
    with pytest.raises(ConfigError, match=rf"^scorer '{spec}': {message}") as e:
        get_scorer(spec, **options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("function, shown", [("text", "'yes' (str)"), ("too_big", "2 (int)"),
                                             ("nan", "nan (float)")])
def test_a_users_scorer_returning_something_else_is_a_config_error(user_module, function, shown):
    scorer = get_scorer(f"my_scores:{function}")
    with pytest.raises(ConfigError, match=rf"^scorer 'my_scores:{function}': returned {re.escape(shown)}; a scorer "
                                          r"returns a number in \[0, 1\] or a bool$"):
        score(scorer, ["a"], [{}])


def test_every_builtin_is_listed():
    assert list(BUILTIN_SCORERS) == ["exact_match", "pattern", "label", "entity_f1"]
