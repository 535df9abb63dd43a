"""Schedules as pure functions of the iteration (iBOT/DINO `cosine_scheduler` semantics, evaluated lazily).

`it` counts optimiser steps from 0; `steps_per_epoch` converts epochs to steps.
"""
from __future__ import annotations

import math


def cosine(it: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `start` over `warmup` steps, then cosine from `start` to `end`.

    The warm-up is iBOT's `np.linspace(warmup_start, start, warmup)`: it reaches `start` at its last step."""
    if it < warmup:
        return warmup_start + (start - warmup_start) * it / max(warmup - 1, 1)
    span = max(total - warmup, 1)
    t = min(it - warmup, span)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / span))


def teacher_temp(it: int, steps_per_epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Linear per EPOCH from `warmup_temp` to `temp` over `warmup_epochs`, then constant (as iBOT's)."""
    epoch = it // max(steps_per_epoch, 1)
    if epoch >= warmup_epochs or warmup_epochs <= 1:
        return temp if epoch >= warmup_epochs else warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


def lr(it: int, steps_per_epoch: int, epochs: int, base_lr: float, min_lr: float, warmup_epochs: int,
       batch_size_total: int) -> float:
    """Peak lr = base_lr * total batch / 256 (linear scaling rule), warm-up then cosine to min_lr."""
    peak = base_lr * batch_size_total / 256.0
    return cosine(it, epochs * steps_per_epoch, peak, min_lr, warmup=warmup_epochs * steps_per_epoch)


def weight_decay(it: int, total: int, start: float, end: float) -> float:
    return cosine(it, total, start, end)


def teacher_momentum(it: int, total: int, start: float) -> float:
    return cosine(it, total, start, 1.0)
