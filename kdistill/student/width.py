"""Width pruning: which heads, FFN neurons and hidden channels a narrower student keeps, and the
teacher's weights sliced to them.

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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from kdistill.decoder_width import DECODER_WIDTH_TYPES, is_width_prunable_decoder, resolve_decoder_width
from kdistill.student.calibration import calibration_batch, eval_forward, masked_mean
from kdistill.student.layers import find_layer_list

log = logging.getLogger(__name__)


WIDTH_PRUNABLE_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
"""model_type values whose modules follow BERT's layout, the families width reduction supports."""


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


def check_bert_layout(model: nn.Module) -> None:
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


def importance_scores(
    teacher: PreTrainedModel, layers: Sequence[int], calibration_inputs: Mapping[str, Tensor] | None = None
) -> dict:
    """Importance of each hidden channel, and per layer in `layers` of each head and FFN neuron (BERT layout).

    Returns {"hidden": (D,), "heads": [(H,) per layer], "neurons": [(I,) per layer], "source": str}; see the module
    docstring for the formulas. With calibration_inputs (a batch of real inputs, as for the forward) the scores are
    activation-based; without, they fall back to weight magnitudes.
    """
    check_bert_layout(teacher)
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

    inputs, mask = calibration_batch(teacher, calibration_inputs)
    device = mask.device

    hidden = torch.zeros(config.hidden_size, device=device)
    heads = [torch.zeros(n_heads, device=device) for _ in chosen]
    neurons = [torch.zeros(config.intermediate_size, device=device) for _ in chosen]

    def first(output):
        return output[0] if isinstance(output, tuple) else output

    def on_norm(_m, _a, output):
        hidden.add_(masked_mean(first(output).float().abs(), mask))

    def on_context(i):
        def hook(_m, _a, output):
            ctx = first(output).float()  # (B, L, H * d_h): the heads' outputs before the O projection
            heads[i].add_(masked_mean(ctx.reshape(*ctx.shape[:2], n_heads, head_dim).norm(dim=-1), mask))

        return hook

    def on_ffn(i):
        def hook(_m, _a, output):
            neurons[i].add_(masked_mean(first(output).float().abs(), mask))

        return hook

    handles = [ln.register_forward_hook(on_norm) for ln in norms]
    for i, layer in enumerate(chosen):
        handles.append(layer.attention.self.register_forward_hook(on_context(i)))
        handles.append(layer.intermediate.register_forward_hook(on_ffn(i)))  # BertIntermediate returns act(x W_in)
    try:
        eval_forward(teacher, inputs)
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


def slice_state(
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
