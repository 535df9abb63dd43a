"""The statistics an experiment report needs: mean ± std over seeds and the paired difference with a t-interval.

Paired: two runs that share a seed saw the same data order (and, where the architectures allow, the same
initialisation), so their difference per seed removes the seed's own variance; the 95% interval of its mean is
Student's t with n - 1 degrees of freedom.
"""
from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> dict:
    """{"n", "mean", "std"} (std over the values, n - 1 in the denominator; None for a single value)."""
    n = len(values)
    return {"n": n, "mean": statistics.fmean(values) if n else None,
            "std": statistics.stdev(values) if n > 1 else None}


def t_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b over the seeds both have: {"n", "mean_diff", "std", "ci95": [lo, hi] or None, "per_seed"}."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    out = {"n": n, "mean_diff": statistics.fmean(diffs) if n else None, "std": None, "ci95": None,
           "per_seed": [{"seed": s, "diff": d} for s, d in zip(seeds, diffs)]}
    if n > 1:
        sd = statistics.stdev(diffs)
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        out.update(std=sd, ci95=[out["mean_diff"] - half, out["mean_diff"] + half])
    return out
