"""Drop-rate schedules p_t and the steps at which the topology is updated."""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def drop_fraction(step: int, total_steps: int, initial: float, schedule: str) -> float:
    """p_t: the fraction of the K slots dropped (and regrown) at step t."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "cosine":  # RigL's schedule
        return initial * 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":  # SpIEL's default
        return initial * (1.0 - frac)
    if schedule == "constant":
        return initial
    raise ValueError(f"unknown drop schedule {schedule!r}; choose from {SCHEDULES}")


def is_update_step(step: int, interval: int, total_steps: int) -> bool:
    """Updates run after the optimizer step of every multiple of `interval`, except the last step
    (a topology change there would leave new slots untrained)."""
    return step % interval == 0 and step < total_steps


def in_window(step: int, interval: int, window: int, total_steps: int) -> bool:
    """Whether step `step` (1-based) accumulates the dense gradient for the next update."""
    nxt = ((step + interval - 1) // interval) * interval
    return is_update_step(nxt, interval, total_steps) and nxt - step < window
