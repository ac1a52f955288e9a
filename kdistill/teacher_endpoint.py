"""A teacher behind an OpenAI-compatible endpoint (teacher.endpoint): vLLM, SGLang, llama.cpp's server, `kdistill
serve`, a hosted API. It answers each prompt over HTTP, and its answers are stored as they arrive
(kdistill.cache.responses.text_responses), so a pass that was killed or stopped asks only for what is missing.

One request per prompt: POST {url}/chat/completions with {model, messages, max_tokens, temperature}; the server
renders the messages with its own chat template, and choices[0].message.content is the response. `concurrency`
workers each keep one request in flight; `requests_per_minute` spaces the starts of requests (retries included).

Failures: a timeout, a lost connection, a 408, 409, 429 or 5xx, or an answer that cannot be read (not JSON, no
choices) is retried after `backoff_s` · 2^k (up to BACKOFF_CAP_S, with jitter), or after the server's Retry-After
when it sends one; a request still failing after `max_retries` retries stops the pass with a UserError (exit 2)
naming the URL, the status and what the server said. An error a retry cannot mend (401, 403, 404, another 4xx,
a Retry-After over MAX_RETRY_AFTER_S, an answer without the assistant's text) stops it at once. Every answer that
arrived before is stored.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from kdistill.cache.label_scores import endpoint_scores_key, label_scores_root
from kdistill.cache.keys import key_digest
from kdistill.cache.responses import FLUSH_SECONDS, RowStore, text_responses, text_responses_key
from kdistill.config import EndpointConfig
from kdistill.errors import UserError

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 60.0
"""The longest wait between two tries that kdistill chooses itself."""
MAX_RETRY_AFTER_S = 300.0
"""The longest Retry-After honoured; a server asking for more (a spent daily quota) stops the pass."""
RETRIED = frozenset({408, 409, 429})
"""Statuses below 500 that a retry can mend: a timeout, a conflict, too many requests. Every 5xx is retried too."""
SAID_CHARS = 300
"""What the server said, cut to this many characters in an error line."""


@dataclass(frozen=True)
class Reply:
    text: str
    """choices[0].message.content."""
    tokens: int | None
    """usage.completion_tokens, where the server counts them."""


class Failure(Exception):
    """A try that failed in a way a retry may mend: `problem` says how, `wait` is the server's Retry-After."""

    def __init__(self, problem: str, wait: float | None = None):
        super().__init__(problem)
        self.problem = problem
        self.wait = wait


