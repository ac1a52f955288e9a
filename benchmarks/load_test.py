"""Load test of `kdistill serve`: start a server on loopback, hit it from N clients, print one JSON line.

    python benchmarks/load_test.py runs/demo/student --clients 16 --requests 2000 --time-limit 30

The server runs in its own process (so client threads do not share its GIL). Each client is a thread with
its own keep-alive HTTP connection, sending POST /predict {"text": ...} back to back; the run stops after
--requests requests in total or --time-limit seconds, whichever comes first. Latency is per request as the
client sees it. The server's batch counters (GET /metadata) show how much micro-batching happened.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

TEXTS = [
    "The team scored a late goal to win the match.",
    "New phone chips make software run faster on the network.",
    "The minister called a vote on the new election law.",
    "Fans waited hours outside the stadium for the final.",
    "The startup released an open source robot controller.",
    "Parliament will debate the budget next week.",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int, options: dict) -> subprocess.Popen:
    code = (
        "import json, sys\n"
        "from kdistill.deploy.serve import run_server\n"
        "run_server(sys.argv[1], **json.loads(sys.argv[2]))\n"
    )
    kwargs = {"host": "127.0.0.1", "port": port, "log_level": "warning", **options}
    env = dict(os.environ)  # make the repo's kdistill importable even when it is not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-c", code, model, json.dumps(kwargs)], env=env)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"load_test: server exited with code {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"load_test: server not healthy after {timeout:.0f} s")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model dir to serve")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000, help="total requests (upper bound)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds (upper bound)")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "onnx-int8"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-wait-ms", type=float, default=5)
    parser.add_argument("--max-batch-texts", type=int, default=64)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        parser.error(f"model dir not found: {args.model}")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    options = {"backend": args.backend, "workers": args.workers, "batch_wait_ms": args.batch_wait_ms,
               "max_batch_texts": args.max_batch_texts, "max_queue": max(1024, 2 * args.clients)}  # fmt: skip
    proc = _start_server(args.model, port, options)
    try:
        _wait_healthy(url, proc, args.startup_timeout)
        with httpx.Client(base_url=url, timeout=30) as c:
            c.post("/predict", json={"texts": TEXTS[:2]}).raise_for_status()  # warm-up
            before = c.get("/metadata").json()

        lock = threading.Lock()
        issued = 0
        latencies: list[float] = []
        errors: Counter = Counter()
        stop_at = time.monotonic() + args.time_limit

        def client(worker: int) -> None:
            nonlocal issued
            with httpx.Client(base_url=url, timeout=60) as c:
                while time.monotonic() < stop_at:
                    with lock:
                        if issued >= args.requests:
                            return
                        i = issued
                        issued += 1
                    texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(args.texts_per_request)]
                    body = {"text": texts[0]} if args.texts_per_request == 1 else {"texts": texts}
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/predict", json=body)
                        ok = r.status_code == 200
                        kind = str(r.status_code)
                    except httpx.HTTPError as e:
                        ok, kind = False, type(e).__name__
                    elapsed = time.perf_counter() - t0
                    with lock:
                        if ok:
                            latencies.append(elapsed)
                        else:
                            errors[kind] += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(w,)) for w in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        duration = time.perf_counter() - start
        with httpx.Client(base_url=url, timeout=30) as c:
            after = c.get("/metadata").json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # batch counters are per worker process: only meaningful when both reads reached the same process
    same_process = before.get("pid") == after.get("pid")
    batches = after["batching"]["batches"] - before["batching"]["batches"] if same_process else None
    texts_done = after["batching"]["texts"] - before["batching"]["texts"] if same_process else None
    ms = [x * 1000 for x in latencies]
    result = {
        "benchmark": "load_test",
        "model": after.get("model"),
        "backend": after.get("backend"),
        "clients": args.clients,
        "texts_per_request": args.texts_per_request,
        "workers": args.workers,
        "requests": len(ms) + sum(errors.values()),
        "ok": len(ms),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "duration_s": round(duration, 3),
        "req_per_s": round(len(ms) / duration, 2) if duration else None,
        "p50_ms": round(_percentile(ms, 0.5), 2) if ms else None,
        "p99_ms": round(_percentile(ms, 0.99), 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
        "server_batches": batches,  # null when /metadata was answered by different worker processes
        "server_mean_batch_texts": round(texts_done / batches, 2) if batches else None,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
