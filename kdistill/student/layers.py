"""Which teacher layers a student keeps (depth), and how their weights are renumbered.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from kdistill.student.calibration import calibration_batch, eval_forward, masked_mean


LAYER_MAPS = ("uniform", "first", "last", "importance")
LAYER_LIST_SUFFIXES = ("encoder.layer", "transformer.layer", "layers", "h", "layer", "blocks")


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
    inputs, mask = calibration_batch(model, calibration_inputs)
    last = []
    # hidden_states[-1] is not what the last block returned in decoders: GPT-2, Llama, Qwen2 ... store it after the
    # final norm (ln_f / norm), so cos(h, norm(h)) would score the norm's rescaling, not the block. The block's own
    # output is read with a hook instead (for BERT-like encoders the two agree).
    handle = blocks[-1].register_forward_hook(
        lambda _m, _a, output: last.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        # the base model: the LM head's (B, L, vocab) logits would cost more memory than every hidden state together
        states = eval_forward(model.base_model, inputs, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    if states is None or len(states) != len(blocks) + 1:
        raise NotImplementedError(
            f"{type(model).__name__}: output_hidden_states gave {0 if states is None else len(states)} hidden "
            f"states, not embeddings + {len(blocks)} blocks; cannot measure Block Influence"
        )
    states = [*states[: len(blocks)], last[0]]
    return [
        1.0 - masked_mean(F.cosine_similarity(h_in.float(), h_out.float(), dim=-1), mask).item()
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


def renumber_layers(state: dict[str, Tensor], prefix: str, layers: list[int]) -> dict[str, Tensor]:
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