def said(response: httpx.Response) -> str:
    """What a server said in an error answer, on one line: OpenAI's error.message, FastAPI's detail, or the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = response.text
    if isinstance(body, dict):
        error = body.get("error")
        message = (error.get("message") if isinstance(error, dict) else error) or body.get("detail") \
            or body.get("message") or message
    message = " ".join(str(message).split()) or response.reason_phrase or "(no body)"
    return message if len(message) <= SAID_CHARS else message[:SAID_CHARS] + "…"


def retry_after(response: httpx.Response) -> float | None:
    """The wait a Retry-After header asks for, in seconds (a number, or an HTTP date), else None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def api_key(cfg: EndpointConfig, where: str = "teacher.endpoint") -> str | None:
    """The key in the environment variable `where`.api_key_env names (None when it names none); a UserError naming
    the variable when it is not set."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise UserError(f"{where}.api_key_env: the environment variable {cfg.api_key_env} is not set; "
                        f"export {cfg.api_key_env}=<your key> before the run (the key stays out of the recipe)")
    return key


class EndpointTeacher:
    """The client of one endpoint (`where`: its recipe key, for messages): `ask` sends many request bodies to one
    route, within the endpoint's limits, and reads each 200 answer with a function of the caller's."""

    def __init__(self, cfg: EndpointConfig, *, route: str = "/chat/completions", where: str = "teacher.endpoint"):
        self.cfg = cfg
        self.where = where
        self.route = f"{cfg.url}{route}"
        key = api_key(cfg, where)
        self.headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        self.requests = 0
        """HTTP requests sent, retries included."""
        self.retries = 0
        self._next_start = 0.0
        self._jitter = random.Random()  # its own: drawing from the global generator would shift seeded code's draws

    def ask(self, bodies: dict[int, dict], *, read: Callable[[int, dict], object],
            on_reply: Callable[[int, object], None], flush: Callable[[], None]) -> None:
        """POST each body (row -> JSON body), `concurrency` at a time, rows in order; `read(row, answer)` turns a 200's
        JSON object (its `choices` a non-empty list) into the row's value, or raises Failure (retried) or UserError;
        `on_reply(row, value)` as each arrives, `flush()` every FLUSH_SECONDS and at the end. A request that fails
        for good raises UserError once the others stopped."""
        work = self._ask_all(bodies, read, on_reply, flush)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(work)
        with ThreadPoolExecutor(1) as pool:  # called inside a running event loop (a notebook): a thread of its own
            return pool.submit(asyncio.run, work).result()

    async def _ask_all(self, bodies, read, on_reply, flush) -> None:
        todo = iter(bodies.items())  # shared by the workers: each row is taken once, in order

        async def worker(http: httpx.AsyncClient) -> None:
            for row, body in todo:
                on_reply(row, await self._ask(http, body, lambda answer, row=row: read(row, answer)))

        async def flusher() -> None:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                flush()

        # each worker holds one request at a time; the pool allows as many connections
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(headers=self.headers, timeout=self.cfg.timeout_s, limits=limits) as http:
            workers = [asyncio.create_task(worker(http)) for _ in range(min(self.cfg.concurrency, len(bodies)))]
            ticking = asyncio.create_task(flusher())
            try:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in (*workers, ticking):
                    task.cancel()
                await asyncio.gather(*workers, ticking, return_exceptions=True)
                flush()
            for task in done:
                task.result()  # the first failure, if one

    async def _start_slot(self) -> None:
        """Wait until requests_per_minute allows the next request to start."""
        if self.cfg.requests_per_minute is None:
            return
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + 60.0 / self.cfg.requests_per_minute
        await asyncio.sleep(start - now)

    async def _ask(self, http: httpx.AsyncClient, body: dict, read: Callable[[dict], object]):
        retries = 0
        while True:
            await self._start_slot()
            self.requests += 1
            try:
                return await self._try(http, body, read)
            except Failure as failure:
                if retries == self.cfg.max_retries:
                    raise UserError(f"{self.where}: POST {self.route} failed {retries + 1} time(s), the last: "
                                    f"{failure.problem} ({self.where}.max_retries: {self.cfg.max_retries})") \
                        from None
                wait = failure.wait
                if wait is not None and wait > MAX_RETRY_AFTER_S:
                    raise UserError(f"{self.where}: POST {self.route}: {failure.problem}, and the server asks to "
                                    f"retry after {wait:.0f} s (over {MAX_RETRY_AFTER_S:.0f} s: a spent quota?); run "
                                    "again later: the answers so far are stored") from None
                if wait is None:
                    wait = min(BACKOFF_CAP_S, self.cfg.backoff_s * 2**retries) * self._jitter.uniform(0.5, 1.0)
                retries += 1
                self.retries += 1
                log.info("%s: %s; retry %d of %d in %.1f s", self.where, failure.problem, retries,
                         self.cfg.max_retries, wait)
                await asyncio.sleep(wait)

    async def _try(self, http: httpx.AsyncClient, body: dict, read: Callable[[dict], object]):
        """One request: its value, a Failure a retry may mend, or a UserError it cannot."""
        try:
            # the client's timeout bounds each read; this bounds the whole answer
            response = await asyncio.wait_for(http.post(self.route, json=body), self.cfg.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise Failure(f"no answer within {self.where}.timeout_s={self.cfg.timeout_s:g} s") from None
        except httpx.TransportError as e:
            raise Failure(f"{type(e).__name__}: {' '.join(str(e).split()) or 'the connection failed'}") from None
        status = response.status_code
        if status in RETRIED or status >= 500:
            raise Failure(f"{status} {said(response)}", retry_after(response))
        if status != 200:
            raise UserError(f"{self.where}: POST {self.route} answered {status}: {said(response)}"
                            f"{self._hint(status)}")
        try:
            answer = response.json()
        except ValueError:
            raise Failure(f"200 with a body that is not JSON: {said(response)}") from None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise Failure(f"200 without choices: {said(response)}")
        return read(answer)

    def _hint(self, status: int) -> str:
        """What to check after an error a retry cannot mend."""
        if status in (401, 403):
            return (f"; check the key in ${self.cfg.api_key_env} ({self.where}.api_key_env)" if self.cfg.api_key_env
                    else f"; the server wants a key: name its environment variable in {self.where}.api_key_env")
        if status == 404:
            return (f"; the server needs POST {self.route.removeprefix(self.cfg.url)} under {self.where}.url and to "
                    f"serve the model {self.cfg.model!r} ({self.where}.model)")
        return ""


def chat_reply(route: str, cfg: EndpointConfig) -> Callable[[dict], Reply]:
    """Reads a /chat/completions answer: choices[0].message.content and usage.completion_tokens."""
    def read(row: int, answer: dict) -> Reply:
        message = answer["choices"][0].get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise UserError(f"teacher.endpoint: POST {route} answers without the assistant's text "
                            f"(choices[0].message.content: {json.dumps(text)}); the teacher's responses are read "
                            f"there: serve {cfg.model} as a chat model that answers in text")
        usage = answer.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return Reply(text, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None)
    return read


def endpoint_responses(cfg: EndpointConfig, conversations: Sequence[Sequence[dict]], *, max_tokens: int,
                       what: str, root: str | Path | None = None) -> tuple[list[str], list[int | None], dict]:
    """The endpoint's response to every conversation (text, in order) and its completion tokens (None where the
    server does not count them), read from the store where it holds them and asked for (and stored as they arrive)
    where it does not. `what`: the prompts, for the log. Returns (texts, tokens, info): the store's path, how many
    prompts were answered now ("calls") and read from the store ("reused"), the HTTP requests and retries, the
    time."""
    key = text_responses_key(url=cfg.url, model=cfg.model, conversations=conversations, max_tokens=max_tokens,
                             temperature=cfg.temperature)
    store = text_responses(key, root)
    todo = {i: list(conversations[i]) for i in store.missing()}
    teacher = EndpointTeacher(cfg)
    started = time.perf_counter()
    if todo:
        log.info("teacher.endpoint %s (%s): %d %s to ask, %d read from the store", cfg.url, cfg.model, len(todo), what,
                 store.reused)
        # a hosted teacher may take hours: a bar where there is a terminal
        with tqdm(total=len(todo), desc=f"teacher.endpoint {what}", leave=False, disable=None) as bar:
            def on_reply(row: int, reply: Reply) -> None:
                store.record(row, reply.text, reply.tokens)
                bar.update()

            bodies = {row: {"model": cfg.model, "messages": messages, "max_tokens": max_tokens,
                            "temperature": cfg.temperature} for row, messages in todo.items()}
            teacher.ask(bodies, read=chat_reply(teacher.route, cfg), on_reply=on_reply, flush=store.flush)
    seconds = time.perf_counter() - started
    texts, tokens = store.finish()
    info = {"path": str(store.path), "endpoint": cfg.url, "model": cfg.model, "prompts": len(conversations),
            "calls": len(todo), "reused": store.reused, "requests": teacher.requests, "retries": teacher.retries,
            "generate_seconds": seconds, "key": key}
    log.info("teacher.endpoint %s: %d %s, %s", cfg.url, len(conversations), what,
             "all read from the store" if not todo else f"{len(todo)} answered now in {seconds:.0f} s "
             f"({teacher.requests} requests, {teacher.retries} retries)")
    return texts, tokens, info


def answer_scores(route: str, where: str, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]):
    """Reads a /completions answer to prompt `row` followed by each answer (echo, logprobs): each answer's
    log-probability, the sum of its tokens' log-probs, which sit right after the prompt's tokens."""
    def read(row: int, answer: dict) -> list[float]:
        prompt_tokens = len(prompts[row])
        # in prompt order: choice i answers prompt i (a choice without an integer index counts as the first)
        choices = sorted(answer["choices"], key=lambda c: c["index"] if isinstance(c.get("index"), int) else 0)
        if len(choices) != len(answers):
            raise Failure(f"200 with {len(choices)} choices for {len(answers)} prompts")
        scores = []
        for choice, ids in zip(choices, answers):
            logprobs = choice.get("logprobs")
            values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
            part = values[prompt_tokens: prompt_tokens + len(ids)] if isinstance(values, list) else []
            if len(part) != len(ids) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in part):
                raise UserError(f"{where}: POST {route} gives no log-probabilities of the prompt's tokens "
                                f"(choices[].logprobs.token_logprobs with echo and logprobs); the label scores are "
                                "read there: use a server that returns them for token-id prompts (kdistill serve, "
                                "vLLM, llama.cpp's server)")
            scores.append(float(sum(part)))
        return scores
    return read


def endpoint_label_scores(cfg: EndpointConfig, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                          *, where: str = "teacher.llm.endpoint", root: str | Path | None = None
                          ) -> tuple[torch.Tensor, dict]:
    """cache/label_scores.llm_label_scores for an LLM behind an endpoint: (N, C) log P(answer c | prompt n), asked
    for where the store does not hold them and stored as they arrive. One request per prompt: POST {url}/completions
    with the token ids of the prompt followed by each answer (the prompt rendered here, by the LLM's own tokenizer:
    the server reads exactly those ids), `echo`, `logprobs: 1`, `max_tokens: 1`, `temperature: 0`; an answer's
    score is the sum of its tokens' echoed log-probs. Each row stores its share of the pass's wall time (the time
    since the previous answer arrived, so that the shares add up to the pass under any concurrency)."""
    key = endpoint_scores_key(cfg.url, cfg.model, prompts, answers)
    store = RowStore(key, Path(root or label_scores_root()) / f"scores-{key_digest(key)}",
                     {"scores": pa.list_(pa.float32()), "wall_s": pa.float64()})
    todo = store.missing()
    client = EndpointTeacher(cfg, route="/completions", where=where)
    started = time.perf_counter()
    if todo:
        log.info("%s %s (%s): %d texts to score, %d read from the store", where, cfg.url, cfg.model, len(todo),
                 store.reused)
        last = [started]
        with tqdm(total=len(todo), desc=f"{where} label scores", leave=False, disable=None) as bar:
            def on_reply(row: int, scores: list[float]) -> None:
                now = time.perf_counter()
                store.record(row, scores, now - last[0])
                last[0] = now
                bar.update()

            bodies = {i: {"model": cfg.model, "prompt": [list(prompts[i]) + list(a) for a in answers],
                          "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0} for i in todo}
            client.ask(bodies, read=answer_scores(client.route, where, prompts, answers), on_reply=on_reply,
                       flush=store.flush)
    seconds = time.perf_counter() - started
    scores, wall = store.finish()
    n = max(len(prompts), 1)
    info = {"path": str(store.path), "endpoint": cfg.url, "model": cfg.model, "texts": len(prompts),
            "calls": len(todo), "reused": store.reused, "requests": client.requests, "retries": client.retries,
            "forwards_per_text": len(answers), "cpu_s_per_1000_texts": None,
            "wall_s_per_1000_texts": 1000 * sum(wall) / n, "seconds": seconds}
    log.info("%s %s: %d texts, %s", where, cfg.url, len(prompts), "all read from the store" if not todo else
             f"{len(todo)} scored now in {seconds:.0f} s ({client.requests} requests, {client.retries} retries)")
    return torch.tensor(scores, dtype=torch.float32).reshape(len(prompts), len(answers)), info
