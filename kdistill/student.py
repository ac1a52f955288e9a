"""Build a smaller student of the teacher's own class, initialised from the teacher's weights.

Two independent reductions, applied together by `build_student`:

Depth (any family whose layers sit in one `nn.ModuleList`: BERT, RoBERTa, ELECTRA, MPNet, DistilBERT, GPT-2,
Llama / Qwen / Mistral / SmolLM, ...). The student config is the teacher's with fewer layers
(`config.num_hidden_layers`, which HF aliases to `n_layer` / `n_layers`; a per-layer `layer_types` list is subset
too), and the state dict is copied with the chosen layers renumbered 0..n-1. Everything outside the layer list
(embeddings, pooler, classifier / LM head, final norm) is copied as is. `select_layers` picks the layers:
  - "uniform": spread evenly over the teacher *including its first and last layer*, layer_i = round(i·(T−1)/(n−1))
    (6 → 2 gives [0, 5]; 12 → 6 gives [0, 2, 4, 7, 9, 11]). The first layer keeps the embedding-facing features,
    the last the features the teacher's head was trained on; DistilBERT (every other layer) and TinyBERT (every
    k-th, ending on the top layer) are the two precedents this sits between. One layer alone → the last one.
  - "first" / "last": the bottom / top n layers.
  - "importance": the n blocks with the highest Block Influence on a calibration batch (ShortGPT, Men et al. 2024,
    "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"): BI_i = 1 − mean over real
    tokens of cos(h_i, h_i+1), the hidden states entering and leaving block i. A block whose output points where its
    input did adds little to the residual stream; ShortGPT removes the lowest-BI blocks first.

Width of BERT-family encoders (model_type bert, roberta, xlm-roberta, camembert — the same module layout). In the
spirit of Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"),
importance is measured from *activations* on a small calibration batch of real inputs, not from weights:
  - attention head:  mean over real tokens of ‖context_h‖₂, the head's attention output before the O projection;
  - FFN neuron:      mean over real tokens of |act(x·W_in)_j|, after the intermediate activation;
  - hidden channel:  mean over real tokens of |LayerNorm(x)_c|, summed over every LayerNorm in the student's
                     residual stream (the embeddings' and both of each kept layer's);
heads and neurons are ranked per layer, hidden channels once for the whole model (the residual stream must use
the same channels everywhere). The top-k are kept in their original order and every matrix is sliced
consistently: embeddings, Q/K/V rows, O columns, FFN in/out, LayerNorms, pooler, classifier / MLM head.
Without calibration inputs the ranking falls back to weight magnitudes (logged): ‖W_V,h‖·‖W_O,h‖ per head,
‖W_in,j‖·‖W_out,j‖ per neuron, Σ|γ| of the LayerNorm gains per channel.

The head dimension stays the teacher's: a head is kept or dropped as a whole, so each kept head computes exactly
what it computed in the teacher (same Q·K scale 1/√d_h, same relative-position tables) rather than a narrower,
re-scaled approximation; Minitron likewise prunes heads, not head_dim. BERT derives head_dim as
hidden_size / num_attention_heads, so for these models hidden_size and num_attention_heads move together:
give one and the other follows (hidden = heads · d_h); give both and they must agree.

Width of decoders with grouped-query attention (Llama, Mistral, Qwen2, Qwen3, Gemma 3) follows the same recipe in
`kdistill.decoder_width`: whole KV groups, MLP neurons and hidden channels ranked on the calibration batch, with
`num_key_value_heads` as a fourth width. Width reduction of GPT-2 and other families raises NotImplementedError
naming the family (depth selection works for them).

`init` names, as in recipes (`student.init`):
  - "teacher-layers": copy the chosen layers (and, if a width is reduced, the pruned slice of them);
  - "pruned": the same copy, but a width reduction is required — the name says what happened to the weights;
  - "random": the student's config, freshly initialised from `seed` — the control that shows what the teacher's
    weights are worth.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from kdistill.decoder_width import (
    DECODER_WIDTH_TYPES,
    check_decoder_layout,
    decoder_head_dim,
    is_width_prunable_decoder,
    plan_decoder_width,
    resolve_decoder_width,
    slice_decoder_state,
)
from kdistill.models import seeded

log = logging.getLogger(__name__)

INIT_CHOICES = ("teacher-layers", "pruned", "random")
LAYER_MAPS = ("uniform", "first", "last", "importance")
WIDTH_PRUNABLE_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
"""model_type values whose modules follow BERT's layout, the families width reduction supports."""
LAYER_LIST_SUFFIXES = ("encoder.layer", "transformer.layer", "layers", "h", "layer", "blocks")


