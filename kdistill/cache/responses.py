"""Teacher-written responses, stored once: what sequence-level distillation learns from.

A teacher answering hundreds of prompts is the slow part of an instruction run (minutes to hours on a CPU), and
its answers do not change between runs, seeds or students: they are generated once and kept under
`$KDISTILL_CACHE_DIR/teacher-responses/<key digest>/`, as Parquet shards of `SHARD_PROMPTS` prompts each (columns
`row` int64 and `response` list<int32>: the new tokens, up to and including the end of turn), each written
atomically with its key in the footer as soon as its prompts are answered, then a manifest. A killed pass resumes
at the first missing shard, paying for no prompt twice.

The key holds everything the responses depend on: the teacher's weights (a fingerprint), the prompts' token ids,
the stop ids, the generation settings (greedy or sampled, temperature, seed, max new tokens) and the format.
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


def _read_shard(file: Path, key: dict, rows: range) -> list[list[int]] | None:
    """The responses of a finished shard of `key` holding `rows`, else None (absent, partial, another key)."""
    try:
        table = pq.read_table(file)
        meta = json.loads((table.schema.metadata or {}).get(FOOTER, b"null"))
    except (OSError, ValueError):  # absent or not Parquet (pyarrow's errors subclass these)
        return None
    if meta != {"key": key, "first_row": rows.start, "num_rows": len(rows)}:
        return None
    if table.column("row").to_pylist() != list(rows):
        return None
    return table.column("response").to_pylist()


def _write_shard(file: Path, key: dict, rows: range, responses: list[list[int]]) -> None:
    table = pa.table({"row": pa.array(list(rows), pa.int64()),
                      "response": pa.array(responses, pa.list_(pa.int32()))})
    table = table.replace_schema_metadata(
        {FOOTER: json.dumps({"key": key, "first_row": rows.start, "num_rows": len(rows)}).encode()})
    with output_errors(file), atomic_file(file) as f:
        pq.write_table(table, f, compression="zstd")


def teacher_responses(teacher, prompts: Sequence[Sequence[int]], *, pad_id: int, stop_ids: set[int],
                      max_new_tokens: int, sample: bool = False, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 16, root: str | Path | None = None) -> tuple[list[list[int]], dict]:
    """The teacher's response to every prompt (token ids, in order), read from the store where it holds them and
    generated (and stored, shard by shard) where it does not. Returns (responses, info): the store's path, how many
    prompts the teacher answered now ("calls"), the generation time and tokens/s, and whether it was reused."""
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
        stored = _read_shard(file, key, rows)
        if stored is None:
            made = generate(teacher, [prompts[i] for i in rows], pad_id=pad_id, stop_ids=stop_ids,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, sample=sample,
                            temperature=temperature, seed=seed + s,
                            progress=f"teacher responses {rows.start}-{rows.stop} of {len(prompts)}")
            _write_shard(file, key, rows, made.responses)
            stored, calls = made.responses, calls + len(rows)
            new_tokens, seconds = new_tokens + made.new_tokens, seconds + made.seconds
        responses += stored
    atomic_write_json(path / "manifest.json", {"key": key, "shards": -(-len(prompts) // SHARD_PROMPTS)})
    info = {"path": str(path), "prompts": len(prompts), "calls": calls, "reused": calls == 0,
            "generate_seconds": seconds, "generate_tokens_per_s": new_tokens / seconds if seconds else None,
            "seconds": time.perf_counter() - started, "key": key}
    log.info("teacher responses %s: %d prompts, %s", path, len(prompts),
             "all read from the store" if calls == 0 else f"{calls} answered now in {seconds:.0f} s "
             f"({info['generate_tokens_per_s']:.1f} tokens/s)")
    return responses, info
