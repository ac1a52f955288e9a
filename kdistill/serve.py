"""HTTP server for a classification model dir: FastAPI app with dynamic micro-batching, launched by uvicorn.

Endpoints
    GET  /health     {"status": "ok"}                         (never needs the API key: for load balancers)
    GET  /metadata   model name, labels, backend, max_length, num_parameters, limits, batching counters
    POST /predict    {"text": "one text"}         -> {"prediction": {"label", "label_name", "probabilities"}}
                     {"texts": ["a", "b", ...]}   -> {"predictions": [{...}, {...}, ...]}  (same order)

Exactly one of "text" (a string) and "texts" (a non-empty list of strings) is accepted; {"text": [...]} is a
422 that points to "texts", so each field has one meaning. Every error is JSON {"detail": "<one clear line>"}:
400 malformed JSON, 401 missing/wrong X-API-Key (when an api_key is set), 413 body over max_body_bytes
(Content-Length and the bytes actually received are both checked), 422 wrong types, empty list, empty or
whitespace-only text, text over max_text_chars, more than max_batch_texts texts, 503 queue full (Retry-After).

Micro-batching: each request's texts go into a bounded asyncio queue (max_queue requests; full -> 503). One
background task takes the first waiting request, then keeps collecting until it has max_batch_texts texts or
batch_wait_ms has passed, runs one batched predict in a worker thread, and hands each request its slice. While
a batch runs, new requests queue up and form the next batch, so throughput grows with concurrency.

Several worker processes (`run_server(workers=N)`): uvicorn imports `kdistill.serve:app_from_env` as a factory
in each worker; the app config travels in the KDISTILL_SERVE_CONFIG environment variable. Counters in
/metadata are per worker process.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from kdistill.predict import Backend, inspect_model_dir, load_predictor

logger = logging.getLogger(__name__)

CONFIG_ENV = "KDISTILL_SERVE_CONFIG"
API_KEY_HEADER = "X-API-Key"


class PredictRequest(BaseModel):
    """Body of POST /predict: exactly one of `text` or `texts`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = None
    """One text; the answer is {"prediction": {...}}."""
    texts: list[str] | None = None
    """Several texts; the answer is {"predictions": [...]} in the same order."""

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self


class QueueFullError(Exception):
    pass


class MicroBatcher:
    """Collects concurrent requests into batches for one predict function that runs in a worker thread."""

    def __init__(self, predict_fn, *, max_batch_texts: int, batch_wait_ms: float, max_queue: int):
        self.predict_fn = predict_fn
        self.max_batch_texts = max_batch_texts
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = {"batches": 0, "requests": 0, "texts": 0, "largest_batch": 0, "rejected_queue_full": 0}
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: list = []

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdistill-predict")
        self._task = asyncio.create_task(self._run(), name="kdistill-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        pending = list(self._inflight)
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for _, fut in pending:
            if not fut.done():
                fut.set_exception(HTTPException(503, "server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: list[str]) -> list[dict]:
        """Queue `texts` and wait for their predictions; QueueFullError when max_queue requests wait."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((texts, fut))
        except asyncio.QueueFull:
            self.stats["rejected_queue_full"] += 1
            raise QueueFullError from None
        return await fut

    async def _next(self, timeout: float):
        """The next queued item, or None after `timeout` seconds; an unclaimed item stays in the queue."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return None
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter}, timeout=timeout)
        if getter in done:
            return getter.result()
        getter.cancel()  # Queue.get leaves the item in the queue when cancelled
        return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            items, n = [first], len(first[0])
            deadline = loop.time() + self.batch_wait_s
            while n < self.max_batch_texts:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if n + len(item[0]) > self.max_batch_texts:
                    carry = item  # starts the next batch
                    break
                items.append(item)
                n += len(item[0])
            items = [it for it in items if not it[1].done()]  # drop requests whose client went away
            if not items:
                continue
            texts = [t for it in items for t in it[0]]
            self._inflight = items
            try:
                results = await loop.run_in_executor(self._executor, self.predict_fn, texts)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed batch fails its requests, not the server
                logger.exception("batch of %d texts failed", len(texts))
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self._inflight = []
            self.stats["batches"] += 1
            self.stats["requests"] += len(items)
            self.stats["texts"] += len(texts)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(texts))
            start = 0
            for item_texts, fut in items:
                if not fut.done():
                    fut.set_result(results[start : start + len(item_texts)])
                start += len(item_texts)


class _TruncationLog:
    """Counts truncated inputs; warns the first time and then at most once a minute, not once per batch."""

    def __init__(self, max_length: int, every_s: float = 60.0):
        self.max_length = max_length
        self.every_s = every_s
        self.count = 0
        self._unreported = 0
        self._last = float("-inf")

    def record(self, results: list[dict], n_truncated: int) -> list[dict]:
        if n_truncated:
            self.count += n_truncated
            self._unreported += n_truncated
            now = time.monotonic()
            if now - self._last >= self.every_s:
                logger.warning(
                    "%d input(s) were longer than max_length=%d tokens and were truncated (%d since start)",
                    self._unreported,
                    self.max_length,
                    self.count,
                )
                self._unreported, self._last = 0, now
        return results