# ---------------------------------------------------------------------------------------------------- depth


def select_layers(
    teacher_layers: int, num_layers: int, layer_map: str = "uniform", scores: Sequence[float] | None = None
) -> list[int]:
    """Indices (sorted, unique) of the `num_layers` teacher layers to keep, out of `teacher_layers`.

    "uniform": evenly spread including the first and last layer (a single layer → the last); "first" / "last":
    the bottom / top `num_layers`; "importance": the `num_layers` highest of `scores` (one Block Influence per
    teacher layer, `block_influence`). Raises ValueError naming a bad num_layers, layer_map or scores.
    """
    if layer_map not in LAYER_MAPS:
        raise ValueError(f"layer_map={layer_map!r} is not one of {', '.join(LAYER_MAPS)}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= teacher_layers:
        raise ValueError(
            f"num_layers={num_layers!r} must be an integer from 1 to the teacher's {teacher_layers} layers"
        )
    n, t = num_layers, teacher_layers
    if layer_map == "importance":
        if scores is None or len(scores) != t:
            got = "none" if scores is None else len(scores)
            raise ValueError(f"layer_map='importance' needs one Block Influence score per teacher layer ({t}), "
                             f"got {got}")
        return most_influential(scores, n)
    if layer_map == "first":
        return list(range(n))
    if layer_map == "last":
        return list(range(t - n, t))
    if n == 1:
        return [t - 1]
    # round(i * (t-1) / (n-1)) with halves rounded up, in integers; steps are >= 1 so the result is unique.
    return [(2 * i * (t - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def most_influential(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k blocks with the highest Block Influence, in ascending (layer) order; a tie keeps the lower
    layer, so equal scores give the same choice on every machine."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    return sorted(ranked[:k])


def block_influence(model: PreTrainedModel, calibration_inputs: Mapping[str, Tensor]) -> list[float]:
    """ShortGPT's Block Influence of each transformer block of `model`, in layer order (see the module docstring).

    BI_i = 1 − (1/N) Σ_t cos(h_i[t], h_i+1[t]),  t over the N real tokens of the batch (pooled, not per sequence)
    h_i: (B, L, D) the hidden state entering block i, h_i+1 the one leaving it. Each score lies in [0, 2].
    calibration_inputs: a batch as for the forward (input_ids (B, L), attention_mask (B, L) with 1 = real token;
    labels and non-tensors are ignored). Decoders (GPT-2, Llama, Qwen2, ...) and encoders (BERT, ...) alike.
    """
    _, blocks = find_layer_list(model)
    inputs, mask = _calibration_inputs(model, calibration_inputs)
    last = []
    # hidden_states[-1] is not what the last block returned in decoders: GPT-2, Llama, Qwen2 ... store it after the
    # final norm (ln_f / norm), so cos(h, norm(h)) would score the norm's rescaling, not the block. The block's own
    # output is read with a hook instead (for BERT-like encoders the two agree).
    handle = blocks[-1].register_forward_hook(
        lambda _m, _a, output: last.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        # the base model: the LM head's (B, L, vocab) logits would cost more memory than every hidden state together
        states = _eval_forward(model.base_model, inputs, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    if states is None or len(states) != len(blocks) + 1:
        raise NotImplementedError(
            f"{type(model).__name__}: output_hidden_states gave {0 if states is None else len(states)} hidden "
            f"states, not embeddings + {len(blocks)} blocks; cannot measure Block Influence"
        )
    states = [*states[: len(blocks)], last[0]]
    return [
        1.0 - _masked_mean(F.cosine_similarity(h_in.float(), h_out.float(), dim=-1), mask).item()
        for h_in, h_out in zip(states[:-1], states[1:])
    ]


def check_layers(layers: Sequence[int], teacher_layers: int) -> list[int]:
    """Validate an explicit list of teacher layer indices: non-empty, integers, in range, unique, ascending."""
    layers = list(layers)
    if not layers:
        raise ValueError("layers=[] is empty: name at least one teacher layer to copy")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layers: {i!r} is not an integer layer index")
        if not 0 <= i < teacher_layers:
            raise ValueError(
                f"layers: index {i} is out of range for a teacher with {teacher_layers} layers "
                f"(0..{teacher_layers - 1})"
            )
    seen = set()
    for i in layers:
        if i in seen:
            raise ValueError(f"layers: index {i} appears more than once in {layers}")
        seen.add(i)
    if layers != sorted(layers):
        raise ValueError(f"layers={layers} must be in ascending order (layers keep their teacher order)")
    return layers


def num_layers_of(config) -> int:
    """The number of transformer layers a config declares (num_hidden_layers, aliased to n_layer / n_layers)."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise NotImplementedError(f"{type(config).__name__} declares no num_hidden_layers; cannot select layers")
    return n


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and module of `model`'s list of transformer layers (e.g. "bert.encoder.layer", "model.layers",
    "transformer.h", "distilbert.transformer.layer"): the ModuleList as long as config.num_hidden_layers."""
    n = num_layers_of(model.config)
    found = [(name, m) for name, m in model.named_modules() if name and isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) > 1:
        found = [
            (name, m) for name, m in found if any(name == s or name.endswith("." + s) for s in LAYER_LIST_SUFFIXES)
        ]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} candidate ({', '.join(name for name, _ in found)})"
        raise NotImplementedError(
            f"{type(model).__name__}: found {what} list of {n} transformer layers; depth selection needs exactly one"
        )
    return found[0]


def _renumber_layers(state: dict[str, Tensor], prefix: str, layers: list[int]) -> dict[str, Tensor]:
    """Keep the keys of the chosen layers under `prefix` (e.g. "bert.encoder.layer."), renumbered 0..n-1."""
    new_index = {old: new for new, old in enumerate(layers)}
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in new_index:
                out[f"{prefix}{new_index[int(index)]}.{rest}"] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------- width


@dataclass
class WidthPlan:
    """Which teacher units a width-reduced student keeps; every index tensor is sorted ascending."""

    hidden: Tensor
    """(D_s,) kept hidden / embedding channels, shared by the whole residual stream."""
    heads: list[Tensor]
    """Per kept layer, (H_s,) kept attention heads."""
    neurons: list[Tensor]
    """Per kept layer, (I_s,) kept FFN neurons."""
    head_dim: int
    source: str
    """"activations" (calibration batch) or "weights" (magnitude fallback)."""

    def head_rows(self, i: int) -> Tensor:
        """Row indices of the Q/K/V projections (columns of O) that the kept heads of layer i occupy."""
        offsets = torch.arange(self.head_dim)
        return (self.heads[i][:, None] * self.head_dim + offsets[None, :]).reshape(-1)


def _check_bert_layout(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in WIDTH_PRUNABLE_TYPES:
        raise NotImplementedError(
            f"width reduction (hidden_size / num_attention_heads / intermediate_size) supports BERT-family encoders "
            f"({', '.join(WIDTH_PRUNABLE_TYPES)}) and decoders ({', '.join(DECODER_WIDTH_TYPES)}), not "
            f"{model_type!r} ({type(model).__name__}); reduce depth only (num_layers / layers) for this family"
        )
    _, layer_list = find_layer_list(model)
    layer = layer_list[0]
    for path in ("attention.self.query", "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                 "output.dense", "output.LayerNorm"):
        if _get(layer, path) is None:
            raise NotImplementedError(
                f"{type(model).__name__}: layer has no {path!r}; not the BERT layout width reduction expects"
            )


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real tokens of x (B, L, ...) → (...), mask (B, L) with 1 = real token."""
    m = mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.dim() - 2)))
    return (x * m).sum((0, 1)) / m.sum().clamp_min(1)


def _calibration_inputs(
    model: nn.Module, calibration_inputs: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """The tensors of a calibration batch that the forward takes, on the model's device, and the (B, L) mask of its
    real tokens (all ones without an attention_mask)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in calibration_inputs.items() if k != "labels" and isinstance(v, Tensor)}
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(inputs["input_ids"].shape[:2], device=device)
    return inputs, mask


def _eval_forward(model: nn.Module, inputs: Mapping[str, Tensor], **kwargs):
    """One forward without gradients in eval mode (no dropout), the model's mode restored afterwards."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(**inputs, **kwargs)
    finally:
        model.train(was_training)


def importance_scores(
    teacher: PreTrainedModel, layers: Sequence[int], calibration_inputs: Mapping[str, Tensor] | None = None
) -> dict:
    """Importance of each hidden channel, and per layer in `layers` of each head and FFN neuron (BERT layout).

    Returns {"hidden": (D,), "heads": [(H,) per layer], "neurons": [(I,) per layer], "source": str}; see the module
    docstring for the formulas. With calibration_inputs (a batch of real inputs, as for the forward) the scores are
    activation-based; without, they fall back to weight magnitudes.
    """
    _check_bert_layout(teacher)
    _, layer_list = find_layer_list(teacher)
    config = teacher.config
    n_heads = config.num_attention_heads
    head_dim = config.hidden_size // n_heads
    embeddings_ln = teacher.base_model.embeddings.LayerNorm
    chosen = [layer_list[i] for i in layers]
    norms = [embeddings_ln]
    for layer in chosen:
        norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]

    if calibration_inputs is None:
        log.info(
            "width pruning: no calibration inputs, ranking heads/neurons/channels by weight magnitude "
            "instead of activations"
        )
        with torch.no_grad():
            hidden = sum(ln.weight.abs().float() for ln in norms)
            heads, neurons = [], []
            for layer in chosen:
                w_v = layer.attention.self.value.weight.float().reshape(n_heads, head_dim, -1)
                w_o = layer.attention.output.dense.weight.float().reshape(-1, n_heads, head_dim)
                heads.append(w_v.norm(dim=(1, 2)) * w_o.norm(dim=(0, 2)))
                w_in = layer.intermediate.dense.weight.float()
                w_out = layer.output.dense.weight.float()
                neurons.append(w_in.norm(dim=1) * w_out.norm(dim=0))
        return {"hidden": hidden, "heads": heads, "neurons": neurons, "source": "weights"}

    inputs, mask = _calibration_inputs(teacher, calibration_inputs)
    device = mask.device

    hidden = torch.zeros(config.hidden_size, device=device)
    heads = [torch.zeros(n_heads, device=device) for _ in chosen]
    neurons = [torch.zeros(config.intermediate_size, device=device) for _ in chosen]

    def first(output):
        return output[0] if isinstance(output, tuple) else output

    def on_norm(_m, _a, output):
        hidden.add_(_masked_mean(first(output).float().abs(), mask))

    def on_context(i):
        def hook(_m, _a, output):
            ctx = first(output).float()  # (B, L, H * d_h): the heads' outputs before the O projection
            heads[i].add_(_masked_mean(ctx.reshape(*ctx.shape[:2], n_heads, head_dim).norm(dim=-1), mask))

        return hook

    def on_ffn(i):
        def hook(_m, _a, output):
            neurons[i].add_(_masked_mean(first(output).float().abs(), mask))

        return hook

    handles = [ln.register_forward_hook(on_norm) for ln in norms]
    for i, layer in enumerate(chosen):
        handles.append(layer.attention.self.register_forward_hook(on_context(i)))
        handles.append(layer.intermediate.register_forward_hook(on_ffn(i)))  # BertIntermediate returns act(x W_in)
    try:
        _eval_forward(teacher, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {"hidden": hidden, "heads": heads, "neurons": neurons, "source": "activations"}


def _top(scores: Tensor, k: int) -> Tensor:
    return torch.topk(scores.cpu(), k).indices.sort().values


def plan_width(
    teacher: PreTrainedModel,
    layers: Sequence[int],
    *,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int,
    calibration_inputs: Mapping[str, Tensor] | None = None,
) -> WidthPlan:
    """Rank the teacher's units (`importance_scores`) and keep the top ones for the requested widths."""
    scores = importance_scores(teacher, layers, calibration_inputs)
    return WidthPlan(
        hidden=_top(scores["hidden"], hidden_size),
        heads=[_top(s, num_attention_heads) for s in scores["heads"]],
        neurons=[_top(s, intermediate_size) for s in scores["neurons"]],
        head_dim=teacher.config.hidden_size // teacher.config.num_attention_heads,
        source=scores["source"],
    )


# Which index set each dimension of a BERT layer's parameters is sliced by: "qkv" = rows of the kept heads,
# "ffn" = kept neurons, "hidden" = kept channels. Parameters not listed must keep their shape.
_BERT_LAYER_DIMS = {
    **{f"attention.self.{p}.weight": ("qkv", "hidden") for p in ("query", "key", "value")},
    **{f"attention.self.{p}.bias": ("qkv",) for p in ("query", "key", "value")},
    "attention.output.dense.weight": ("hidden", "qkv"),
    "attention.output.dense.bias": ("hidden",),
    "attention.output.LayerNorm.weight": ("hidden",),
    "attention.output.LayerNorm.bias": ("hidden",),
    "intermediate.dense.weight": ("ffn", "hidden"),
    "intermediate.dense.bias": ("ffn",),
    "output.dense.weight": ("hidden", "ffn"),
    "output.dense.bias": ("hidden",),
    "output.LayerNorm.weight": ("hidden",),
    "output.LayerNorm.bias": ("hidden",),
}


def _slice_state(
    state: dict[str, Tensor], target: dict[str, Tensor], prefix: str, plan: WidthPlan, teacher_hidden: int
) -> dict[str, Tensor]:
    """Slice a (depth-renumbered) teacher state dict down to the student's shapes (`target`) following `plan`.

    Inside the layers the dimension roles come from _BERT_LAYER_DIMS. Outside them (embeddings, pooler, heads) the
    only width that changes is the hidden size, so any dimension whose size differs from the student's is a hidden
    dimension: slicing by shape there cannot confuse, say, num_labels with hidden_size when they happen to be equal.
    """
    out = {}
    for key, value in state.items():
        want = target[key].shape if key in target else value.shape
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            roles = _BERT_LAYER_DIMS.get(rest)
            if roles is not None:
                sets = {"hidden": plan.hidden, "qkv": plan.head_rows(int(index)), "ffn": plan.neurons[int(index)]}
                for dim, role in enumerate(roles):
                    value = value.index_select(dim, sets[role].to(value.device))
        else:
            for dim, (have, need) in enumerate(zip(value.shape, want)):
                if have != need:
                    if have != teacher_hidden or need != len(plan.hidden):
                        raise NotImplementedError(
                            f"width pruning: don't know how to slice {key} {tuple(value.shape)} → {tuple(want)}"
                        )
                    value = value.index_select(dim, plan.hidden.to(value.device))
        if value.shape != want:
            raise NotImplementedError(
                f"width pruning: {key} has shape {tuple(value.shape)}, the student expects {tuple(want)}"
            )
        out[key] = value
    return out


def resolve_width(config, hidden_size, num_attention_heads, intermediate_size) -> tuple[int, int, int]:
    """Target (hidden, heads, ffn), each ≤ the teacher's; hidden and heads tied by the teacher's head_dim."""
    t_hidden, t_heads = config.hidden_size, config.num_attention_heads
    t_ffn = getattr(config, "intermediate_size", None)
    head_dim = t_hidden // t_heads
    requested = (
        ("hidden_size", hidden_size, t_hidden),
        ("num_attention_heads", num_attention_heads, t_heads),
        ("intermediate_size", intermediate_size, t_ffn),
    )
    for name, value, limit in requested:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
        if limit is not None and value > limit:
            raise ValueError(f"{name}={value} is larger than the teacher's {limit}; a student can only be narrower")
    if hidden_size is not None and hidden_size % head_dim:
        raise ValueError(
            f"hidden_size={hidden_size} is not a multiple of the teacher's head size {head_dim} (head_dim is kept, "
            f"hidden_size = num_attention_heads × {head_dim}); try {max(head_dim, hidden_size // head_dim * head_dim)}"
        )
    if hidden_size is not None and num_attention_heads is not None and hidden_size != num_attention_heads * head_dim:
        raise ValueError(
            f"hidden_size={hidden_size} with num_attention_heads={num_attention_heads} changes the head size "
            f"({hidden_size}/{num_attention_heads}); the teacher's {head_dim} is kept, so give "
            f"hidden_size={num_attention_heads * head_dim} or only one of the two"
        )
    if num_attention_heads is not None:
        heads = num_attention_heads
    else:
        heads = hidden_size // head_dim if hidden_size is not None else t_heads
    hidden = heads * head_dim
    ffn = intermediate_size if intermediate_size is not None else t_ffn
    return hidden, heads, ffn


def resolve_widths(
    config,
    *,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
) -> dict[str, int]:
    """The student's width fields (config attribute → value, each ≤ the teacher's), {} when none is requested.

    BERT-family configs go through `resolve_width` (hidden and heads tied by head_dim); the decoders of
    `kdistill.decoder_width` through `resolve_decoder_width` (whole KV groups, hidden free of the head count).
    ValueError whose message starts with the key at fault.
    """
    if all(w is None for w in (hidden_size, num_attention_heads, num_key_value_heads, intermediate_size)):
        return {}
    if is_width_prunable_decoder(config):
        return resolve_decoder_width(config, hidden_size, num_attention_heads, num_key_value_heads, intermediate_size)
    if num_key_value_heads is not None:
        raise ValueError(f"num_key_value_heads={num_key_value_heads} applies to decoders with grouped-query "
                         f"attention ({', '.join(DECODER_WIDTH_TYPES)}), not {getattr(config, 'model_type', None)!r}")
    hidden, heads, ffn = resolve_width(config, hidden_size, num_attention_heads, intermediate_size)
    return {"hidden_size": hidden, "num_attention_heads": heads, "intermediate_size": ffn}


# ---------------------------------------------------------------------------------------------------- build


def build_student(
    teacher: PreTrainedModel,
    *,
    num_layers: int | None = None,
    layer_map: str = "uniform",
    layers: Sequence[int] | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    init: str = "teacher-layers",
    calibration_inputs: Mapping[str, Tensor] | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A student of the teacher's class (and head, label names, tokenizer-facing config), smaller in depth and/or width.

    Depth: `layers` (explicit teacher indices) or `num_layers` chosen by `layer_map` (`select_layers`; "importance"
    scores the teacher's blocks on `calibration_inputs`, `block_influence`); neither keeps every layer. Width:
    `hidden_size` / `num_attention_heads` / `intermediate_size` below the teacher's prune (BERT family, and the GQA
    decoders of `kdistill.decoder_width`, which also take `num_key_value_heads` and need `calibration_inputs`)
    using `calibration_inputs` (a batch dict as for the forward) to rank units. `init`:
    "teacher-layers" | "pruned" (width reduction required) | "random" (fresh init from `seed`).
    The global RNG is left untouched; the student is on the teacher's device and dtype, in the teacher's mode.
    The choice is recorded on the model as `student.kdistill_init` (see `describe_student`), with the Block
    Influence of every teacher block where "importance" chose.
    """
    if init not in INIT_CHOICES:
        raise ValueError(f"init={init!r} is not one of {', '.join(INIT_CHOICES)}")
    t_layers = num_layers_of(teacher.config)
    scores = None
    if layers is not None:
        layers = check_layers(layers, t_layers)
        if num_layers is not None and num_layers != len(layers):
            raise ValueError(
                f"num_layers={num_layers} disagrees with layers={layers} ({len(layers)} layers); give one of them"
            )
    elif num_layers is not None:
        if layer_map == "importance":
            if calibration_inputs is None:
                raise ValueError("layer_map='importance' ranks the teacher's blocks on a calibration batch; "
                                 "give calibration_inputs")
            scores = block_influence(teacher, calibration_inputs)
        layers = select_layers(t_layers, num_layers, layer_map, scores)
    else:
        layers = list(range(t_layers))

    decoder = is_width_prunable_decoder(teacher.config)
    if any(w is not None for w in (hidden_size, num_attention_heads, num_key_value_heads, intermediate_size)):
        if decoder:
            check_decoder_layout(teacher)
        else:
            _check_bert_layout(teacher)
    widths = resolve_widths(teacher.config, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                            num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size)
    narrower = any(getattr(teacher.config, key) != value for key, value in widths.items())
    if narrower and decoder and init != "random" and calibration_inputs is None:
        raise ValueError("width pruning of a decoder ranks KV groups, neurons and channels on a calibration batch; "
                         "give calibration_inputs")
    if init == "pruned" and not narrower:
        raise ValueError(
            "init='pruned' needs a width below the teacher's (hidden_size, num_attention_heads, num_key_value_heads "
            "or intermediate_size); use init='teacher-layers' to copy layers at full width"
        )

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == t_layers:
        config.layer_types = [layer_types[i] for i in layers]
    if narrower:
        for key, value in widths.items():
            setattr(config, key, value)
    if narrower and decoder:  # Llama and Qwen2 would derive head_dim from the new hidden_size / heads
        config.head_dim = decoder_head_dim(teacher.config)

    with seeded(seed):
        student = type(teacher)(config)
    reference = next(teacher.parameters())
    student.to(device=reference.device, dtype=reference.dtype)

    info = {"init": init, "teacher_layers": layers, "seed": seed}
    if scores is not None:
        info["block_influence"] = scores
    if init != "random":
        prefix = find_layer_list(teacher)[0] + "."
        state = _renumber_layers(teacher.state_dict(), prefix, layers)
        if narrower and decoder:
            plan = plan_decoder_width(teacher, layers, widths, calibration_inputs)
            state = slice_decoder_state(teacher, state, student.state_dict(), prefix, plan)
            info["ranking"] = "activations"
        elif narrower:
            plan = plan_width(teacher, layers, **widths, calibration_inputs=calibration_inputs)
            state = _slice_state(state, student.state_dict(), prefix, plan, teacher.config.hidden_size)
            info["ranking"] = plan.source
        student.load_state_dict(state, strict=True)
    student.train(teacher.training)
    student.kdistill_init = info
    width = "".join(f", {key} {value}" for key, value in widths.items()) if narrower else ""
    if init == "random":
        log.info("student: random init, %d layers%s", len(layers), width)
    else:
        log.info("student: %s from layers %s%s", init, layers, width)
    return student


# ---------------------------------------------------------------------------------------------------- reports


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _ffn_size(config) -> int | None:
    for name in ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    if getattr(config, "model_type", None) == "gpt2":  # n_inner=None means 4 × n_embd
        return 4 * config.hidden_size
    return None


def _shape(model: nn.Module) -> dict:
    config = model.config
    return {
        "layers": num_layers_of(config),
        "hidden": getattr(config, "hidden_size", None),
        "heads": getattr(config, "num_attention_heads", None),
        "ffn": _ffn_size(config),
        "params": count_parameters(model),
    }


def describe_student(teacher: nn.Module, student: nn.Module) -> dict:
    """Sizes for a report: {"teacher": {...}, "student": {...}, "param_ratio": student/teacher, "init": {...}}.

    Each side holds layers, hidden, heads, ffn (None where the config has no such notion) and params.
    """
    t, s = _shape(teacher), _shape(student)
    return {
        "teacher": t,
        "student": s,
        "param_ratio": s["params"] / t["params"],
        "init": getattr(student, "kdistill_init", None),
    }
