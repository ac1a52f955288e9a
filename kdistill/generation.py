"""Batched generation of responses to many prompts: what a teacher writes once for the training prompts and what
every model answers to the test prompts.

Prompts are token id lists (a chat template already applied). They are sorted by length and cut into batches (less
padding), left-padded (a decoder continues from its last real token), and generated with the model's KV cache
(transformers' `generate`), greedy or sampled; each response ends at the first of `stop_ids` (kept, so the
caller knows it ended) or at `max_new_tokens`. The responses come back in the prompts' order.

`Continuation` and `pick_tokens` go one token at a time instead, for one prompt (a server's request): the caller sees
each step's log-probabilities, picks the token, and may stop on anything (a stop string) or send it on (streaming).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Generated:
    """Responses to prompts, in the prompts' order, and what making them cost."""

    responses: list[list[int]]
    """Each prompt's new tokens, up to and including the first stop id (when one came)."""
    seconds: float
    new_tokens: int
    """Tokens generated, the stop ids included, padding after a finished row not."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def cut_at_stop(tokens: Sequence[int], stop_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first of `stop_ids` (all of them when none comes)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in stop_ids:
            break
    return out


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, pad_id: int, stop_ids: set[int], max_new_tokens: int,
             batch_size: int = 16, sample: bool = False, temperature: float = 1.0, seed: int = 0,
             progress: str | None = None, on_batch: Callable[[list[int], list[list[int]]], None] | None = None
             ) -> Generated:
    """Every prompt's response from `model` (see the module doc). `on_batch(indices, responses)` is called after
    each batch (e.g. to store them as they come); `progress`: a progress bar's label (None: no bar)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses: list[list[int] | None] = [None] * len(prompts)
    generator = torch.Generator().manual_seed(seed)
    new_tokens = 0
    started = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=progress, leave=False, disable=progress is None or None)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[r, width - len(prompts[i]):] = 1
            if sample:  # one seeded draw per batch, so a batch's samples repeat under the same seed
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=sample,
                                 temperature=temperature if sample else None, top_k=0 if sample else None,
                                 top_p=1.0 if sample else None, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=sorted(stop_ids) or None)
            batch = [cut_at_stop(row[width:].tolist(), stop_ids) for row in out.cpu()]
            for i, response in zip(rows, batch):
                responses[i] = response
                new_tokens += len(response)
            if on_batch is not None:
                on_batch(rows, batch)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return Generated([r or [] for r in responses], time.perf_counter() - started, new_tokens)


# ------------------------------------------------------------------------------------------ one token at a time
# A server answers one prompt at a time and needs what `generate` hides: each step's distribution (log-probs), the
# chance to stop on text (a stop string), and each token as it comes (streaming).


class Continuation:
    """`rows` continuations of one prompt, one token at a time over the model's KV cache. Every row starts from the
    same prompt, so no row is padded.

        c = Continuation(model, prompt_ids, rows=2)
        while ...:
            tokens = pick_tokens(c.logprobs, temperature=0.0)   # (rows,)
            c.append(tokens)
    """

    @torch.no_grad()
    def __init__(self, model, prompt: Sequence[int], *, rows: int = 1, prompt_logprobs: bool = False):
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        self.model = model  # in eval mode, as a loaded model dir is
        accepts = inspect.signature(model.forward).parameters
        # transformers 5 renames forward's `past_key_values` to `cache`; the supported range has both spellings
        self._cache_arg = "cache" if "cache" in accepts else "past_key_values"
        # the last position's logits only, unless the prompt's are asked for: (rows, L, V) floats can be gigabytes
        keep = {} if prompt_logprobs or "logits_to_keep" not in accepts else {"logits_to_keep": 1}
        device = next(model.parameters()).device
        ids = torch.tensor([list(prompt)] * rows, dtype=torch.long, device=device)
        out = model(input_ids=ids, use_cache=True, **keep)
        logits = out.logits.float()
        self.prompt_logprobs = torch.log_softmax(logits[0, :-1], -1).cpu() if prompt_logprobs else None
        """(L - 1, V): row i is the distribution the model gave token i + 1 of the prompt; None unless asked."""
        self.logprobs = torch.log_softmax(logits[:, -1], -1).cpu()
        """(rows, V): each row's distribution over its next token (the model's own, before any temperature)."""
        self._cache = out[self._cache_arg] if self._cache_arg in out else out.past_key_values

    @torch.no_grad()
    def append(self, tokens: torch.Tensor) -> None:
        """Feed each row its next token (rows,); `logprobs` becomes the distribution after it."""
        device = next(self.model.parameters()).device
        out = self.model(input_ids=tokens.to(device)[:, None], use_cache=True, **{self._cache_arg: self._cache})
        self.logprobs = torch.log_softmax(out.logits[:, -1].float(), -1).cpu()
        self._cache = out[self._cache_arg] if self._cache_arg in out else out.past_key_values


def pick_tokens(logprobs: torch.Tensor, *, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row's next token from its log-probs (rows, V): the most likely at temperature 0 (greedy, as
    `generate`), else a draw from softmax(logprobs / temperature) cut to the smallest set of tokens whose
    probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return logprobs.argmax(-1)
    # the most likely token at 0 before dividing, in float64 (where 1e-300 is not 0): a tiny temperature then gives
    # it all the mass, never 0 / 0
    logprobs = logprobs.double()
    probs = torch.softmax((logprobs - logprobs.max(-1, keepdim=True).values) / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= top_p] = 0.0  # the top token always stays (nothing ranks above it)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
