"""Linear probe on cached features: learns a separable problem; few-shot subsets are what they say."""
from __future__ import annotations

import numpy as np
import torch

from odis.eval.linear import few_shot_indices, fraction_indices, probe, probe_settings


def separable(n_per_class, classes=5, dim=24, seed=0):
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3  # same classes always
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + 0.5 * torch.randn(len(y), dim, generator=g), y


def test_probe_learns_separable_problem():
    x, y = separable(40)
    xv, yv = separable(20, seed=1)
    out = probe(x, y, xv, yv, num_classes=5, lrs=(1e-3, 1e-1), epochs=20, batch_size=64)
    assert out["top1"] >= 99.0
    assert set(out["per_lr"]) == {"0.001", "0.1"}


def test_probe_on_random_labels_is_chance():
    x, _ = separable(40)
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 5, len(x)))
    xv, _ = separable(40, seed=1)
    yv = torch.from_numpy(np.random.default_rng(1).integers(0, 5, len(xv)))
    out = probe(x, y, xv, yv, num_classes=5, lrs=(1e-2,), epochs=10)
    assert out["top1"] < 45.0


def test_few_shot_and_fraction_subsets():
    labels = np.repeat(np.arange(4), [10, 3, 50, 1])
    idx = few_shot_indices(labels, 2, seed=0)
    assert np.bincount(labels[idx]).tolist() == [2, 2, 2, 1]
    assert not np.array_equal(idx, few_shot_indices(labels, 2, seed=1))
    idx = fraction_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[idx]).tolist() == [1, 1, 5, 1]
    assert len(np.unique(idx)) == len(idx)


def test_probe_settings_average_over_seeds():
    x, y = separable(10)
    xv, yv = separable(10, seed=1)
    res = probe_settings(x, y, xv, yv, 5, shots=(1, 2), fractions=(0.5,), seeds=(0, 1, 2), lrs=(1e-1,), epochs=5)
    assert [r["setting"] for r in res] == ["full", "1-shot", "2-shot", "0.5-fraction"]
    assert len(res[1]["runs"]) == 3 and res[1]["runs"][0]["n_train"] == 5
    assert res[1]["top1"] == np.mean([r["top1"] for r in res[1]["runs"]])
    assert res[0]["top1"] >= 99.0
    from odis.eval.protocols import table

    text = table({"protocol": "linear", "backbone": "b", "results": res})  # the std of drawn settings shows
    line = {ln.split(" top-1")[0]: ln for ln in text.splitlines()}
    assert line["1-shot"].endswith(f"{res[1]['top1']:.2f} ± {res[1]['top1_std']:.2f}")
    assert "±" not in line["full"]  # one run: no spread to show
