"""Users' files read into rows: tables (CSV/TSV, JSON Lines / JSON, Parquet, a `save_to_disk` directory, Orange
.tab) and token-classification files (CoNLL columns, JSON Lines of {"tokens", "tags"}), and the People's Daily
POS-tagged line format.

Every reader checks what it reads (UTF-8, one value per key and column, a row's field count, BIO tags) and raises
`DataError` with one line naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from datasets import DatasetDict, load_from_disk

from kdistill.data.tags import to_iob2
from kdistill.errors import LINE_BREAK, DataError, decode_utf8, encode_utf8


def _decode(path: Path) -> str:
    return decode_utf8(path.read_bytes(), str(path), DataError)


def show(name) -> str:
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
        raise DataError(f"{where} key '{show(e.args[0])}' appears twice in one object; rename one so it is clear "
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
            encode_utf8(cell, f"{where}: column '{show(column)}'", DataError)
    return value


def _duplicates(columns: list, path: Path) -> None:
    counts = Counter(c for c in columns if c)  # unnamed columns (trailing separators) are never read
    twice = [c for c, n in counts.items() if n > 1]
    if twice:
        raise DataError(f"{path}: column '{show(twice[0])}' appears {counts[twice[0]]} times in the header; rename "
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
        for i, line in enumerate(_lines(text), 1):  # (LINE_BREAK: not at U+2028, which JSON strings may hold)
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


TOKEN_FILE_SUFFIXES = (".conll", ".txt", ".tsv", ".bio", ".iob")
"""Files read as CoNLL-style columns (token ... tag; blank line between sentences); .jsonl/.json as JSON Lines."""


def _check_tag(tag: str, where: str) -> str:
    if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
        raise DataError(f"{where}: tag '{show(tag)}' is not BIO (O, B-TYPE or I-TYPE)")
    if not tag.isprintable() or any(c.isspace() for c in tag):
        # a tag is a label name: it reaches messages, reports and config.json's id2label as it is
        raise DataError(f"{where}: tag {tag!r} holds whitespace or a control character; a tag is one printable "
                        "word (O, B-TYPE or I-TYPE)")
    return tag


def _lines(text: str) -> list[str]:
    return LINE_BREAK.split(text)


def read_conll(path: str | Path) -> list[dict]:
    """Sentences of a CoNLL-style file: one token a line, whitespace-separated columns, the token first and its tag
    last (CoNLL-2003: token POS chunk NER); a blank line ends a sentence; `-DOCSTART-` lines are skipped. Tags in
    IOB1 are converted to IOB2."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    sentences, tokens, tags = [], [], []
    columns = None  # (count, line) of the first token line: every token line has as many
    for i, line in enumerate(_lines(_decode(path)), 1):
        fields = line.split()
        if not fields:
            if tokens:
                sentences.append({"tokens": tokens, "tags": to_iob2(tags)})
            tokens, tags = [], []
            continue
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2:
            raise DataError(f"{path}: line {i}: one column ('{show(fields[0])}'); expected a token and its tag "
                            "separated by whitespace (a blank line between sentences)")
        if columns is None:
            columns = (len(fields), i)
        elif len(fields) != columns[0]:
            raise DataError(f"{path}: line {i}: {len(fields)} columns, but line {columns[1]} has {columns[0]}; "
                            "every line of a CoNLL file is one token and the same columns (token ... tag), "
                            "sentences separated by a blank line")
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
    for i, line in enumerate(_lines(_decode(path)), 1):
        if not line.strip():
            continue
        where = f"{path}: line {i}"
        row = _record(_json(line, path, i), where)
        tokens, tags = row.get("tokens"), row.get("tags")
        for key, value in (("tokens", tokens), ("tags", tags)):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise DataError(f"{where}: '{key}' must be a non-empty list of strings, like "
                                '{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}')
            for n, item in enumerate(value):  # "\ud800" escapes inside the lists: no tokenizer or Arrow takes them
                if not item.isascii():
                    encode_utf8(item, f"{where}: '{key}' item {n}", DataError)
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
