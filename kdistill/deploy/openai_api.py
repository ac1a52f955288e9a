"""The OpenAI-compatible API of a causal-LM model dir (task causal-lm or instruction): what `kdistill serve` answers
for a decoder, so that OpenAI clients and tools talk to a distilled student unchanged.

Routes (added to kdistill.deploy.serve's app when the served dir is a causal LM; every one needs the API key when
one is set, as X-API-Key or `Authorization: Bearer KEY`, which is what OpenAI clients send)
    GET  /v1/models                  the one served model; /v1/models/{name} that one
    POST /v1/completions             prompt (a string, token ids, or a list of either) -> text
    POST /v1/chat/completions        messages, rendered by the model's own chat template -> an assistant message

Sampling: `temperature` 0 is greedy (the same tokens as kdistill.generation.generate), above 0 a draw from the
softened distribution, cut by `top_p`; `seed` makes draws repeat. A choice ends at the model's end of turn or EOS
(finish_reason "stop"), at the first of the `stop` strings (cut from the text; "stop"), or after `max_tokens`
("length"). `n` choices per prompt. Log-probabilities are the model's own (log-softmax of its logits, before
temperature or top_p): completions' `logprobs: k` (k <= 5; the legacy format: tokens, token_logprobs, top_logprobs,
text_offset; with `echo` the prompt's tokens too, its first token without one), chat's `logprobs: true` and
`top_logprobs: k` (k <= 20; choices[].logprobs.content[]: token, logprob, bytes, top_logprobs). `stream: true`
answers Server-Sent Events, one `data: {chunk}` per piece of text, then `data: [DONE]`; text that could be the
start of a stop string, or half a UTF-8 character, is held back until it is known not to be.

Text is text: a completion prompt is tokenised as the tokenizer does (its own BOS, if it adds one), with a literal
"<|im_start|>" or "<|endoftext|>" read as characters, and a chat's special tokens come only from its template
(kdistill.data.chat.encode_chat), so a user cannot forge a turn. A completion prompt of token ids is read exactly as
given (not tokenised, no BOS added; each id within the model's vocabulary, or a 400 naming it): a client that renders
a chat template itself (kdistill's teacher.llm.endpoint scores each label's answer after a rendered prompt) needs
the server to read exactly its ids, special tokens included.

Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}: 400 a bad parameter (its name in
`param`), a prompt longer than the model's context (the limit in the message; code context_length_exceeded) or an
unsupported one (penalties, logit_bias, tools: an unknown parameter is refused, never ignored); 404 another model
name (code model_not_found) or chat for a model without a chat template; and the server's own 401, 413, 415 and
503 (queue full, or no answer within request_timeout_s: the whole answer, or a stream's first event).

Generation is CPU-bound: requests run one at a time in one worker thread (`LMWorker`), so they queue rather than
thrash; at most max_queue are held (queued or running), past that 503. A request whose client hung up or that
timed out stops at its next token; one still queued is never computed.

This module holds the routes and the answer formats (completion and chat, whole or as stream chunks); the request
bodies and error JSON are kdistill.deploy.openai_schema's, the worker thread, stop strings and what a stream may
send yet kdistill.deploy.lm_worker's, and reading a body kdistill.deploy.request_body's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdistill.deploy.lm_worker import Answer, Entry, Job, LMWorker
from kdistill.deploy.openai_schema import (APIError, ChatCompletionRequest, CompletionRequest, Sampling,
                                           error_response, openapi_body, parse_request)
from kdistill.deploy.request_body import hung_up
from kdistill.errors import UserError, encode_utf8

logger = logging.getLogger(__name__)

NO_LOGPROB = -9999.0
"""What OpenAI reports for a token the model gives no probability at all (JSON has no -inf)."""

# ---------------------------------------------------------------------------------------------- answer formats


def _logprob(value: float | None) -> float | None:
    return None if value is None else max(float(value), NO_LOGPROB)


class _CompletionFormat:
    """/v1/completions: choices[].text, legacy logprobs {tokens, token_logprobs, top_logprobs, text_offset}."""

    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, worker: LMWorker):
        self.worker = worker

    def logprobs(self, entries: list[tuple[Entry, int]]) -> dict:
        text = self.worker.token_text
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for (token, lp, top), offset in entries:
            out["tokens"].append(text(token))
            out["token_logprobs"].append(_logprob(lp))
            # as OpenAI: the k most likely, and the chosen token too (so up to k + 1)
            out["top_logprobs"].append(None if top is None else
                                       {**{text(t): _logprob(v) for t, v in top}, text(token): _logprob(lp)})
            out["text_offset"].append(offset)
        return out

    def choice(self, index: int, text: str, entries, finish_reason, job: Job) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(entries) if job.top_k is not None else None,
                "finish_reason": finish_reason}

    def opening(self, job: Job) -> list[dict]:
        return []

    chunk = choice


class _ChatFormat:
    """/v1/chat/completions: choices[].message (delta when streamed), logprobs {content: [{token, logprob, bytes,
    top_logprobs}]}."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, worker: LMWorker):
        self.worker = worker

    def _token(self, token: int, lp: float) -> dict:
        return {"token": self.worker.token_text(token), "logprob": _logprob(lp),
                "bytes": list(self.worker.token_bytes(token))}

    def logprobs(self, entries: list[tuple[Entry, int]]) -> dict:
        return {"content": [{**self._token(token, lp), "top_logprobs": [self._token(t, v) for t, v in top]}
                            for (token, lp, top), _ in entries], "refusal": None}

    def choice(self, index: int, text: str, entries, finish_reason, job: Job) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self.logprobs(entries) if job.top_k is not None else None,
                "finish_reason": finish_reason}

    def opening(self, job: Job) -> list[dict]:
        # OpenAI's first chunk of each choice names the role
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(job.prompts) * job.n)]

    def chunk(self, index: int, text: str, entries, finish_reason, job: Job) -> dict:
        return {"index": index, "delta": {"content": text} if text else {},
                "logprobs": self.logprobs(entries) if job.top_k is not None and entries else None,
                "finish_reason": finish_reason}


