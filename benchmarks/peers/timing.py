"""What every peer worker shares, stdlib only: each worker runs in its peer's own venv, where neither kdistill nor
the harness's other modules are installed, and imports this file from beside it.

A worker is `python worker_<peer>.py JOB.json`. The job names its `mode` ("train" or "speed"), the files it reads
and the `result` file it writes (JSON, written last, so its presence means the job finished). On an error the
worker's last line on stderr is `<ExceptionType>: <message>` on one line, which the harness records for the row.

Speed (`time_texts`), the protocol kdistill's own measure.compare_speed follows, but from raw text to output
(tokenization included: for a static embedding model the tokenizer is most of the model): batch 1 over
`warmup + repeats` test texts (cycling), the first `warmup` calls untimed; then batches of `batch_size` texts,
1 untimed and max(3, repeats // 4) timed. The worker returns every timing; the harness pools the rounds and takes
medians.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str | Path, obj) -> None:
    """Write `obj` beside `path`, then rename it into place: a reader sees no file or the whole file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def versions(*distributions: str) -> dict[str, str]:
    """The installed version of each distribution, as `pip freeze` names it."""
    return {name: metadata.version(name) for name in distributions}


def use_threads(threads: int) -> None:
    """torch's intra-op threads (the harness also sets OMP_NUM_THREADS and RAYON_NUM_THREADS before the start)."""
    import torch

    torch.set_num_threads(threads)


def time_texts(call: Callable[[list[str]], object], texts: list[str], *, batch_size: int, warmup: int,
               repeats: int) -> dict:
    """{"single_s": [repeats seconds], "batch_s": [max(3, repeats // 4) seconds], "batch_size"}: `call` on one
    text at a time, then on `batch_size` texts at a time (see the module doc)."""
    n = len(texts)
    single = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        call([texts[i % n]])
        if i >= warmup:
            single.append(time.perf_counter() - started)
    batch = []
    for j in range(1 + max(3, repeats // 4)):
        chunk = [texts[(j * batch_size + k) % n] for k in range(batch_size)]
        started = time.perf_counter()
        call(chunk)
        if j >= 1:
            batch.append(time.perf_counter() - started)
    return {"single_s": single, "batch_s": batch, "batch_size": batch_size}


def speed_job(job: dict, load: Callable[[str, dict], Callable[[list[str]], object]]) -> dict:
    """A speed job: `load(model_dir, job)` gives the text -> output call, timed by `time_texts` on the job's texts."""
    use_threads(job["threads"])
    texts = [row["text"] for row in read_jsonl(job["texts"])]
    call = load(job["model"], job)
    return time_texts(call, texts, batch_size=job["batch_size"], warmup=job["warmup"], repeats=job["repeats"])


def main(modes: dict[str, Callable[[dict], dict]]) -> None:
    """Run the job file named on the command line with its mode's function and write what it returns."""
    job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    try:
        result = modes[job["mode"]](job)
    except Exception as e:  # any failure: the traceback for the log, then the one line the harness records
        traceback.print_exc()
        message = " ".join(str(e).split()) or "(no message)"
        print(f"{type(e).__name__}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    write_json(job["result"], result)
