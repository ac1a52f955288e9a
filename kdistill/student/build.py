"""Build a smaller student of the teacher's own class, initialised from the teacher's weights (`build_student`),
and describe it beside its teacher (`describe_student`).

Two independent reductions, applied together by `build_student`: depth (`kdistill.student.layers`: which layers
are kept) and width (`kdistill.student.width` for BERT-family encoders, `kdistill.decoder_width` for decoders with
grouped-query attention).

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

from torch import Tensor, nn
from transformers import PreTrainedModel

from kdistill.decoder_width import (
    check_decoder_layout,
    decoder_head_dim,
    is_width_prunable_decoder,
    plan_decoder_width,
    slice_decoder_state,
)
from kdistill.models import seeded
from kdistill.student.layers import (
    block_influence,
    check_layers,
    find_layer_list,
    num_layers_of,
    renumber_layers,
    select_layers,
)
from kdistill.student.width import check_bert_layout, plan_width, resolve_widths, slice_state

log = logging.getLogger(__name__)


INIT_CHOICES = ("teacher-layers", "pruned", "random")


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

    Why one long function: depth, width and init decide together which teacher weights are copied where; split,
    each part would need the others' decisions passed back and forth.
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
            check_bert_layout(teacher)
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
        state = renumber_layers(teacher.state_dict(), prefix, layers)
        if narrower and decoder:
            plan = plan_decoder_width(teacher, layers, widths, calibration_inputs)
            state = slice_decoder_state(teacher, state, student.state_dict(), prefix, plan)
            info["ranking"] = "activations"
        elif narrower:
            plan = plan_width(teacher, layers, **widths, calibration_inputs=calibration_inputs)
            state = slice_state(state, student.state_dict(), prefix, plan, teacher.config.hidden_size)
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


def describe_student(teacher: nn.Module | None, student: nn.Module) -> dict:
    """Sizes for a report: {"teacher": {...}, "student": {...}, "param_ratio": student/teacher, "init": {...}}.

    Each side holds layers, hidden, heads, ffn (None where the config has no such notion) and params. teacher None
    (one behind an endpoint, its weights not here): its side and the ratio are None.
    """
    t, s = (_shape(teacher) if teacher is not None else None), _shape(student)
    return {
        "teacher": t,
        "student": s,
        "param_ratio": s["params"] / t["params"] if t is not None else None,
        "init": getattr(student, "kdistill_init", None),
    }
