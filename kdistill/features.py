"""Capture what distillation losses need from any Hugging Face model, without naming its attributes in the losses.

`capture(model, inputs)` runs one forward pass and returns a `Features`:

- `logits`: the model's logits (None for a bare base model without a head);
- `hidden_states`: from `output_hidden_states=True`: the embeddings output first, then one entry per layer, each
  (B, L, D) (for decoder-only families the last entry is what the model returns, usually after its final norm);
- `attentions`: from `output_attentions=True`: one (B, H, L, L) map per layer, rows summing to 1 over the keys. Only the
  eager attention path materialises these maps (SDPA / flash return none), so `capture(..., attentions=True)` first
  calls `ensure_eager_attention(model)`, which switches the model to eager (logging one line) or raises;
- `qkv`: per layer, `{"query", "key", "value"}` each (B, L, D_proj): the outputs of the attention's Q/K/V projection
  modules, captured with forward hooks (MiniLM-style losses need them; no HF flag returns them). The projections are
  found by module-name suffix over known families (`QKV_PATTERNS`); GPT-2's fused `c_attn` output is split in three.
  For grouped-query attention (k/v narrower than q) the tensors are returned as the projections emit them;
- `attention_mask`: the mask the forward used (or None), so that losses can ignore padding.
- `pooled`: with `capture(..., pooling=Pooling(...))`, the last hidden state pooled into one vector per text (B, D), as
  a sentence-transformers model's Pooling [+ Normalize] modules do (task embedding; `pool`).

Nothing here detaches or disables gradients: wrap the call in `torch.no_grad()` for a frozen teacher, leave it
as is for a student that learns from these tensors.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Per family: name suffixes (dotted components) of the query, key and value projections, or of one fused projection
# whose output is [q | k | v] along the last dimension. Matching is on whole components, so "attention.self.query"
# does not match a cross-attention's "crossattention.self.query".
QKV_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("BERT / RoBERTa / ELECTRA", ("attention.self.query", "attention.self.key", "attention.self.value")),
    ("MPNet", ("attn.q", "attn.k", "attn.v")),
    ("DistilBERT", ("attention.q_lin", "attention.k_lin", "attention.v_lin")),
    ("Llama / Qwen / Mistral / SmolLM", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("GPT-2 (fused c_attn)", ("attn.c_attn",)),
)
_QKV_NAMES = ("query", "key", "value")


@dataclass
class Features:
    """What one forward pass exposes to distillation losses. Shapes: B batch, L tokens, D width, H heads."""

    logits: Tensor | None
    """(B, C) for classifiers, (B, L, V) for language models; None for a bare base model."""
    hidden_states: tuple[Tensor, ...] = ()
    """Embeddings output first, then each layer: num_layers + 1 tensors of (B, L, D); empty if not requested."""
    attentions: tuple[Tensor, ...] = ()
    """One (B, H, L, L) attention map per layer (softmax over the last axis); empty if not requested."""
    qkv: list[dict[str, Tensor]] = field(default_factory=list)
    """Per layer {"query", "key", "value"}: each projection's output (B, L, D_proj); empty if not requested."""
    attention_mask: Tensor | None = None
    """(B, L), 1 = real token, as given to the forward; None when the inputs carried none."""
    pooled: Tensor | None = None
    """(B, D) sentence embeddings (task: embedding): the last hidden state pooled by a `Pooling`; None otherwise."""

    def float(self) -> Features:
        """The same features in float32. A forward under bf16/fp16 autocast returns them in low precision; the
        losses compare them with the student's, which accelerate returns in float32 (in bf16, log-softmax alone is
        off enough to make a KL divergence negative)."""
        return Features(
            logits=self.logits.float() if self.logits is not None else None,
            hidden_states=tuple(h.float() for h in self.hidden_states),
            attentions=tuple(a.float() for a in self.attentions),
            qkv=[{k: v.float() for k, v in layer.items()} for layer in self.qkv],
            attention_mask=self.attention_mask,
            pooled=self.pooled.float() if self.pooled is not None else None,
        )


