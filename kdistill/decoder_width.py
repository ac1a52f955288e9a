"""Width pruning of decoder-only causal LMs with grouped-query attention (Llama, Mistral, Qwen2, Qwen3, Gemma 3).

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation") ranks a
decoder's units by their *activations* on a small calibration batch and slices the teacher's weights down to the
top-ranked ones. Three widths, each scored as Minitron's sum over the batch's (real, not padding) tokens of:
  - KV group (a KV head and the num_attention_heads / num_key_value_heads query heads that read it):
    Σ over its query heads of ‖attn_h‖₂, the head's attention output before o_proj. Groups are kept or dropped
    whole, so the GQA ratio is the teacher's and every kept query head still reads the KV head it was trained with;
    ranked per layer.
  - MLP neuron j:  |act(x·W_gate)_j · (x·W_up)_j|, the input of down_proj; ranked per layer.
  - hidden (embedding) channel c:  |RMSNorm(x)_c|, summed over every RMSNorm of the residual stream in the kept
    layers (input_layernorm, post_attention_layernorm; Gemma 3's pre/post_feedforward_layernorm) and the final
    norm; ranked once for the whole model, since every block reads and writes the same channels.
The top-k of each are kept in their original order, and every matrix is sliced to match: embed_tokens columns, every
norm's gain, q/k/v rows of the kept heads and their input columns, o_proj's columns and output rows, gate/up rows and
columns, down_proj's columns and rows, lm_head's columns (a tied lm_head is the embedding, sliced once). q_norm /
k_norm (Qwen3, Gemma 3) act on one head's head_dim and keep their shape.

head_dim stays the teacher's (Minitron prunes heads, not head_dim), so each kept head computes what it computed in
the teacher, same rotary frequencies and Q·K scale; the student's config states head_dim explicitly, because Llama and
Qwen2 would otherwise derive it as hidden_size / num_attention_heads. hidden_size is then free of the head count.

Channel pruning is not exact even for channels that carry nothing: each RMSNorm averages x² over the D_s kept channels
instead of D. Gemma 3 also scales its embeddings by √hidden_size, so a student of width D_s would start its residual
stream √(D_s/D) smaller than the teacher relative to the blocks' writes; with untied embeddings the slice is scaled by
√(D/D_s) to undo that, with tied ones (Gemma's default) it cannot be without also scaling the logits, and is left.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

DECODER_WIDTH_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
"""model_type values of the decoders whose layers follow the Llama layout (self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, RMSNorms), the families decoder width pruning supports."""
RESIDUAL_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")
"""The RMSNorms of a layer that read or write the residual stream (the last two are Gemma 3's only)."""
_REQUIRED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def is_width_prunable_decoder(config) -> bool:
    return getattr(config, "model_type", None) in DECODER_WIDTH_TYPES


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def decoder_head_dim(config) -> int:
    """The teacher's per-head size: config.head_dim where the architecture declares it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_decoder_layout(model: PreTrainedModel) -> None:
    """NotImplementedError naming what is missing unless `model` has the layout this module slices."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DECODER_WIDTH_TYPES:
        raise NotImplementedError(
            f"decoder width pruning supports {', '.join(DECODER_WIDTH_TYPES)}, not {model_type!r} "
            f"({type(model).__name__})"
        )
    for path in ("embed_tokens", "norm", "layers.0", *(f"layers.0.{p}" for p in _REQUIRED)):
        try:
            model.base_model.get_submodule(path)
        except AttributeError:
            raise NotImplementedError(
                f"{type(model).__name__}: no {model.base_model_prefix}.{path}; not the Llama layout decoder width "
                f"pruning expects"
            ) from None


def resolve_decoder_width(config, hidden_size, num_attention_heads, num_key_value_heads, intermediate_size) -> dict:
    """The student's {hidden_size, num_attention_heads, num_key_value_heads, intermediate_size}, each ≤ the
    teacher's, None meaning the teacher's. Heads go by whole KV groups: num_attention_heads must be a multiple of
    the teacher's query heads per KV head, and agree with num_key_value_heads when both are given. ValueError
    naming the key otherwise."""
    t_heads, t_kv = config.num_attention_heads, _kv_heads(config)
    group = t_heads // t_kv
    requested = (
        ("hidden_size", hidden_size, config.hidden_size),
        ("num_attention_heads", num_attention_heads, t_heads),
        ("num_key_value_heads", num_key_value_heads, t_kv),
        ("intermediate_size", intermediate_size, config.intermediate_size),
    )
    for name, value, limit in requested:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
        if value > limit:
            raise ValueError(f"{name}={value} is larger than the teacher's {limit}; a student can only be narrower")
    gqa = (f"the teacher's {group} query heads per KV head ({t_heads} heads / {t_kv} KV heads; whole KV groups are "
           f"kept or dropped)")
    if num_key_value_heads is not None:
        if num_attention_heads is not None and num_attention_heads != num_key_value_heads * group:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} with num_key_value_heads={num_key_value_heads} breaks "
                f"{gqa}; give num_attention_heads={num_key_value_heads * group} or only one of the two"
            )
        kv = num_key_value_heads
    elif num_attention_heads is not None:
        if num_attention_heads % group:
            raise ValueError(f"num_attention_heads={num_attention_heads} is not a multiple of {gqa}; try "
                             f"{max(group, num_attention_heads // group * group)}")
        kv = num_attention_heads // group
    else:
        kv = t_kv
    return {
        "hidden_size": hidden_size if hidden_size is not None else config.hidden_size,
        "num_attention_heads": kv * group,
        "num_key_value_heads": kv,
        "intermediate_size": intermediate_size if intermediate_size is not None else config.intermediate_size,
    }


