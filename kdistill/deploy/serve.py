"""HTTP server for a model dir: FastAPI app with dynamic micro-batching, launched by uvicorn. A causal-LM dir
(task causal-lm or instruction) answers the OpenAI-compatible API instead of /predict
(kdistill.deploy.openai_api: /v1/models, /v1/completions, /v1/chat/completions).

Endpoints
    GET  /health     {"status": "ok"}                         (never needs the API key: for load balancers)
    GET  /metadata   model name, labels, backend, max_length, num_parameters, limits, batching counters
    POST /predict    {"text": "one text"}         -> {"prediction": {"label", "label_name", "probabilities"}}
                     {"texts": ["a", "b", ...]}   -> {"predictions": [{...}, {...}, ...]}  (same order)

    GET  /docs, /redoc, /openapi.json                          (need the API key when one is set)

The API key (`api_key`) is sent as the X-API-Key header or as `Authorization: Bearer KEY` (what OpenAI clients
send). Exactly one of "text" (a string) and "texts" (a non-empty list of strings) is accepted; {"text": [...]} is a
422 that points to "texts", so each field has one meaning. A body is JSON in UTF-8 and says so: Content-Type
`application/json` (charset utf-8 or none; a leading UTF-8 BOM is ignored). Every error is JSON
{"detail": "<one clear line>"}: 400 malformed JSON (a body that is not UTF-8, such as UTF-16 or UTF-32, and a key
given twice in one object included), 401 missing/wrong X-API-Key (when an api_key is set), 415 another
Content-Type or charset, or none, 413 body over max_body_bytes
(Content-Length and the bytes actually received are both checked; the body is still read, up to
DRAIN_LIMIT_BYTES, so that clients which send it all before reading, like Python's urllib, get the 413), 422
wrong types, empty list, empty or whitespace-only text, text that is not UTF-8 encodable (an unpaired surrogate
such as "\ud800"), text over max_text_chars, more than max_batch_texts texts, 503 queue full or no answer
within request_timeout_s (both with Retry-After). Every text is checked before it is queued, so a request
that gets past the checks cannot fail the others batched with it; should the model fail on a batch anyway,
each request of that batch is run again on its own and only the one that fails again gets its error (500).

Micro-batching: each request's texts go into an asyncio queue. One background task takes the first waiting
request, then keeps collecting until it has max_batch_texts texts or batch_wait_ms has passed, runs one batched
predict in a worker thread, and hands each request its slice. While a batch runs, new requests queue up and
form the next batch, so throughput grows with concurrency. A request holds its place (one of max_queue, its
texts' UTF-8 bytes out of max_queue_bytes) from the moment it is queued until it is answered, times out or its
client hangs up; a request that timed out or whose client hung up is dropped before it is computed.

Several worker processes (`run_server(workers=N)`): uvicorn imports `kdistill.deploy.serve:app_from_env` as a
factory in each worker; the app config travels in the KDISTILL_SERVE_CONFIG environment variable. Counters in
/metadata are per worker process.

A bad model dir or setting (a limit, the worker count) is a kdistill.errors.UserError naming it, raised before any
port is opened.

This module holds the app, its /predict route and the micro-batcher; reading a body (its size, Content-Type and
strict JSON, DRAIN_LIMIT_BYTES) is kdistill.deploy.request_body's, shared with the OpenAI-compatible API.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from kdistill.deploy.lm_worker import LMWorker, is_causal_lm
from kdistill.deploy.openai_api import add_routes
from kdistill.deploy.predict import Backend, EmbeddingPredictor, load_predictor
from kdistill.deploy.request_body import CLIENT_CLOSED_REQUEST, client_gone, read_json
from kdistill.errors import UserError, encode_utf8
from kdistill.models import inspect_model_dir

logger = logging.getLogger(__name__)

CONFIG_ENV = "KDISTILL_SERVE_CONFIG"
API_KEY_HEADER = "X-API-Key"
LIMITS = ("max_batch_texts", "max_body_bytes", "max_text_chars", "batch_wait_ms", "max_queue", "max_queue_bytes",
          "request_timeout_s", "max_tokens", "default_max_tokens")  # fmt: skip


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
    """max_queue requests or max_queue_bytes of text are waiting; the message says which."""


class MicroBatcher:
    """Collects concurrent requests into batches for one predict function that runs in a worker thread."""

    def __init__(self, predict_fn: Callable[[list[str]], list[dict]], *, max_batch_texts: int,
                 batch_wait_ms: float, max_queue: int, max_queue_bytes: int):  # fmt: skip
        self.predict_fn = predict_fn
        self.max_batch_texts = max_batch_texts
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.stats = {"batches": 0, "requests": 0, "texts": 0, "largest_batch": 0, "rejected_queue_full": 0,
                      "timed_out": 0, "dropped_disconnected": 0, "batches_rerun_per_request": 0}  # fmt: skip
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: list = []
        self._held_requests = 0
        self._held_bytes = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()  # bounded by submit's accounting, which also frees abandoned requests
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

    async def submit(self, texts: list[str], n_bytes: int) -> list[dict]:
        """Queue `texts` (`n_bytes` of UTF-8) and wait for their predictions; QueueFullError when the queue holds
        max_queue requests or the texts would take it past max_queue_bytes.

        Cancelling the wait (time limit, client gone) frees the place at once; the batcher skips the request.
        """
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self._held_requests >= self.max_queue:
            full = f"the request queue is full ({self._held_requests} requests, max_queue={self.max_queue})"
        elif self._held_bytes + n_bytes > self.max_queue_bytes:
            full = (f"the request queue is full ({self._held_bytes} bytes of text + {n_bytes} would pass "
                    f"max_queue_bytes={self.max_queue_bytes})")
        else:
            full = None
        if full:
            self.stats["rejected_queue_full"] += 1
            raise QueueFullError(f"server busy: {full}; retry later")
        fut = asyncio.get_running_loop().create_future()
        self._held_requests += 1
        self._held_bytes += n_bytes
        try:
            self._queue.put_nowait((texts, fut))
            return await fut
        finally:
            self._held_requests -= 1
            self._held_bytes -= n_bytes

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
            items = [it for it in items if not it[1].done()]  # timed out or client gone: not computed
            if not items:
                continue
            self._inflight = items
            try:
                await self._compute(items)
            finally:
                self._inflight = []

    async def _compute(self, items: list) -> None:
        """Predict one batch and hand each request its slice. When the batch fails, each of its requests is run
        again on its own, so one request the model cannot handle fails alone, not everyone batched with it."""
        texts = [t for it in items for t in it[0]]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.predict_fn, texts)
        except Exception as e:  # CancelledError is not an Exception: shutdown still stops the loop
            if len(items) > 1:
                logger.warning("batch of %d requests failed; running each on its own", len(items))
                self.stats["batches_rerun_per_request"] += 1
                for item in items:
                    if not item[1].done():
                        await self._compute([item])
            else:
                logger.error("request of %d texts failed", len(texts), exc_info=e)
                if not items[0][1].done():
                    items[0][1].set_exception(e)
            return
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
    max_queue_bytes: int = 32_000_000,
    request_timeout_s: float = 30.0,
    max_tokens: int = 1024,
    default_max_tokens: int = 256,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> FastAPI:
    """A FastAPI app serving `model_dir` (loaded now, so a bad dir fails before any port is opened).

    max_queue, max_queue_bytes: most requests, and most UTF-8 bytes of their texts, held at once (queued or being
    computed); past either, 503. request_timeout_s: a request not answered within this many seconds (queue wait
    included) gets 503 and is dropped.
    A causal LM's API (openai_api): max_tokens, the most a request may ask to generate; default_max_tokens, what
    one that does not say gets (at most max_tokens); max_batch_texts, the most choices (prompts x n) per request.

    Why one long function: FastAPI's routes are closures over this app's predictor, batcher and limits; they read
    best beside the state they share, in the order a request meets them.
    """
    for name, value in [("max_batch_texts", max_batch_texts), ("max_body_bytes", max_body_bytes),
                        ("max_text_chars", max_text_chars), ("max_queue", max_queue),
                        ("max_queue_bytes", max_queue_bytes), ("max_tokens", max_tokens),
                        ("default_max_tokens", default_max_tokens)]:  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if max_queue_bytes < max_body_bytes:  # a body's texts never take more bytes than the body
        raise UserError(f"max_queue_bytes ({max_queue_bytes}) must be >= max_body_bytes ({max_body_bytes}), "
                         "or a request that passes the body limit could never be queued")  # fmt: skip
    if batch_wait_ms < 0:
        raise UserError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
    if not request_timeout_s > 0:
        raise UserError(f"request_timeout_s must be > 0, got {request_timeout_s!r}")
    default_max_tokens = min(default_max_tokens, max_tokens)  # so that `--max-tokens 100` alone is a setting
    info = inspect_model_dir(model_dir)
    if is_causal_lm(info):
        if backend not in ("auto", "torch"):
            raise UserError(f"{info.path}: a causal LM is served with PyTorch (backend auto or torch), not {backend!r}")
        worker = LMWorker(info, max_queue=max_queue, max_tokens=max_tokens, default_max_tokens=default_max_tokens,
                          num_threads=num_threads)
        predictor = batcher = None
    else:
        worker = None
        predictor = load_predictor(model_dir, backend=backend, num_threads=num_threads)
        truncation_log = _TruncationLog(predictor.max_length)
        batcher = MicroBatcher(
            lambda texts: truncation_log.record(*predictor.predict_counted(texts, batch_size=max_batch_texts)),
            max_batch_texts=max_batch_texts,
            batch_wait_ms=batch_wait_ms,
            max_queue=max_queue,
            max_queue_bytes=max_queue_bytes,
        )
    running = worker or batcher  # what runs the model: started and stopped with the app
    limits = {
        "max_batch_texts": max_batch_texts,
        "max_body_bytes": max_body_bytes,
        "max_text_chars": max_text_chars,
        "batch_wait_ms": batch_wait_ms,
        "max_queue": max_queue,
        "max_queue_bytes": max_queue_bytes,
        "request_timeout_s": request_timeout_s,
        "max_tokens": max_tokens,
        "default_max_tokens": default_max_tokens,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await running.start()
        try:
            yield
        finally:
            await running.stop()

    # FastAPI's own docs routes cannot take a dependency; the ones below are the same pages behind require_key
    summary = "Text generation with a distilled model" if worker else "Text classification with a distilled model"
    app = FastAPI(title="kdistill", summary=summary, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)  # fmt: skip
    app.state.predictor = predictor
    app.state.batcher = batcher
    app.state.worker = worker

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        given, where = request.headers.get(API_KEY_HEADER), API_KEY_HEADER
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if given is None and scheme.lower() == "bearer":  # how OpenAI clients send the key
            given, where = token.strip(), "API key in Authorization: Bearer"
        if given is None:
            raise HTTPException(401, f"missing {API_KEY_HEADER} header (or Authorization: Bearer KEY)",
                                headers={"WWW-Authenticate": "ApiKey"})
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, f"wrong {where}", headers={"WWW-Authenticate": "ApiKey"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_key)])
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=[Depends(require_key)])
    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metadata", dependencies=[Depends(require_key)])
    async def metadata() -> dict:
        if worker is not None:
            return {**worker.metadata, "limits": limits, "generation": dict(worker.stats), "pid": os.getpid()}
        return {
            **predictor.metadata,
            "limits": limits,
            "batching": dict(batcher.stats),
            "truncated_texts": truncation_log.count,
            "pid": os.getpid(),
        }

    async def read_body_json(request: Request) -> Any:
        """A request's JSON body, through the size, content-type and strict-JSON checks."""
        return await read_json(request, max_body_bytes)

    if worker is not None:
        add_routes(app, worker, require_key=require_key, read_json=read_body_json,
                   request_timeout_s=request_timeout_s, max_choices=max_batch_texts)
        return app

    texts_body = {"requestBody": {"required": True,
                                  "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}}

    @app.post("/predict", dependencies=[Depends(require_key)], openapi_extra=texts_body)
    async def predict(request: Request) -> dict:
        answered = await answer(request)
        if isinstance(answered, Response):
            return answered
        results, field = answered
        return {"prediction": results[0]} if field == "text" else {"predictions": results}

    if isinstance(predictor, EmbeddingPredictor):  # a sentence encoder also answers with bare vectors

        @app.post("/embed", dependencies=[Depends(require_key)], openapi_extra=texts_body)
        async def embed(request: Request) -> dict:
            """{"text": ...} -> {"embedding": [...]}; {"texts": [...]} -> {"embeddings": [[...], ...]}: the
            same limits, validation and batching as /predict."""
            answered = await answer(request)
            if isinstance(answered, Response):
                return answered
            results, field = answered
            vectors = [r["embedding"] for r in results]
            return {"embedding": vectors[0]} if field == "text" else {"embeddings": vectors}

    async def answer(request: Request) -> tuple[list[dict], str] | Response:
        """A request's texts through every check (body size, JSON, one of text / texts, each text) and the batcher:
        (results in input order, "text" or "texts"), or the 499 response to a client that hung up."""
        payload = await read_body_json(request)
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
        n_bytes = 0
        for i, t in enumerate(texts):
            where = field if field == "text" else f"texts[{i}]"
            if not t.strip():
                raise HTTPException(422, f"{where} is empty")
            if len(t) > max_text_chars:
                raise HTTPException(422, f"{where} has {len(t)} characters (at most {max_text_chars})")
            try:
                n_bytes += len(encode_utf8(t, where))
            except UserError as e:
                raise HTTPException(422, str(e)) from None
        job = asyncio.ensure_future(batcher.submit(texts, n_bytes))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({job, gone}, timeout=request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            job.cancel()  # no-op when answered; else the batcher skips the request and its place is freed
        if not job.done() or job.cancelled():
            if gone.done() and not gone.cancelled():
                batcher.stats["dropped_disconnected"] += 1
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            batcher.stats["timed_out"] += 1
            raise HTTPException(503, f"no answer within request_timeout_s={request_timeout_s:g} s (server busy); "
                                "retry later", headers={"Retry-After": "1"})  # fmt: skip
        try:
            results = job.result()
        except QueueFullError as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        return results, field

    return app



def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: create_app(**json(KDISTILL_SERVE_CONFIG))."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with kdistill.deploy.serve.run_server")
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

    limits: create_app's max_batch_texts, max_body_bytes, max_text_chars, batch_wait_ms, max_queue,
    max_queue_bytes, request_timeout_s, max_tokens, default_max_tokens.
    num_threads: compute threads per worker; by default the CPU count divided among the workers.
    """
    import uvicorn

    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be a positive integer, got {workers!r}")
    info = inspect_model_dir(model_dir)  # fail fast, before any worker starts
    unknown = set(limits) - set(LIMITS)
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
        uvicorn.run("kdistill.deploy.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level)
