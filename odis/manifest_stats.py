"""Manifest statistics: images, boxes, boxes per image, box area and score distributions, error reasons
(`odis stats`, and what `import-boxes` prints), and their histograms as a PNG.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from odis.manifest import BOX_COLUMNS

def _quantiles(x: np.ndarray) -> dict:
    if x.size == 0:
        return {}
    q = np.quantile(x, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]),
            "max": float(q[4]), "mean": float(x.mean())}


def box_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Per-box arrays of a manifest (rows with a box only): relative area, score, and per-image box counts."""
    df = table.select(["image_id", "width", "height", *BOX_COLUMNS, "score", "error"]).to_pandas()
    has_box = df["x0"].notna()
    b = df[has_box]
    rel_area = ((b.x1 - b.x0) * (b.y1 - b.y0) / (b.width.astype(float) * b.height.astype(float))).to_numpy()
    ok_images = df.loc[df["error"].isna(), "image_id"].unique()
    counts = b.groupby("image_id").size().reindex(ok_images, fill_value=0).to_numpy()
    return {"rel_area": rel_area, "score": b["score"].to_numpy(dtype=float), "boxes_per_image": counts}


def summary_stats(table: pa.Table) -> dict:
    """Images, boxes, boxes per image, relative box area and score distributions, no-box and error counts."""
    arr = box_arrays(table)
    df = table.select(["image_id", "x0", "error", "source"]).to_pandas()
    errors = df.loc[df["error"].notna(), "image_id"].nunique()
    counts = arr["boxes_per_image"]
    return {
        "images": int(df["image_id"].nunique()),
        "boxes": int(df["x0"].notna().sum()),
        "no_box_images": int((counts == 0).sum()),
        "error_images": int(errors),
        "boxes_per_image": _quantiles(counts.astype(float)),
        "box_area_fraction": _quantiles(arr["rel_area"]),
        "score": _quantiles(arr["score"]),
        "sources": {k: int(v) for k, v in df["source"].value_counts().items()},
        "errors_by_reason": _error_reasons(df["error"].dropna()),
    }


def _error_reasons(errors) -> dict[str, int]:
    """Error messages grouped by their reason (the text after the file name)."""
    reasons = errors.map(lambda e: e.split(": ", 1)[-1].split(" (", 1)[0])
    return {k: int(v) for k, v in reasons.value_counts().head(10).items()}


def plot_stats(table: pa.Table, out: str | os.PathLike, title: str = "") -> Path:
    """Histograms of boxes per image, relative box area (log) and score, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = box_arrays(table)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist(arr["boxes_per_image"], bins=min(50, int(arr["boxes_per_image"].max(initial=0)) + 1))
    ax[0].set(title="boxes per image", xlabel="boxes", ylabel="images")
    area = arr["rel_area"][arr["rel_area"] > 0]
    ax[1].hist(area, bins=np.logspace(-5, 0, 41) if area.size else 10)
    ax[1].set(title="box area / image area", xscale="log", ylabel="boxes")
    ax[2].hist(arr["score"], bins=40, range=(0, 1))
    ax[2].set(title="score", ylabel="boxes")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out