"""A calibration batch through a model: its inputs on the model's device with the mask of real tokens, one forward
without gradients in eval mode, and means over the real tokens. Layer selection by importance (Block Influence)
and width pruning both rank the teacher's units this way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real tokens of x (B, L, ...) → (...), mask (B, L) with 1 = real token."""
    m = mask.to(x.dtype).reshape(*mask.shape, *([1] * (x.dim() - 2)))
    return (x * m).sum((0, 1)) / m.sum().clamp_min(1)


def calibration_batch(
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


def eval_forward(model: nn.Module, inputs: Mapping[str, Tensor], **kwargs):
    """One forward without gradients in eval mode (no dropout), the model's mode restored afterwards."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(**inputs, **kwargs)
    finally:
        model.train(was_training)
