"""The model behind the OpenAI-compatible API (kdistill.deploy.openai_api): `LMWorker`, a causal-LM dir's model and
tokenizer and the one thread that generates with them, a request as the `Job` it runs, and each choice as it grows
(`_Choice`): its text cut at the first stop string, and the part of it that can be streamed, held back while it
could still be the start of a stop string or half a UTF-8 character.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from kdistill.data.chat import ChatExample, encode_chat
from kdistill.deploy.openai_schema import APIError
from kdistill.errors import UserError
from kdistill.generation import Continuation, pick_tokens
from kdistill.models import ModelDirInfo, load_dir_model, load_dir_tokenizer
from kdistill.task import get_task
from kdistill.tokenalign import token_bytes, tokenizer_scheme


def is_causal_lm(info: ModelDirInfo) -> bool:
    """Whether the dir holds a causal LM (its task loads one): served with the OpenAI-compatible API, not /predict."""
    return get_task(info.task).auto_model is AutoModelForCausalLM


@dataclass
class Job:
    """One request, checked and ready for the worker thread."""

    prompts: list
    """Completion prompts (each a string, or a list of token ids used as given) or one chat's messages (a list of
    {"role", "content"})."""
    chat: bool
    n: int
    max_tokens: int | None
    """None: the server's default, within what the context leaves."""
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    top_k: int | None
    """Log-probabilities of the chosen tokens and of the top_k most likely; None: none."""
    echo: bool
    stream: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set when the client hung up or the request timed out: the worker stops at its next token."""


Entry = tuple[int, float | None, list[tuple[int, float]] | None]
"""A token's log-probabilities: (its id, its log-prob, [(id, log-prob)] of the top k); None where there is none
(a prompt's first token)."""


def _settled(text: str) -> str:
    # a token that ends inside a UTF-8 character decodes to U+FFFD until the next token completes it
    return text.rstrip("\ufffd")


def _held(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may be the start of a stop string (so not sent yet)."""
    for k in range(max((len(s) for s in stops), default=1) - 1, 0, -1):
        if any(text.endswith(s[:k]) for s in stops if len(s) > k):
            return k
    return 0


class _Choice:
    """One continuation as it grows: its tokens, its text (cut at a stop string), where each token's text starts,
    and how much of it was streamed. `prefix`: the echoed prompt and its entries, before the generated text."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], prefix: str = "",
                 prefix_entries: list[tuple[Entry, int]] | None = None):
        self._decode = decode
        self._stops = stops
        self.prefix = prefix
        self.prefix_entries = prefix_entries or []
        self.ids: list[int] = []
        """The generated tokens that are text (an end of turn or EOS is not)."""
        self.entries: list[Entry] = []
        self.starts: list[int] = []
        """Where each token's text starts in `text` (non-decreasing)."""
        self.generated = 0
        """Tokens generated, the end-of-turn token included (usage)."""
        self.text = ""
        self.cut: int | None = None
        """Where a stop string began; tokens from there on are not returned."""
        self.finish_reason: str | None = None
        self._sent_text = -1  # -1: not even the prefix
        self._sent_tokens = 0

    def add(self, token: int, entry: Entry, *, ends_turn: bool, budget: int) -> None:
        self.generated += 1
        if ends_turn:
            self.finish_reason = "stop"
            return
        self.starts.append(len(_settled(self.text)))
        self.ids.append(token)
        self.entries.append(entry)
        self.text = self._decode(self.ids)
        hits = [i for s in self._stops if (i := self.text.find(s)) >= 0]
        if hits:
            self.cut = min(hits)
            self.text, self.finish_reason = self.text[: self.cut], "stop"
        elif self.generated >= budget:
            self.finish_reason = "length"

    def _kept(self, end: int) -> int:
        """How many tokens have text starting before `end`."""
        return bisect.bisect_left(self.starts, end)

    def result(self) -> tuple[str, list[tuple[Entry, int]]]:
        """The choice's text and its tokens' (entry, offset in that text)."""
        n = len(self.ids) if self.cut is None else self._kept(self.cut)
        shift = len(self.prefix)
        return self.prefix + self.text, self.prefix_entries + [(e, shift + s) for e, s in
                                                               zip(self.entries[:n], self.starts[:n])]

    def pending(self) -> tuple[str, list[tuple[Entry, int]]]:
        """What can be streamed now and was not yet: the text known not to be (the start of) a stop string nor half a
        character, and the tokens whose text starts in it; everything that is kept, once the choice is finished."""
        if self.finish_reason is not None:
            end = len(self.text)
            n = len(self.ids) if self.cut is None else self._kept(self.cut)
        else:
            settled = _settled(self.text)
            end = len(settled) - _held(settled, self._stops)
            n = self._kept(end)
        shift = len(self.prefix)
        text = self.prefix if self._sent_text < 0 else ""
        entries = self.prefix_entries if self._sent_text < 0 else []
        start = max(self._sent_text, 0)
        if end > start:
            text += self.text[start:end]
        entries = entries + [(e, shift + s) for e, s in zip(self.entries[self._sent_tokens: n],
                                                            self.starts[self._sent_tokens: n])]
        self._sent_text, self._sent_tokens = max(end, start), max(n, self._sent_tokens)
        return text, entries


@dataclass
class Answer:
    choices: list[_Choice]
    prompt_tokens: int

    @property
    def usage(self) -> dict:
        completion = sum(c.generated for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


STARTED = "started"
"""The first event of a streamed job: its prompts passed every check and generation begins."""


class LMWorker:
    """A causal-LM dir's model and tokenizer, and the one thread that runs them: requests queue for it.

    `run(job, emit)` is called in that thread: it encodes the job's prompts (a 400 for a prompt the model cannot
    take), generates, and returns an Answer; with `emit`, it also sends STARTED and then each choice's new text as
    (index, text, entries, finish_reason).
    """

    def __init__(self, info: ModelDirInfo, *, max_queue: int, max_tokens: int, default_max_tokens: int,
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.info = info
        self.model = load_dir_model(info.path, info.task)
        self.tokenizer = load_dir_tokenizer(info.path)
        self.name = info.meta.get("name") or info.path.resolve().name
        self.created = int(time.time())
        self.context = self._context_length()
        self.max_queue = max_queue
        self.max_tokens = max_tokens
        self.default_max_tokens = default_max_tokens
        rows = self.model.get_input_embeddings().num_embeddings
        self.vocab_size = rows
        """Token ids the model reads: a prompt of token ids holds ids in [0, vocab_size)."""
        if len(self.tokenizer) > rows:
            raise UserError(f"{info.path}: the tokenizer has {len(self.tokenizer)} tokens but the model only {rows} "
                            "embeddings; save the model after resize_token_embeddings(len(tokenizer))")
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.stop_ids = eos
        """Where a completion ends: the model's EOS ids."""
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.chat_stop_ids = eos | ({self._end_of_turn()} if self.chat else set())
        """Where a chat answer ends: also the template's end of an assistant turn (e.g. <|im_end|>)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._scheme = tokenizer_scheme(backend) if backend is not None else "plain"
        self._added = set(self.tokenizer.added_tokens_decoder)
        self._bytes: dict[int, bytes] = {}
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rejected_queue_full": 0,
                      "timed_out": 0, "dropped_disconnected": 0}
        self.held = 0
        self.executor: ThreadPoolExecutor | None = None

    def _context_length(self) -> int:
        """The most tokens the model reads at once: its position embeddings, else kdistill.json's max_length, else
        the tokenizer's model_max_length."""
        for value in (getattr(self.model.config, "max_position_embeddings", None), self.info.meta.get("max_length"),
                      getattr(self.tokenizer, "model_max_length", None)):
            if isinstance(value, int) and not isinstance(value, bool) and 1 < value < 10**9:
                return value
        raise UserError(f"{self.info.path}: cannot tell the model's context length (no max_position_embeddings in "
                        "config.json, no max_length in kdistill.json); set one of them")

    def _end_of_turn(self) -> int:
        # what an encoded response ends with: the template's end of turn (encode_chat), e.g. <|im_end|>
        probe = ChatExample(({"role": "user", "content": "hi"},), "ok", {}, f"{self.info.path}: chat template")
        return encode_chat(self.tokenizer, probe, max_prompt_tokens=64, max_response_tokens=64).response_ids[-1]

    @property
    def metadata(self) -> dict[str, Any]:
        archs = self.info.config.get("architectures") or []
        return {"model": self.name, "model_type": self.info.config.get("model_type"),
                "architecture": archs[0] if archs else None, "task": self.info.task, "backend": "torch",
                "context_length": self.context, "chat_template": self.chat,
                "num_parameters": sum(p.numel() for p in self.model.parameters())}

    async def start(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdistill-generate")

    async def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def hold(self) -> Callable[[], None]:
        """Take a place in the queue (503 when max_queue requests are held); returns the function that frees it
        (once, however often it is called)."""
        if self.held >= self.max_queue:
            self.stats["rejected_queue_full"] += 1
            raise APIError(503, f"server busy: the request queue is full ({self.held} requests, "
                           f"max_queue={self.max_queue}); retry later", headers={"Retry-After": "1"})
        self.held += 1
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed, self.held = True, self.held - 1

        return free

    # ------------------------------------------------------------------------------- in the worker thread

    def token_bytes(self, token: int) -> bytes:
        """The bytes of text a token id stands for (exact for byte-level and SentencePiece vocabularies, whose
        tokens may hold half a character); a special token's own string."""
        if token not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if piece is None:  # an embedding row past the vocabulary
                data = b""
            elif token in self._added:
                data = piece.encode("utf-8")
            else:
                data = token_bytes(piece, self._scheme)
            self._bytes[token] = data if data is not None else self.tokenizer.decode([token]).encode("utf-8")
        return self._bytes[token]

    def token_text(self, token: int) -> str:
        """A token as OpenAI shows it: its text, or "bytes:\\xe2\\x80" when it holds part of a character."""
        data = self.token_bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode(self, job: Job, prompt) -> list[int]:
        if isinstance(prompt, list) and not job.chat:  # token ids (checked by the route): read as they are
            return list(prompt)
        if not job.chat:
            # verbose=False: a prompt over the context gets the 400 below, not also the tokenizer's log warning
            ids = self.tokenizer(prompt, split_special_tokens=True, verbose=False)["input_ids"]
            if not ids:
                raise APIError(400, "prompt: empty (no tokens); give some text", param="prompt")
            return ids
        example = ChatExample(tuple(prompt), None, {}, "messages")
        try:
            return encode_chat(self.tokenizer, example, max_prompt_tokens=self.context + 1,
                               max_response_tokens=1).prompt_ids
        except UserError as e:  # the template refuses the conversation (e.g. roles must alternate)
            raise APIError(400, str(e), param="messages") from None

    def _budget(self, job: Job, n_prompt: int) -> int:
        """Tokens the job may generate after a prompt of `n_prompt` tokens; 400 when the context has no room."""
        room = self.context - n_prompt
        param = "messages" if job.chat else "prompt"
        if job.max_tokens is None:
            if room < 1:
                raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context is {self.context} tokens "
                               "and leaves no room for a completion: shorten the prompt", param=param,
                               code="context_length_exceeded")
            return min(self.default_max_tokens, room)
        if job.max_tokens > room:
            raise APIError(400, f"the prompt has {n_prompt} tokens and max_tokens asks for {job.max_tokens} more: "
                           f"{n_prompt + job.max_tokens} tokens is over this model's context of {self.context} "
                           "tokens; shorten the prompt or lower max_tokens", param=param,
                           code="context_length_exceeded")
        return job.max_tokens

    def run(self, job: Job, emit: Callable[[Any], None] | None) -> Answer | None:
        if job.cancel.is_set():  # timed out or its client hung up while it was queued: not computed
            return None
        prompts = [self._encode(job, p) for p in job.prompts]
        budgets = [self._budget(job, len(ids)) for ids in prompts]
        if emit is not None:
            emit(STARTED)
        generator = torch.Generator().manual_seed(job.seed % 2**64 if job.seed is not None
                                                  else int(torch.randint(0, 2**62, (1,))))
        choices: list[_Choice] = []
        for p, (prompt, ids, budget) in enumerate(zip(job.prompts, prompts, budgets)):
            choices += self._continue(job, p, prompt, ids, budget, generator, emit)
            if job.cancel.is_set():
                return None
        answer = Answer(choices, sum(len(ids) for ids in prompts))
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += answer.prompt_tokens
        self.stats["completion_tokens"] += answer.usage["completion_tokens"]
        return answer

    def _top(self, logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        return [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]

    def _echo(self, job: Job, prompt: str | list[int], ids: list[int], c: Continuation | None) -> tuple[str, list]:
        """The echoed prompt's text (a prompt of token ids decoded as generated tokens are) and, with logprobs, its
        tokens' entries (the first has no log-prob)."""
        if not isinstance(prompt, str):
            prompt = self._decode(ids)
        if job.top_k is None:
            return prompt, []
        chosen = c.prompt_logprobs.gather(1, torch.tensor(ids[1:], dtype=torch.long)[:, None])[:, 0].tolist()
        tops = self._top(c.prompt_logprobs, job.top_k)
        entries = [(ids[0], None, None)] + [(t, lp, top) for t, lp, top in zip(ids[1:], chosen, tops)]
        starts = [len(_settled(self._decode(ids[:i]))) for i in range(len(ids))]
        return prompt, list(zip(entries, starts))

    def _continue(self, job: Job, p: int, prompt, ids: list[int], budget: int, generator: torch.Generator,
                  emit) -> list[_Choice]:
        """Prompt p's n choices, one token at a time; each new piece of text is emitted as it settles."""
        prompt_logprobs = job.echo and job.top_k is not None
        c = Continuation(self.model, ids, rows=job.n, prompt_logprobs=prompt_logprobs) \
            if budget or prompt_logprobs else None
        prefix, prefix_entries = self._echo(job, prompt, ids, c) if job.echo else ("", [])
        choices = [_Choice(self._decode, job.stops, prefix, prefix_entries) for _ in range(job.n)]
        stop_ids = self.chat_stop_ids if job.chat else self.stop_ids

        def send(r: int, choice: _Choice) -> None:
            text, entries = choice.pending()
            if emit is not None and (text or entries or choice.finish_reason):
                emit((p * job.n + r, text, entries, choice.finish_reason))

        if budget == 0:  # echo alone: the prompt scored, nothing generated
            for r, choice in enumerate(choices):
                choice.finish_reason = "length"
                send(r, choice)
            return choices
        for _ in range(budget):
            if job.cancel.is_set():
                return choices
            tokens = pick_tokens(c.logprobs, temperature=job.temperature, top_p=job.top_p, generator=generator)
            chosen = c.logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            tops = self._top(c.logprobs, job.top_k) if job.top_k is not None else [None] * job.n
            for r, choice in enumerate(choices):
                if choice.finish_reason is None:
                    token = int(tokens[r])
                    choice.add(token, (token, chosen[r], tops[r]), ends_turn=token in stop_ids, budget=budget)
                    send(r, choice)
            if all(choice.finish_reason for choice in choices):
                break
            c.append(tokens)
        return choices
