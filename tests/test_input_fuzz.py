"""Property-based fuzzing of what users hand kdistill: data files (CSV, TSV, JSONL, JSON) and recipes.

The property, for every generated file: it loads, or it fails with a `UserError` (the CLI's exit 2) whose message is
one line naming the file; never any other exception, and nothing is written next to the input. Derandomized (a seed
fixed per test, no example database) and bounded to a few seconds a test. Each test counts its outcomes and asserts
that both happened, so a generator that drifts to only valid (or only broken) files fails instead of passing vacuously.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections import Counter
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdistill.cli import main
from kdistill.config import DataConfig, load_config
from kdistill.data import load_data, load_token_data
from kdistill.errors import UserError

FUZZ = settings(derandomize=True, max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text that hits the edges: line and paragraph separators str.splitlines() splits on, quotes, delimiters, NUL,
# lone surrogates (from JSON escapes), BOMs, CJK, whitespace-only.
_EDGE = st.sampled_from(["\u2028", "\u2029", "\x85", "\r", "\n", "\r\n", '"', ",", "\t", "\x00", "\ufeff", " ",
                         "\\", "中文", "é", "\ud800", "\udfff", "nan", "NaN", "true", "1.0", "01"])
_TEXT = st.one_of(st.sampled_from(["good match", "new phone", "vote today", "big team", "chip data"]),
                  st.text(max_size=12), st.text(st.characters(categories=["Cs", "Zl", "Zp", "Cc"]), max_size=3),
                  st.lists(_EDGE, max_size=4).map("".join))
_LABEL_TEXT = st.one_of(st.sampled_from(["a", "b", "c", "1", "2", "1.0", "2.5", "true", "", " a", "nan", "01"]),
                        _TEXT)
_JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(), _LABEL_TEXT)
_JSON_VALUE = st.recursive(_JSON_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=4), inner, max_size=3), max_leaves=6)
_COLUMN = st.sampled_from(["text", "label", "other", "", "Text", "label "])


def _outcome(path: Path, load, named=()) -> str:
    """'loaded' or 'user error'; any other exception propagates and fails the test with hypothesis' example.

    A user error names the file, or one of `named` (the --set item at fault, for a recipe)."""
    before = sorted(path.parent.iterdir())
    try:
        load()
        outcome = "loaded"
    except UserError as e:
        message = str(e)
        assert message.splitlines() == [message], f"not one line: {message!r}"
        assert any(name in message for name in (path.name, *named)), f"does not name the file: {message!r}"
        outcome = "user error"
    assert sorted(path.parent.iterdir()) == before, "a file was left behind"
    return outcome


def _load_data_file(content: bytes, suffix: str, **data) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        return _outcome(path, lambda: load_data(DataConfig(train_file=str(path), **data)))


def _encode(text: str, bom: bool) -> bytes:
    # Lone surrogates cannot be UTF-8; surrogatepass writes the bytes anyway, as a broken exporter would.
    return ("\ufeff" * bom + text).encode("utf-8", "surrogatepass")


def _run(test, outcomes: Counter) -> None:
    """Run the property; print what it tried (see it with `pytest -s`) and check both outcomes were reached."""
    test()
    print(f"\n{test.__name__}: {sum(outcomes.values())} examples, {dict(outcomes)}, tracebacks 0")
    assert outcomes["loaded"] > 0 and outcomes["user error"] > 0, outcomes


def _sometimes(wild):
    """None four times in five (the caller then writes a valid value), else a wild one: files that are mostly
    valid reach the checks deep inside loading, not only those of the first row."""
    return st.tuples(st.integers(0, 4), wild).map(lambda t: None if t[0] else t[1])


_CLASSES = st.sampled_from([["a", "b"], ["x", "y", "z"], [0, 1, 2], ["1", "10", "2"], [True, False]])
_DATA_CFG = st.fixed_dictionaries({}, optional={
    "test_fraction": st.floats(0.01, 0.99), "validation_fraction": st.floats(0.01, 0.99),
    "limit": st.integers(1, 5), "labeled_limit": st.integers(1, 5), "drop_test_duplicates": st.booleans()})


def _rows(n: int, classes: list, wild: list[tuple[int, int, object]]) -> list[list]:
    """n valid [text, label] rows, then a few cells made wild: (row, column, value); column 2 adds a cell."""
    rows = [[f"text number {i}", classes[i % len(classes)]] for i in range(n)]
    for i, column, value in wild:
        if i < n:
            rows[i][min(column, len(rows[i])):column + 1] = [value]
    return rows


def _wild(value):
    return st.lists(st.tuples(st.integers(0, 29), st.integers(0, 2), value), max_size=2)


def test_csv_and_tsv_files_load_or_fail_with_one_line():
    import csv

    outcomes = Counter()

    @FUZZ
    @given(header=_sometimes(st.lists(_COLUMN, min_size=1, max_size=4)), classes=_CLASSES, n=st.integers(0, 30),
           wild=_wild(_LABEL_TEXT), tsv=st.booleans(),
           quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]), bom=st.booleans(),
           raw=_sometimes(st.text(max_size=60)), cfg=_sometimes(_DATA_CFG))
    def csv_files(header, classes, n, wild, tsv, quoting, bom, raw, cfg):
        if raw is None:
            out = io.StringIO()
            writer = csv.writer(out, delimiter="\t" if tsv else ",", quoting=quoting, escapechar="\\")
            writer.writerow(header or ["text", "label"])
            writer.writerows(_rows(n, [str(c) for c in classes], wild))
            raw = out.getvalue()
        outcomes[_load_data_file(_encode(raw, bom), ".tsv" if tsv else ".csv", **(cfg or {}))] += 1

    _run(csv_files, outcomes)


def test_jsonl_and_json_files_load_or_fail_with_one_line():
    outcomes = Counter()

    @FUZZ
    @given(classes=_CLASSES, n=st.integers(0, 30), wild=_wild(_JSON_VALUE),
           not_records=st.lists(st.tuples(st.integers(0, 29), _JSON_VALUE), max_size=1), as_array=st.booleans(),
           ascii_only=st.booleans(), separator=st.sampled_from(["\n", "\r\n", "\n\n", "\u2028", "\x85"]),
           bom=st.booleans(), raw=_sometimes(st.text(max_size=60)), cfg=_sometimes(_DATA_CFG))
    def json_files(classes, n, wild, not_records, as_array, ascii_only, separator, bom, raw, cfg):
        if raw is None:
            items = [dict(zip(["text", "label", "other"], row)) for row in _rows(n, classes, wild)]
            for i, value in not_records:
                items[i:i + 1] = [value]
            # Lone surrogates reach the loader as "\ud800" escapes (ascii_only) or as raw bytes (surrogatepass).
            dump = lambda v: json.dumps(v, ensure_ascii=ascii_only)  # noqa: E731
            raw = dump(items) if as_array else separator.join(map(dump, items))
        outcomes[_load_data_file(_encode(raw, bom), ".json" if as_array else ".jsonl", **(cfg or {}))] += 1

    _run(json_files, outcomes)


_SECTIONS = {  # keys, each with a valid value that a generated recipe holds four times in five
    "data": {"dataset": "bbc-news", "train_file": "data.csv", "label_column": "y", "max_length": 64, "limit": 10,
             "test_fraction": 0.3, "seed": 1},
    "teacher": {"model": "minilm-l6", "epochs": 1, "lr": 1e-4, "from_scratch": {"hidden_size": 32}, "path": "t"},
    "student": {"layers": [0, 2], "hidden_size": 128, "init": "pruned", "layer_map": "last", "intermediate_size": 8},
    "distill": {"strategy": "mutual", "temperature": 2.0, "losses": {"kd": 1.0}, "layer_mapping": [[0, 1]],
                "cache_teacher": "off", "teacher_weights": [1.0]},
    "train": {"epochs": 1, "batch_size": 8, "grad_accum": 2, "lr": 1e-3, "max_steps": 3, "mixed_precision": "bf16"},
    "export": {"formats": ["hf", "onnx"]},
}
_RECIPE_VALUE = st.one_of(_JSON_VALUE, st.sampled_from(
    [1, 2, 0, -1, 0.5, 64, [0, 1], [[0, 1]], {"kd": 1.0}, {"kd": 0}, "uniform", "explicit", "bbc-news", "bf16",
     ["hf"], "minilm-l6", {"hidden_size": 30}, "../x", "x/y", "run-1"]))


def _valued(valid):
    return _sometimes(_RECIPE_VALUE).map(lambda wild: valid if wild is None else wild)


_RECIPE = st.tuples(
    st.fixed_dictionaries({}, optional={
        "name": _valued("fuzz-run"), "task": _valued("classification"),
        **{name: st.fixed_dictionaries({}, optional={k: _valued(v) for k, v in keys.items()})
           for name, keys in _SECTIONS.items()}}),
    _sometimes(st.dictionaries(st.text(max_size=6) | st.sampled_from(["int", "list", "a\nb", "str[x]"]),  # unknown
                               _RECIPE_VALUE, min_size=1, max_size=2)),
).map(lambda parts: {**parts[0], **(parts[1] or {})})


def _recipe_text(recipe, raw, bom) -> bytes:
    if raw is None:
        raw = yaml.safe_dump(recipe, allow_unicode=True) if isinstance(recipe, dict) else yaml.safe_dump(recipe)
    return _encode(raw, bom)


def test_recipes_load_or_fail_with_one_line():
    outcomes = Counter()

    @FUZZ
    @given(recipe=_RECIPE | _JSON_VALUE, raw=st.none() | st.text(max_size=40) | st.lists(_EDGE | st.sampled_from(
           [": ", "- ", "{", "[", "&a ", "*a", "!!python/object:os.system ", "---\n", "  "]), max_size=12).map("".join),
           overrides=st.lists(st.text(max_size=12) | st.sampled_from(["train.epochs=2", "data.limit=x", "a.b=c",
                              "student.layers=[0, 9]", "name=../x", "=", "data.max_length=8"]), max_size=2),
           bom=st.booleans())
    def recipes(recipe, raw, overrides, bom):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "recipe.yaml"
            path.write_bytes(_recipe_text(recipe, raw, bom))
            outcomes[_outcome(path, lambda: load_config(path, overrides), named=("--set",))] += 1

    _run(recipes, outcomes)


def test_kdistill_validate_exits_0_or_2_with_one_line():
    """The same recipes through the CLI users call: exit code 0 or 2, never 1 (an internal error) or a traceback."""
    outcomes = Counter()

    @settings(FUZZ, max_examples=80)
    @given(recipe=_RECIPE, raw=st.none() | st.text(max_size=40), bom=st.booleans())
    def validate(recipe, raw, bom):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "recipe.yaml"
            path.write_bytes(_recipe_text(recipe, raw, bom))
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    main(["validate", str(path)])
                    code = 0
                except SystemExit as e:
                    code = e.code
            assert sorted(Path(tmp).iterdir()) == [path], "a file was left behind"
        if code == 0:
            assert isinstance(yaml.safe_load(stdout.getvalue()), dict)  # the resolved config
            outcomes["loaded"] += 1
        else:
            assert code == 2, stderr.getvalue()
            assert len(stderr.getvalue().splitlines()) == 1 and stderr.getvalue().startswith("kdistill: "), \
                stderr.getvalue()
            outcomes["user error"] += 1

    _run(validate, outcomes)


# ------------------------------------------------------------------------------------- token classification

_WORD = st.one_of(st.sampled_from(["EU", "rejects", "German", "call", "中", "[SEP]", "<s>", "é", "1996-08-22"]),
                  st.sampled_from(["caf\ud800", "\udfff", "a\udbffb"]),  # as JSON escapes or raw bytes
                  st.text(max_size=4), st.lists(_EDGE, min_size=1, max_size=2).map("".join))
_TAG = st.one_of(st.sampled_from(["O", "B-ORG", "I-ORG", "B-PER", "I-PER", "B-MISC"]),
                 st.sampled_from(["B-", "X", "b-org", "B-OR G", "B-ORG\n", "I-\x00", "B-\u2028X", "B-\ud800", "O\r"]),
                 st.text(max_size=4))


def _valid_sentence(i: int) -> dict:
    return {"tokens": ["EU", f"w{i}", "call"], "tags": ["B-ORG", "O", "B-PER" if i % 2 else "O"]}


def _token_sentences(n: int, wild: list[tuple[int, int, object, object]]) -> list[dict]:
    """n valid sentences, then a few (sentence, word) pairs made wild: a wild word and / or tag."""
    sentences = [_valid_sentence(i) for i in range(n)]
    for i, w, word, tag in wild:
        if n:
            s = sentences[i % n]
            s["tokens"][w % 3] = word if word is not None else s["tokens"][w % 3]
            s["tags"][w % 3] = tag if tag is not None else s["tags"][w % 3]
    return sentences


def test_token_files_load_or_fail_with_one_line():
    """JSON Lines and CoNLL columns, any line ending (\\n, \\r\\n, \\r), surrogates anywhere (JSON escapes or raw
    bytes), tags with control characters and spaces, BOMs."""
    outcomes = Counter()

    @FUZZ
    @given(n=st.integers(0, 30), wild=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 2), st.none() | _WORD,
                                                         _sometimes(_TAG)), max_size=2),
           jsonl=st.booleans(), ending=st.sampled_from(["\n", "\r\n", "\r"]), ascii_only=st.booleans(),
           suffix=st.sampled_from([".conll", ".txt", ".bio"]), bom=st.booleans(),
           raw=_sometimes(st.lists(_EDGE | _WORD | _TAG | st.sampled_from([" ", "\n\n", "-DOCSTART- O"]),
                                   max_size=12).map("".join)),
           cfg=_sometimes(_DATA_CFG))
    def token_files(n, wild, jsonl, ending, ascii_only, suffix, bom, raw, cfg):
        if raw is None:
            sentences = _token_sentences(n, wild)
            if jsonl:
                raw = ending.join(json.dumps(s, ensure_ascii=ascii_only) for s in sentences)
            else:
                raw = (ending * 2).join(ending.join(f"{t} {g}" for t, g in zip(s["tokens"], s["tags"]))
                                        for s in sentences)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"train{'.jsonl' if jsonl else suffix}"
            path.write_bytes(_encode(raw, bom))
            outcomes[_outcome(path, lambda: load_token_data(DataConfig(train_file=str(path), **(cfg or {}))))] += 1

    _run(token_files, outcomes)


# ------------------------------------------------------------------------------------- the server's body checks

_CONTENT_TYPES = {"application/json": True, "application/json; charset=utf-8": True,
                  "APPLICATION/JSON;charset=UTF-8": True, None: False, "text/plain": False,
                  "application/json; charset=utf-16": False, "application/x-www-form-urlencoded": False,
                  "text/json": False, "application/json; charset=latin-1": False}
_BODY_ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be", "latin-1"]


def test_server_body_checks_answer_a_result_or_one_line_4xx(tiny_bert_dir):
    """Content types, body encodings and keys given twice, against the expected status: 415 for a body not sent as
    application/json (charset utf-8), else 400 for a body that is not UTF-8 or gives a key twice, else 200 or a 422
    for a text that cannot be used; never a 5xx, and every error detail is one line."""
    from starlette.testclient import TestClient

    from kdistill.deploy.serve import create_app

    outcomes, statuses = Counter(), Counter()
    good_types = [t for t, ok in _CONTENT_TYPES.items() if ok]
    with TestClient(create_app(tiny_bert_dir, max_batch_texts=8, batch_wait_ms=1)) as client:

        @FUZZ
        @given(content_type=st.sampled_from(good_types) | st.sampled_from(list(_CONTENT_TYPES)),
               encoding=st.sampled_from(["utf-8"]) | st.sampled_from(_BODY_ENCODINGS),
               texts=st.lists(st.sampled_from(["goal match", "café vote", "中文 team", " ", "[SEP] data", "\ud800"]),
                              min_size=1, max_size=3),
               one=st.booleans(), twice=_sometimes(st.sampled_from(["text", "texts", "other"])),
               ascii_only=st.booleans())
        def requests(content_type, encoding, texts, one, twice, ascii_only):
            field, value = ("text", texts[0]) if one else ("texts", texts)
            pairs = [(field, value)]
            if twice:
                pairs.append((twice, value if twice in ("text", "texts") else 1))
                pairs.insert(0, pairs[-1])
            body = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=ascii_only)}" for k, v in pairs) + "}"
            raw = body.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")
            headers = {"content-type": content_type} if content_type else {}
            response = client.post("/predict", content=raw, headers=headers)
            detail = response.json().get("detail", "") if response.status_code != 200 else ""
            assert str(detail).splitlines() in ([str(detail)], []), detail
            utf8 = raw.decode("utf-8-sig", "strict") if _is_utf8(raw) else None
            if not _CONTENT_TYPES[content_type]:
                expected = 415
            elif utf8 is None or twice or "\x00" in utf8:
                expected = 400
            else:
                sent = [texts[0]] if one else texts
                expected = 200 if all(t.strip() and t != "\ud800" for t in sent) else 422
            assert response.status_code == expected, (content_type, encoding, raw[:80], response.text[:200])
            outcomes["loaded" if expected == 200 else "user error"] += 1
            statuses[response.status_code] += 1

        _run(requests, outcomes)
    print(f"server body checks, by status: {dict(sorted(statuses.items()))}")
    assert {200, 400, 415, 422} <= set(statuses), statuses


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