# ------------------------------------------------------------------------------------------------------ routes


def _check_text(text: str, where: str) -> None:
    try:
        encode_utf8(text, where)
    except UserError as e:
        raise APIError(400, str(e), param=where) from None


def _completion_prompts(prompt: str | list, vocab_size: int) -> list:
    """The request's prompts, each a string or a list of token ids; a 400 naming a string that is not UTF-8 text or
    an id outside [0, vocab_size) ("prompt[1][3]")."""
    one = isinstance(prompt, str) or isinstance(prompt[0], int)
    prompts = [prompt] if one else prompt
    for i, p in enumerate(prompts):
        where = "prompt" if one else f"prompt[{i}]"
        if isinstance(p, str):
            _check_text(p, where)
            continue
        for j, token in enumerate(p):
            if not 0 <= token < vocab_size:
                raise APIError(400, f"{where}[{j}]: token id {token} is not in this model's vocabulary (0 to "
                               f"{vocab_size - 1})", param=f"{where}[{j}]")
    return prompts


def _job(req: Sampling, worker: LMWorker, *, prompts: list, chat: bool, max_tokens: int | None,
         top_k: int | None, echo: bool, max_choices: int) -> Job:
    """The checks every request shares, beyond its body's schema; a 400 or 404 naming the parameter."""
    if req.model is not None and req.model != worker.name:
        raise APIError(404, f"model {req.model!r} not found; this server serves {worker.name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise APIError(400, f"{name}: not supported (this server samples without penalties); leave it out or "
                           "send 0", param=name)
    if req.logit_bias:
        raise APIError(400, "logit_bias: not supported; leave it out or send {}", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only with stream: true", param="stream_options")
    if max_tokens is not None and max_tokens > worker.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {worker.max_tokens}",
                       param="max_completion_tokens" if chat and req.max_tokens is None else "max_tokens")
    n = req.n or 1
    if len(prompts) * n > max_choices:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} choices; this server makes at "
                       f"most {max_choices} per request", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    for i, s in enumerate(stops):
        _check_text(s, "stop" if isinstance(req.stop, str) else f"stop[{i}]")
    return Job(prompts, chat, n, max_tokens, 1.0 if req.temperature is None else req.temperature,
               1.0 if req.top_p is None else req.top_p, req.seed, stops, top_k, echo, bool(req.stream))


