"""Teacher-written responses, stored once: what sequence-level distillation learns from.

A teacher answering hundreds of prompts is the slow part of an instruction run (minutes to hours on a CPU), and
its answers do not change between runs, seeds or students: they are generated once and kept under
`$KDISTILL_CACHE_DIR/teacher-responses/<key digest>/`, as Parquet shards of `SHARD_PROMPTS` prompts each (columns
`row` int64 and `response` list<int32>: the new tokens, up to and including the end of turn), each written
atomically with its key in the footer as soon as its prompts are answered, then a manifest. A killed pass resumes
at the first missing shard, paying for no prompt twice.

The key holds everything the responses depend on: the teacher's weights (a fingerprint), the prompts' token ids,
the stop ids, the generation settings (greedy or sampled, temperature, seed, max new tokens) and the format.

A teacher behind an OpenAI-compatible endpoint answers in text, one prompt per request, in any order: its store
(`text_responses`, a `RowStore`) has the same layout with columns `row`, `response` string and `tokens` (the completion's tokens
as the server counted them, null where it did not say), keyed by the endpoint's URL and model name, the
conversations sent and the request's settings (the weights behind the name are not seen: a server that swaps them
keeps its name's answers). An unfinished shard holds the rows answered so far, rewritten at most every
`FLUSH_SECONDS` and whenever it fills, so a killed pass asks again only for what was not stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdistill.assets import cache_root
from kdistill.cache.keys import fingerprint_model, key_digest
from kdistill.generation import generate
from kdistill.io import atomic_file, atomic_write_json, check_writable, output_errors

log = logging.getLogger(__name__)

RESPONSES_FORMAT = 1
SHARD_PROMPTS = 64
"""Prompts per shard: the unit of resume."""
FOOTER = b"kdistill.teacher_responses"
FLUSH_SECONDS = 1.0
"""How long a text response may wait in memory before its unfinished shard is rewritten: what a kill can lose."""


def responses_root() -> Path:
    """`$KDISTILL_CACHE_DIR/teacher-responses`, else `~/.cache/kdistill/teacher-responses`."""
    return cache_root() / "teacher-responses"


def responses_key(teacher, prompts: Sequence[Sequence[int]], *, stop_ids: set[int], max_new_tokens: int,
                  sample: bool, temperature: float, seed: int) -> dict:
    """Everything the teacher's responses to `prompts` depend on; equal keys, equal responses."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(list(map(int, p))).encode() + b"\n")
    return {"format": RESPONSES_FORMAT, "teacher": fingerprint_model(teacher), "prompts": h.hexdigest()[:32],
            "num_prompts": len(prompts), "stop_ids": sorted(map(int, stop_ids)),
            "max_new_tokens": int(max_new_tokens), "sample": bool(sample),
            "temperature": float(temperature) if sample else None, "seed": int(seed) if sample else None}


def read_shard(file: Path, key: dict, rows: range) -> pa.Table | None:
    """The table of a shard of `key` holding `rows`: the rows stored so far, in order (all of them once finished),
    else None (absent, partial write, another key)."""
    try:
        table = pq.read_table(file)
        meta = json.loads((table.schema.metadata or {}).get(FOOTER, b"null"))
    except (OSError, ValueError):  # absent or not Parquet (pyarrow's errors subclass these)
        return None
    if meta != {"key": key, "first_row": rows.start, "num_rows": len(rows)}:
        return None
    held = table.column("row").to_pylist()
    if held != sorted(set(held)) or any(r not in rows for r in held):
        return None
    return table


def write_shard(file: Path, key: dict, rows: range, columns: dict[str, pa.Array]) -> None:
    table = pa.table(columns).replace_schema_metadata(
        {FOOTER: json.dumps({"key": key, "first_row": rows.start, "num_rows": len(rows)}).encode()})
    with output_errors(file), atomic_file(file) as f:
        pq.write_table(table, f, compression="zstd")


