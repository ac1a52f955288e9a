"""Batched generation of responses to many prompts: what a teacher writes once for the training prompts and what
every model answers to the test prompts.

Prompts are token id lists (a chat template already applied). They are sorted by length and cut into batches (less
padding), left-padded (a decoder continues from its last real token), and generated with the model's KV cache
(transformers' `generate`), greedy or sampled; each response ends at the first of `stop_ids` (kept, so the
caller knows it ended) or at `max_new_tokens`. The responses come back in the prompts' order.
"""

from __future__ import annotations

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