def add_routes(app: FastAPI, worker: LMWorker, *, require_key: Callable, read_json: Callable[[Request], Awaitable],
               request_timeout_s: float, max_choices: int) -> None:
    """Add the /v1 routes over `worker` to `app`, and OpenAI's error JSON for every /v1 path.

    require_key: the app's API-key dependency; read_json(request): the body through the server's checks (size,
    content type, strict JSON); max_choices: most choices (prompts x n) per request.
    """
    key = [Depends(require_key)]

    async def errors(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/v1/"):
            return error_response(exc)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, errors)

    def model_card() -> dict:
        return {"id": worker.name, "object": "model", "created": worker.created, "owned_by": "kdistill"}

    @app.get("/v1/models", dependencies=key)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=key)
    async def model(name: str) -> dict:
        if name != worker.name:
            raise APIError(404, f"model {name!r} not found; this server serves {worker.name!r}", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/completions", dependencies=key, openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await read_json(request))
        prompts = _completion_prompts(req.prompt, worker.vocab_size)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: must be at least 1 (0 only with echo, to score the prompt)",
                           param="max_tokens")
        job = _job(req, worker, prompts=prompts, chat=False, max_tokens=req.max_tokens, top_k=req.logprobs,
                   echo=bool(req.echo), max_choices=max_choices)
        return await _respond(request, job, _CompletionFormat(worker), req, worker, request_timeout_s)

    @app.post("/v1/chat/completions", dependencies=key, openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await read_json(request))
        if not worker.chat:
            raise APIError(404, f"{worker.name} has no chat template, so it is not a chat model; use "
                           "POST /v1/completions", param="model", code="model_not_found")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content if isinstance(m.content, str) else "\n".join(part.text for part in m.content)
            _check_text(content, f"messages[{i}].content")
            messages.append({"role": m.role, "content": content})
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        job = _job(req, worker, prompts=[messages], chat=True, max_tokens=req.max_completion_tokens or req.max_tokens,
                   top_k=top_k, echo=False, max_choices=max_choices)
        return await _respond(request, job, _ChatFormat(worker), req, worker, request_timeout_s)

    @app.post("/predict", dependencies=key, include_in_schema=False)
    async def predict() -> None:
        raise HTTPException(404, f"{worker.name} is a causal LM: it answers POST /v1/chat/completions (or "
                            "/v1/completions), the OpenAI-compatible API, not /predict")


async def _respond(request: Request, job: Job, fmt, req: Sampling, worker: LMWorker, request_timeout_s: float
                   ) -> Response:
    """Run `job` on the worker and answer: one JSON body, or (stream) Server-Sent Events once the job's prompts
    passed their checks. The time limit covers the whole answer, or a stream's wait for its first event."""
    free = worker.hold()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    emit = (lambda event: loop.call_soon_threadsafe(events.put_nowait, event)) if job.stream else None
    ended = object()  # the last event: the job returned or raised
    computed = loop.run_in_executor(worker.executor, worker.run, job, emit)
    computed.add_done_callback(lambda _: (free(), events.put_nowait(ended)))
    first = asyncio.ensure_future(events.get()) if job.stream else computed
    gone = asyncio.ensure_future(hung_up(request))
    try:
        await asyncio.wait({first, gone}, timeout=request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not first.done():
        first.cancel()  # a job still queued is dropped; a running one stops at its next token
        job.cancel.set()
        free()
        if gone.done() and not gone.cancelled():
            worker.stats["dropped_disconnected"] += 1
            return gone.result()
        worker.stats["timed_out"] += 1
        raise APIError(503, f"no answer within request_timeout_s={request_timeout_s:g} s (server busy); retry "
                       "later", headers={"Retry-After": "1"})
    if not job.stream:
        return JSONResponse(_answer_body(fmt, job, computed.result(), worker))  # or the job's error, e.g. a 400
    if first.result() is ended:  # the job failed its checks (e.g. a prompt over the context): its 400
        raise computed.exception()
    return StreamingResponse(_stream(fmt, job, events, ended, computed, free, req, worker),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _answer_body(fmt, job: Job, answer: Answer, worker: LMWorker) -> dict:
    choices = []
    for i, c in enumerate(answer.choices):
        text, entries = c.result()
        choices.append(fmt.choice(i, text, entries, c.finish_reason, job))
    return {"id": f"{fmt.prefix}-{uuid.uuid4().hex}", "object": fmt.object, "created": int(time.time()),
            "model": worker.name, "choices": choices, "usage": answer.usage}


async def _stream(fmt, job: Job, events: asyncio.Queue, ended, computed: asyncio.Future, free, req: Sampling,
                  worker: LMWorker):
    """The job's events as Server-Sent Events: `data: {chunk}` each, `data: [DONE]` last."""
    name, created = f"{fmt.prefix}-{uuid.uuid4().hex}", int(time.time())
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": name, "object": fmt.chunk_object, "created": created, "model": worker.name,
                "choices": choices}
        if with_usage:  # as OpenAI: every chunk has the key, only the last a value
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for opening in fmt.opening(job):
            yield chunk([opening])
        while (event := await events.get()) is not ended:
            yield chunk([fmt.chunk(*event, job)])
        error = computed.exception()
        if error is not None:  # the 200 is out: the error can only be an event, as OpenAI sends one
            logger.error("generation failed mid-stream", exc_info=error)
            body = {"error": {"message": "internal server error", "type": "server_error", "param": None,
                              "code": None}}
            yield f"data: {json.dumps(body)}\n\n"
        elif with_usage:
            yield chunk([], computed.result().usage)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a client that hung up mid-stream: stop generating
        free()