def teacher_responses(teacher, prompts: Sequence[Sequence[int]], *, pad_id: int, stop_ids: set[int],
                      max_new_tokens: int, sample: bool = False, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 16, root: str | Path | None = None) -> tuple[list[list[int]], dict]:
    """The teacher's response to every prompt (token ids, in order), read from the store where it holds them and
    generated (and stored, shard by shard) where it does not. Returns (responses, info): the store's path, how many
    prompts the teacher answered now ("calls") and read from the store ("reused"), the generation time and tokens/s."""
    key = responses_key(teacher, prompts, stop_ids=stop_ids, max_new_tokens=max_new_tokens, sample=sample,
                        temperature=temperature, seed=seed)
    path = Path(root or responses_root()) / f"responses-{key_digest(key)}"
    check_writable(path, inside=True)
    path.mkdir(parents=True, exist_ok=True)
    responses: list[list[int]] = []
    calls, new_tokens, seconds = 0, 0, 0.0
    started = time.perf_counter()
    for s, first in enumerate(range(0, len(prompts), SHARD_PROMPTS)):
        rows = range(first, min(len(prompts), first + SHARD_PROMPTS))
        file = path / f"shard-{s:05d}.parquet"
        table = read_shard(file, key, rows)
        # a batch of prompts is generated at once: a shard is stored whole or not at all
        stored = table.column("response").to_pylist() if table is not None and len(table) == len(rows) else None
        if stored is None:
            made = generate(teacher, [prompts[i] for i in rows], pad_id=pad_id, stop_ids=stop_ids,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, sample=sample,
                            temperature=temperature, seed=seed + s,
                            progress=f"teacher responses {rows.start}-{rows.stop} of {len(prompts)}")
            write_shard(file, key, rows, {"row": pa.array(list(rows), pa.int64()),
                                           "response": pa.array(made.responses, pa.list_(pa.int32()))})
            stored, calls = made.responses, calls + len(rows)
            new_tokens, seconds = new_tokens + made.new_tokens, seconds + made.seconds
        responses += stored
    atomic_write_json(path / "manifest.json", {"key": key, "shards": -(-len(prompts) // SHARD_PROMPTS)})
    info = {"path": str(path), "prompts": len(prompts), "calls": calls, "reused": len(prompts) - calls,
            "generate_seconds": seconds, "generate_tokens_per_s": new_tokens / seconds if seconds else None,
            "seconds": time.perf_counter() - started, "key": key}
    log.info("teacher responses %s: %d prompts, %s", path, len(prompts),
             "all read from the store" if calls == 0 else f"{calls} answered now in {seconds:.0f} s "
             f"({info['generate_tokens_per_s']:.1f} tokens/s)")
    return responses, info


def text_responses_key(*, url: str, model: str, conversations: Sequence[Sequence[dict]], max_tokens: int,
                       temperature: float) -> dict:
    """Everything an endpoint's text responses depend on that kdistill can see: the server (its URL and the
    model's name), the conversations sent, and the request's settings."""
    h = hashlib.sha256()
    for messages in conversations:
        h.update(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return {"format": RESPONSES_FORMAT, "endpoint": url, "model": model, "conversations": h.hexdigest()[:32],
            "num_prompts": len(conversations), "max_tokens": int(max_tokens), "temperature": float(temperature)}


class RowStore:
    """Values an endpoint returns row by row, in any order (a teacher's text answers, an LLM's label scores), stored
    under `path` as the shards of one `key`, columns `row` and `columns` (name -> Arrow type): what the store held
    when opened is read at once; `record` keeps a new row, on disk once its shard fills or at the next `flush`
    (which whoever asks the endpoint calls every FLUSH_SECONDS, and when it stops)."""

    def __init__(self, key: dict, path: Path, columns: dict[str, pa.DataType]):
        self.key = key
        self.path = path
        self.columns = columns
        check_writable(self.path, inside=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.values: dict[int, tuple] = {}
        for s in range(self.shards):
            table = read_shard(self._file(s), key, self._rows(s))
            if table is not None:
                for row, *values in zip(*(table.column(c).to_pylist() for c in ("row", *columns))):
                    self.values[row] = tuple(values)
        self.reused = len(self.values)
        """Rows read from the store."""
        self._unwritten: set[int] = set()

    @property
    def shards(self) -> int:
        return -(-self.key["num_prompts"] // SHARD_PROMPTS)

    def _rows(self, shard: int) -> range:
        return range(shard * SHARD_PROMPTS, min(self.key["num_prompts"], (shard + 1) * SHARD_PROMPTS))

    def _file(self, shard: int) -> Path:
        return self.path / f"shard-{shard:05d}.parquet"

    def missing(self) -> list[int]:
        """The rows (in order) the store holds nothing for."""
        return [i for i in range(self.key["num_prompts"]) if i not in self.values]

    def record(self, row: int, *values) -> None:
        """Keep row `row`'s values, one per column."""
        self.values[row] = values
        shard = row // SHARD_PROMPTS
        self._unwritten.add(shard)
        if all(i in self.values for i in self._rows(shard)):
            self._write(shard)

    def flush(self) -> None:
        """Write every shard that holds a row not yet on disk: what was answered so far."""
        for shard in sorted(self._unwritten):
            self._write(shard)

    def _write(self, shard: int) -> None:
        rows = [i for i in self._rows(shard) if i in self.values]
        arrays = {name: pa.array([self.values[i][c] for i in rows], kind)
                  for c, (name, kind) in enumerate(self.columns.items())}
        write_shard(self._file(shard), self.key, self._rows(shard), {"row": pa.array(rows, pa.int64()), **arrays})
        self._unwritten.discard(shard)

    def finish(self) -> list[list]:
        """Each column's values over every row, in row order, once the store holds them all; writes the manifest."""
        atomic_write_json(self.path / "manifest.json", {"key": self.key, "shards": self.shards})
        rows = range(self.key["num_prompts"])
        return [[self.values[i][c] for i in rows] for c in range(len(self.columns))]


def text_responses(key: dict, root: str | Path | None = None) -> RowStore:
    """The store of an endpoint's text responses of one `text_responses_key`: columns `response` and `tokens`."""
    return RowStore(key, Path(root or responses_root()) / f"responses-{key_digest(key)}",
                    {"response": pa.string(), "tokens": pa.int32()})