# ---------------------------------------------------------------------------------------------------- ranking


def decoder_importance(
    model: PreTrainedModel, layers: Sequence[int], calibration_inputs: Mapping[str, Tensor]
) -> dict[str, Tensor | list[Tensor]]:
    """Minitron's activation importance of `model`'s hidden channels, and per layer in `layers` of its KV groups
    and MLP neurons (see the module docstring), from one forward of the calibration batch in eval mode.

    calibration_inputs: input_ids (B, T), attention_mask (B, T) with 1 = real token (other keys are ignored);
    padding does not count. Returns {"hidden": (D,), "groups": [(G,) per layer], "neurons": [(I,) per layer]}.
    """
    config = model.config
    chosen = [model.base_model.layers[i] for i in layers]
    head_dim = decoder_head_dim(config)
    n_kv = _kv_heads(config)
    group = config.num_attention_heads // n_kv
    device = model.get_input_embeddings().weight.device
    inputs = {k: v.to(device) for k, v in calibration_inputs.items() if k in ("input_ids", "attention_mask")}
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))

    def token_sum(x: Tensor) -> Tensor:
        """(B, T, ...) → (...), summed over the real tokens."""
        return x[mask.bool()].sum(0)

    hidden = torch.zeros(config.hidden_size, device=device)
    groups = [torch.zeros(n_kv, device=device) for _ in chosen]
    neurons = [torch.zeros(config.intermediate_size, device=device) for _ in chosen]

    def on_norm(_m, _args, output):
        hidden.add_(token_sum(output.float().abs()))

    def on_heads(i):
        def hook(_m, args):
            # (B, T, H·d_h) → (B, T, G, H/G, d_h): query head h reads KV head h // (H/G), so groups are contiguous
            per_head = args[0].float().unflatten(-1, (n_kv, group, head_dim)).norm(dim=-1)  # (B, T, G, H/G)
            groups[i].add_(token_sum(per_head).sum(-1))

        return hook

    def on_neurons(i):
        def hook(_m, args):
            neurons[i].add_(token_sum(args[0].float().abs()))  # args[0]: act(gate)·up, (B, T, I)

        return hook

    norms = [model.base_model.norm] + [getattr(layer, n) for layer in chosen for n in RESIDUAL_NORMS
                                       if hasattr(layer, n)]
    handles = [norm.register_forward_hook(on_norm) for norm in norms]
    for i, layer in enumerate(chosen):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_neurons(i)))
    was_training = model.training
    try:
        model.eval()  # no dropout
        with torch.no_grad():
            # the base model: every hook sits inside it, and the (B, T, vocab) logits would only cost memory
            model.base_model(**inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {"hidden": hidden, "groups": groups, "neurons": neurons}


@dataclass
class DecoderWidthPlan:
    """Which teacher units a width-pruned decoder keeps; every index tensor is sorted ascending."""

    hidden: Tensor
    """(D_s,) kept hidden channels, shared by the whole residual stream."""
    groups: list[Tensor]
    """Per kept layer, (G_s,) kept KV groups (= kept KV heads)."""
    neurons: list[Tensor]
    """Per kept layer, (I_s,) kept MLP neurons."""
    head_dim: int
    group_size: int
    """Query heads per KV head."""

    def kv_rows(self, i: int) -> Tensor:
        """Rows of k_proj / v_proj that the kept KV heads of layer i occupy."""
        return _head_rows(self.groups[i], self.head_dim)

    def q_rows(self, i: int) -> Tensor:
        """Rows of q_proj (columns of o_proj) of the query heads of the kept groups of layer i."""
        heads = self.groups[i][:, None] * self.group_size + torch.arange(self.group_size)[None, :]
        return _head_rows(heads.reshape(-1), self.head_dim)


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, in ascending (original) order."""
    return torch.topk(scores.cpu(), k).indices.sort().values


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def plan_decoder_width(
    teacher: PreTrainedModel, layers: Sequence[int], widths: Mapping[str, int], calibration_inputs: Mapping[str, Tensor]
) -> DecoderWidthPlan:
    """Rank the teacher's units on the calibration batch (`decoder_importance`) and keep the top ones for `widths`
    (as `resolve_decoder_width` returns them)."""
    scores = decoder_importance(teacher, layers, calibration_inputs)
    config = teacher.config
    return DecoderWidthPlan(
        hidden=_top(scores["hidden"], widths["hidden_size"]),
        groups=[_top(s, widths["num_key_value_heads"]) for s in scores["groups"]],
        neurons=[_top(s, widths["intermediate_size"]) for s in scores["neurons"]],
        head_dim=decoder_head_dim(config),
        group_size=config.num_attention_heads // _kv_heads(config),
    )


# ---------------------------------------------------------------------------------------------------- slicing

# Which index set each dimension of a layer's parameters is sliced by: "q" = rows of the kept query heads, "kv" =
# rows of the kept KV heads, "ffn" = kept neurons, "hidden" = kept channels, None = kept whole.
_LAYER_DIMS = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    **{f"self_attn.{p}.weight": ("kv", "hidden") for p in ("k_proj", "v_proj")},
    **{f"self_attn.{p}.bias": ("kv",) for p in ("k_proj", "v_proj")},
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    **{f"mlp.{p}.weight": ("ffn", "hidden") for p in ("gate_proj", "up_proj")},
    **{f"mlp.{p}.bias": ("ffn",) for p in ("gate_proj", "up_proj")},
    "mlp.down_proj.weight": ("hidden", "ffn"),
    "mlp.down_proj.bias": ("hidden",),
    **{f"{n}.weight": ("hidden",) for n in RESIDUAL_NORMS},
}
# The same outside the layers, keys relative to the model (the base model's own under its prefix, e.g. "model.").
_OUTER_DIMS = {"embed_tokens.weight": (None, "hidden"), "norm.weight": ("hidden",), "lm_head.weight": (None, "hidden")}


def slice_decoder_state(
    teacher: PreTrainedModel, state: dict[str, Tensor], target: dict[str, Tensor], prefix: str,
    plan: DecoderWidthPlan,
) -> dict[str, Tensor]:
    """Slice a (depth-renumbered) teacher state dict down to the student's shapes (`target`) following `plan`.

    prefix: the layer list's, e.g. "model.layers.". A parameter without a role in the tables above must already
    have the student's shape (q_norm, k_norm, ...); NotImplementedError naming it otherwise, so a layout this module
    does not know fails here rather than loading a wrong slice.
    """
    base = teacher.base_model_prefix + "."
    head = teacher.get_output_embeddings()
    tied = head is not None and head.weight is teacher.get_input_embeddings().weight
    embed_scale = 1.0
    if teacher.config.model_type == "gemma3_text" and not tied:  # see the module docstring
        embed_scale = math.sqrt(teacher.config.hidden_size / len(plan.hidden))
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            i = int(index)  # the student's numbering: `state` is depth-renumbered, as plan's per-layer lists
            roles = _LAYER_DIMS.get(rest, ())
            sets = {"hidden": plan.hidden, "q": plan.q_rows(i), "kv": plan.kv_rows(i), "ffn": plan.neurons[i]}
        else:
            roles = _OUTER_DIMS.get(key.removeprefix(base), ())
            sets = {"hidden": plan.hidden}
        for dim, role in enumerate(roles):
            if role is not None:
                value = value.index_select(dim, sets[role].to(value.device))
        if key == base + "embed_tokens.weight":
            value = value * embed_scale
        want = target[key].shape if key in target else value.shape
        if value.shape != want:
            raise NotImplementedError(
                f"decoder width pruning: {key} has shape {tuple(value.shape)}, the student expects {tuple(want)}"
            )
        out[key] = value
    return out