def _validation_message(err: ValidationError, payload: Any) -> str:
    if not isinstance(payload, dict):
        return "body must be a JSON object: {\"text\": \"...\"} or {\"texts\": [\"...\", ...]}"
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        return f"unknown field {loc!r}; give 'text' (a string) or 'texts' (a list of strings)"
    if loc == "text" and isinstance(payload.get("text"), list):
        return "'text' must be a string; send a list as 'texts'"
    return f"{loc}: {msg}" if loc else msg


def create_app(
    model_dir: str | os.PathLike,
    *,
    api_key: str | None = None,
    max_batch_texts: int = 64,
    max_body_bytes: int = 1_000_000,
    max_text_chars: int = 20_000,
    batch_wait_ms: float = 5,
    max_queue: int = 1024,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> FastAPI:
    """A FastAPI app serving `model_dir` (loaded now, so a bad dir fails before any port is opened)."""
    for name, value in [("max_batch_texts", max_batch_texts), ("max_body_bytes", max_body_bytes),
                        ("max_text_chars", max_text_chars), ("max_queue", max_queue)]:  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_wait_ms < 0:
        raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
    predictor = load_predictor(model_dir, backend=backend, num_threads=num_threads)
    truncation_log = _TruncationLog(predictor.max_length)
    batcher = MicroBatcher(
        lambda texts: truncation_log.record(*predictor.predict_counted(texts, batch_size=max_batch_texts)),
        max_batch_texts=max_batch_texts,
        batch_wait_ms=batch_wait_ms,
        max_queue=max_queue,
    )
    limits = {
        "max_batch_texts": max_batch_texts,
        "max_body_bytes": max_body_bytes,
        "max_text_chars": max_text_chars,
        "batch_wait_ms": batch_wait_ms,
        "max_queue": max_queue,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="kdistill", summary="Text classification with a distilled model", lifespan=lifespan)
    app.state.predictor = predictor
    app.state.batcher = batcher

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER)
        if given is None:
            raise HTTPException(401, f"missing {API_KEY_HEADER} header", headers={"WWW-Authenticate": "ApiKey"})
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, f"wrong {API_KEY_HEADER}", headers={"WWW-Authenticate": "ApiKey"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metadata", dependencies=[Depends(require_key)])
    async def metadata() -> dict:
        return {
            **predictor.metadata,
            "limits": limits,
            "batching": dict(batcher.stats),
            "truncated_texts": truncation_log.count,
            "pid": os.getpid(),
        }

    @app.post(
        "/predict",
        dependencies=[Depends(require_key)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(request: Request) -> dict:
        body = await _read_body(request, max_body_bytes)
        if not body.strip():
            raise HTTPException(400, "malformed JSON: the request body is empty")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise HTTPException(400, f"malformed JSON: {e}") from None
        try:
            req = PredictRequest.model_validate(payload)
        except ValidationError as e:
            raise HTTPException(422, _validation_message(e, payload)) from None
        texts = [req.text] if req.text is not None else req.texts
        field = "text" if req.text is not None else "texts"
        if not texts:
            raise HTTPException(422, "'texts' must not be empty")
        if len(texts) > max_batch_texts:
            raise HTTPException(422, f"too many texts: {len(texts)} (at most {max_batch_texts} per request)")
        for i, t in enumerate(texts):
            where = field if field == "text" else f"texts[{i}]"
            if not t.strip():
                raise HTTPException(422, f"{where} is empty")
            if len(t) > max_text_chars:
                raise HTTPException(422, f"{where} has {len(t)} characters (at most {max_text_chars})")
        try:
            results = await batcher.submit(texts)
        except QueueFullError:
            raise HTTPException(503, "server busy: request queue is full; retry later", headers={"Retry-After": "1"})
        return {"prediction": results[0]} if field == "text" else {"predictions": results}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as the declared or received size passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "invalid Content-Length header") from None
        if size > limit:
            raise HTTPException(413, f"request body is {size} bytes (at most {limit})")
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, f"request body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: create_app(**json(KDISTILL_SERVE_CONFIG))."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with kdistill.serve.run_server")
    return create_app(**json.loads(raw))


def run_server(
    model_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    api_key: str | None = None,
    backend: Backend = "auto",
    num_threads: int | None = None,
    log_level: str = "info",
    **limits: Any,
) -> None:
    """Serve `model_dir` with uvicorn until interrupted.

    limits: create_app's max_batch_texts, max_body_bytes, max_text_chars, batch_wait_ms, max_queue.
    num_threads: compute threads per worker; by default the CPU count divided among the workers.
    """
    import uvicorn

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    info = inspect_model_dir(model_dir)  # fail fast, before any worker starts
    unknown = set(limits) - {"max_batch_texts", "max_body_bytes", "max_text_chars", "batch_wait_ms", "max_queue"}
    if unknown:
        raise ValueError(f"unknown server option(s): {', '.join(sorted(unknown))}")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    if num_threads is None and workers > 1:
        num_threads = max(1, (os.cpu_count() or 1) // workers)
    config = {"model_dir": str(info.path.resolve()), "api_key": api_key, "backend": backend,
              "num_threads": num_threads, **limits}  # fmt: skip
    if workers == 1:
        app = create_app(**config)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    else:
        os.environ[CONFIG_ENV] = json.dumps(config)
        uvicorn.run(
            "kdistill.serve:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level
        )
