"""HTTP server for a classification model dir: FastAPI app with dynamic micro-batching, launched by uvicorn.

Endpoints
    GET  /health     {"status": "ok"}                         (never needs the API key: for load balancers)
    GET  /metadata   model name, labels, backend, max_length, num_parameters, limits, batching counters
    POST /predict    {"text": "one text"}         -> {"prediction": {"label", "label_name", "probabilities"}}
                     {"texts": ["a", "b", ...]}   -> {"predictions": [{...}, {...}, ...]}  (same order)

    GET  /docs, /redoc, /openapi.json                          (need the API key when one is set)

Exactly one of "text" (a string) and "texts" (a non-empty list of strings) is accepted; {"text": [...]} is a
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
from starlette.requests import ClientDisconnect

from kdistill.deploy.predict import Backend, EmbeddingPredictor, load_predictor
from kdistill.errors import UserError, encode_utf8
from kdistill.models import inspect_model_dir

logger = logging.getLogger(__name__)

CONFIG_ENV = "KDISTILL_SERVE_CONFIG"
API_KEY_HEADER = "X-API-Key"
LIMITS = ("max_batch_texts", "max_body_bytes", "max_text_chars", "batch_wait_ms", "max_queue", "max_queue_bytes",
          "request_timeout_s")  # fmt: skip
DRAIN_LIMIT_BYTES = 64 * 2**20
"""An oversized body is read and dropped up to this many bytes before the 413 goes out: a client that sends the
whole body before reading the answer (Python's urllib, requests) sees a broken pipe, not the 413, when the
connection closes under it. A larger body is not worth the bandwidth: its connection is just closed."""
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client hung up first"; nobody reads it, the log does


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
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> FastAPI:
    """A FastAPI app serving `model_dir` (loaded now, so a bad dir fails before any port is opened).

    max_queue, max_queue_bytes: most requests, and most UTF-8 bytes of their texts, held at once (queued or being
    computed); past either, 503. request_timeout_s: a request not answered within this many seconds (queue wait
    included) gets 503 and is dropped.

    Why one long function: FastAPI's routes are closures over this app's predictor, batcher and limits; they read
    best beside the state they share, in the order a request meets them.
    """
    for name, value in [("max_batch_texts", max_batch_texts), ("max_body_bytes", max_body_bytes),
                        ("max_text_chars", max_text_chars), ("max_queue", max_queue),
                        ("max_queue_bytes", max_queue_bytes)]:  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if max_queue_bytes < max_body_bytes:  # a body's texts never take more bytes than the body
        raise UserError(f"max_queue_bytes ({max_queue_bytes}) must be >= max_body_bytes ({max_body_bytes}), "
                         "or a request that passes the body limit could never be queued")  # fmt: skip
    if batch_wait_ms < 0:
        raise UserError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
    if not request_timeout_s > 0:
        raise UserError(f"request_timeout_s must be > 0, got {request_timeout_s!r}")
    predictor = load_predictor(model_dir, backend=backend, num_threads=num_threads)
    truncation_log = _TruncationLog(predictor.max_length)
    batcher = MicroBatcher(
        lambda texts: truncation_log.record(*predictor.predict_counted(texts, batch_size=max_batch_texts)),
        max_batch_texts=max_batch_texts,
        batch_wait_ms=batch_wait_ms,
        max_queue=max_queue,
        max_queue_bytes=max_queue_bytes,
    )
    limits = {
        "max_batch_texts": max_batch_texts,
        "max_body_bytes": max_body_bytes,
        "max_text_chars": max_text_chars,
        "batch_wait_ms": batch_wait_ms,
        "max_queue": max_queue,
        "max_queue_bytes": max_queue_bytes,
        "request_timeout_s": request_timeout_s,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    # FastAPI's own docs routes cannot take a dependency; the ones below are the same pages behind require_key
    app = FastAPI(title="kdistill", summary="Text classification with a distilled model", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)  # fmt: skip
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
        return {
            **predictor.metadata,
            "limits": limits,
            "batching": dict(batcher.stats),
            "truncated_texts": truncation_log.count,
            "pid": os.getpid(),
        }

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
        body = await _read_body(request, max_body_bytes)
        _check_content_type(request.headers.get("content-type"))
        if not body.strip():
            raise HTTPException(400, "malformed JSON: the request body is empty")
        payload = _parse_json(body)
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
        gone = asyncio.ensure_future(_client_gone(request))
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


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 when the declared or received size passes `limit` bytes.

    An oversized body is drained (read and dropped, up to DRAIN_LIMIT_BYTES past the limit) before the 413, unless
    the client asked "Expect: 100-continue" and so has not sent it yet.
    """
    declared = request.headers.get("content-length")
    size = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "invalid Content-Length header") from None
    too_big = (f"request body is {size} bytes (at most {limit})" if size is not None
               else f"request body is over {limit} bytes")  # fmt: skip
    if size is not None and size > limit and (
        size > limit + DRAIN_LIMIT_BYTES or request.headers.get("expect", "").lower() == "100-continue"
    ):
        raise HTTPException(413, too_big)
    chunks, received = [], 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received <= limit:
                chunks.append(chunk)
            elif received > limit + DRAIN_LIMIT_BYTES:
                break
    except ClientDisconnect:
        raise HTTPException(CLIENT_CLOSED_REQUEST, "client disconnected while sending the body") from None
    if received > limit or (size is not None and size > limit):
        raise HTTPException(413, too_big)
    return b"".join(chunks)


def _check_content_type(value: str | None) -> None:
    """415 unless the request says its body is JSON in UTF-8: `application/json`, with no charset or utf-8."""
    media, *params = (value or "").split(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                    if k.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() != "application/json" or charset != "utf-8":
        got = repr(value) if value is not None else "none"
        raise HTTPException(415, f"unsupported Content-Type {got}; send the body as application/json "
                            "(charset utf-8, or none)")


UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
"""Byte order marks of UTF-16 (LE, BE) and UTF-32 (LE starts with UTF-16 LE's; BE): a body that starts with one
is not UTF-8. (json.loads on bytes would guess such encodings; an API that says UTF-8 does not.)"""


class _DuplicateKey(Exception):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads keeps the last of two equal keys; which text was meant is the client's call, not ours
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _parse_json(body: bytes) -> Any:
    """The JSON value of a request body that must be UTF-8 (a leading UTF-8 BOM is ignored, as RFC 8259 allows);
    400 with one line for another encoding, invalid bytes, malformed JSON or a key given twice in one object."""
    if body.startswith(UTF16_32_BOMS) or b"\x00" in body:  # (JSON text never holds a raw NUL; UTF-16/32 ASCII does)
        raise HTTPException(400, "malformed JSON: the body is not UTF-8 (it looks like UTF-16 or UTF-32); "
                            "send JSON encoded as UTF-8")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + len(body) - len(e.object)  # e.object lacks the BOM the decoder dropped
        raise HTTPException(400, f"malformed JSON: the body is not UTF-8 (invalid byte at {at}); "
                            "send JSON encoded as UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_object)
    except _DuplicateKey as e:  # (repr: a key may hold a line break or an unpaired surrogate)
        raise HTTPException(400, f"malformed JSON: key {e.args[0]!r} appears twice in one object; "
                            "give each key once") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise HTTPException(400, f"malformed JSON: {e}") from None


async def _client_gone(request: Request) -> None:
    """Returns once the client has hung up. Called after the body was read, so the next ASGI message is the
    disconnect (servers send it when the connection drops, or after the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    max_queue_bytes, request_timeout_s.
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
