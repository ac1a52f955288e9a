"""The temperature schedule: the distillation temperature as a pure function of the training step."""

from __future__ import annotations

import math


def temperature_at(
    step: int,
    total_steps: int,
    *,
    start: float,
    end: float | None = None,
    schedule: str = "constant",
) -> float:
    """Temperature at ``step`` of ``total_steps`` (a pure function of the step).

    constant: start
    linear:   start + (end − start) · s
    cosine:   end + (start − end) · (1 + cos(π · s)) / 2
    with s = clamp(step / total_steps, 0, 1), so steps past total_steps stay at ``end``.
    """
    if schedule == "constant":
        return float(start)
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"temperature_at: unknown schedule {schedule!r}; use 'constant', 'linear' or 'cosine'")
    if end is None:
        raise ValueError(f"temperature_at: schedule {schedule!r} needs end=")
    if total_steps <= 0:
        raise ValueError(f"temperature_at: total_steps must be > 0, got {total_steps}")
    s = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return float(start + (end - start) * s)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * s)))