def ensure_eager_attention(model: nn.Module) -> bool:
    """Switch `model` to the eager attention implementation, the only one that returns attention maps.

    Returns True when it switched (and logs one line saying so), False when the model already ran eager.
    Raises RuntimeError when the model cannot be switched (its attention does not go through the HF attention
    interface); load it with `attn_implementation="eager"` instead.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager"):
        # None: no attention-implementation notion at all (old-style model) -> it computes maps itself.
        return False
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter("eager")
    if getattr(config, "_attn_implementation", None) != "eager":
        raise RuntimeError(
            f"{type(model).__name__} runs attention with {current!r}, which returns no attention maps, and it could "
            'not be switched to "eager"; load it with attn_implementation="eager" to capture attentions'
        )
    log.info("%s: switched attention from %r to 'eager' to return attention maps", type(model).__name__, current)
    return True


def find_qkv_modules(model: nn.Module) -> list[dict[str, nn.Module]]:
    """The attention Q/K/V projection modules of `model`, one dict per layer in order.

    Each dict is {"query": m, "key": m, "value": m}, or {"fused": m} for GPT-2's `c_attn`. The first family in
    `QKV_PATTERNS` that matches any module wins. Raises ValueError naming the model class when none matches.
    """
    names = [(name, module) for name, module in model.named_modules() if name]
    for _family, suffixes in QKV_PATTERNS:
        keys = ("fused",) if len(suffixes) == 1 else _QKV_NAMES
        layers: dict[str, dict[str, nn.Module]] = {}  # insertion order = module order = layer order
        for name, module in names:
            parts = name.split(".")
            for key, suffix in zip(keys, suffixes):
                want = suffix.split(".")
                if parts[-len(want) :] == want:
                    layer_key = ".".join(parts[: -len(want)])  # e.g. "bert.encoder.layer.3"
                    layers.setdefault(layer_key, {})[key] = module
        if layers:
            incomplete = [k for k, d in layers.items() if set(d) != set(keys)]
            if incomplete:
                raise ValueError(
                    f"{type(model).__name__}: found only part of the Q/K/V projections under {incomplete[0]!r}"
                )
            # named_modules() walks a ModuleList in index order, so insertion order is layer order.
            return list(layers.values())
    known = "; ".join(f"{fam}: {', '.join(sfx)}" for fam, sfx in QKV_PATTERNS)
    raise ValueError(
        f"{type(model).__name__}: no attention Q/K/V projection modules found "
        f"(looked for module names ending in {known})"
    )


@contextmanager
def qkv_hooks(model: nn.Module) -> Iterator[list[dict[str, Tensor]]]:
    """Within the block, each forward of `model` fills the yielded list with one {"query","key","value"} per layer.

    The hooks are removed on exit, also when the forward raised. The list is cleared at the start of each forward
    of the first layer, so a second forward in the same block replaces the first one's tensors.
    """
    layers = find_qkv_modules(model)
    captured: list[dict[str, Tensor]] = [{} for _ in layers]
    handles = []

    def hook_for(i: int, key: str):
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                output = output[0]
            if key == "fused":
                q, k, v = output.chunk(3, dim=-1)
                captured[i].update(query=q, key=k, value=v)
            else:
                captured[i][key] = output

        return hook

    try:
        for i, modules in enumerate(layers):
            for key, module in modules.items():
                handles.append(module.register_forward_hook(hook_for(i, key)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def keeps_logits(model: nn.Module) -> bool:
    """Whether `model`'s forward can compute its logits at chosen positions only (transformers' `logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def capture(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    hidden_states: bool = True,
    attentions: bool = False,
    qkv: bool = False,
    pooling: Pooling | None = None,
) -> Features:
    """Run `model(**inputs)` once and return the logits plus the requested internals (see the module docstring).

    attentions=True switches the model to eager attention first (`ensure_eager_attention`; logged, permanent for
    this model object). Gradients flow as in a plain forward; the caller decides on `torch.no_grad()`.
    pooling: also pool the last hidden state into `Features.pooled` (a sentence encoder's embedding).
    """
    kwargs = dict(inputs)
    kwargs["output_hidden_states"] = hidden_states
    if attentions:
        ensure_eager_attention(model)
        kwargs["output_attentions"] = True
    if qkv:
        with qkv_hooks(model) as captured:
            out = model(**kwargs)
        qkv_list = [dict(layer) for layer in captured]
    else:
        out = model(**kwargs)
        qkv_list = []
    attn = tuple(getattr(out, "attentions", None) or ())
    if attentions and not attn:
        raise RuntimeError(f"{type(model).__name__} returned no attention maps although output_attentions=True")
    return Features(
        logits=getattr(out, "logits", None),
        hidden_states=tuple(getattr(out, "hidden_states", None) or ()) if hidden_states else (),
        attentions=attn,
        qkv=qkv_list,
        attention_mask=inputs.get("attention_mask"),
        pooled=None if pooling is None else pooling(_last_hidden(out), inputs.get("attention_mask")),
    )


# --------------------------------------------------------------------------------- sentence-embedding pooling

POOLING_MODES = ("mean", "cls", "max")


@dataclass(frozen=True)
class Pooling:
    """How a sentence encoder turns its last hidden state (B, L, D) into one vector per text (B, D), as a
    sentence-transformers model's Pooling (and Normalize) modules do: mean over the real tokens, the first
    token ([CLS]) or the max over the real tokens; then L2-normalised when `normalize`."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self):
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r}: use one of {', '.join(POOLING_MODES)}")

    def __call__(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        return pool(hidden, attention_mask, self.mode, normalize=self.normalize)


def pool(hidden: Tensor, attention_mask: Tensor | None, mode: str = "mean", *, normalize: bool = False) -> Tensor:
    """(B, L, D) token states -> (B, D): mean over real tokens (attention_mask 1), position 0, or max over real
    tokens; L2-normalised when `normalize`. No mask: every position counts."""
    if attention_mask is None:
        attention_mask = hidden.new_ones(hidden.shape[:2])
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    if mode == "mean":
        out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    else:
        raise ValueError(f"pooling mode {mode!r}: use one of {', '.join(POOLING_MODES)}")
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _last_hidden(out) -> Tensor:
    last = getattr(out, "last_hidden_state", None)
    if last is None and getattr(out, "hidden_states", None):
        last = out.hidden_states[-1]
    if last is None:
        raise RuntimeError("pooling needs the model's last hidden state: give a base encoder (AutoModel), or "
                           "capture with hidden_states=True")
    return last
