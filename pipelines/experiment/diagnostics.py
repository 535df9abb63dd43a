"""What a reviewer asks before reading a comparison: can the box matter on these scenes, and did the runs learn?

- `mask_coverage`: the share of the patch grid, and of each distractor's patches, that the target's [OBJ] mask
  covers in the k-NN's view (Resize + CenterCrop at the backbone's size). A mask that covers most of the grid and
  of the distractors makes masked attention nearly a no-op, and ODIS then cannot differ from iBOT.
- `box_quality`: how close a box source (a detector's, jitter, random) is to the ground truth of the same scenes:
  the share of its boxes that match a GT object (IoU >= 0.5), the share of GT objects it finds, and the box a
  training step draws from it (its size, the chance that it is an object).
- `run_diagnostics`: from a training's own files, the teacher's entropy at the end as a share of ln K (1.0: the
  teacher's output is uniform for every image, a collapse), and the shares of global views that fell back to
  an ordinary crop (object-aware cropping found none) and whose [OBJ] was invalid (the box cropped away).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml

from odis.boxes import box_area, box_iou, box_probs, box_to_patch_mask
from odis.eval.features import eval_crop, eval_view_box, select_box
from odis.manifest import BOX_COLUMNS, read_manifest

COLLAPSED = 0.98  # teacher entropy / ln K at the end of training from which a run is reported as collapsed


def mask_coverage(manifest: str | Path, size: int, patch: int, how: str = "largest") -> dict:
    """Mean shares (in [0, 1]) over the manifest's images of the grid, and over their distractors of the
    distractor's patches, inside the target's patch mask; the target is the box `how` selects (the k-NN's rule).
    A target the centre crop cuts away leaves the k-NN's [OBJ] unmasked (`fallbacks`): its whole grid counts."""
    df = read_manifest(manifest, columns=["image_id", "width", "height", *BOX_COLUMNS]).to_pandas()
    df = df[df["x0"].notna()]
    grid, distractor, fallbacks = [], [], 0
    for _, g in df.groupby("image_id", sort=False):
        boxes = g[BOX_COLUMNS].to_numpy(np.float64)
        w, h = int(g["width"].iloc[0]), int(g["height"].iloc[0])
        target = select_box(boxes, how=how)
        if target is None:
            continue
        vbox = eval_view_box(w, h, target, size)
        fallbacks += vbox is None
        t = np.ones((size // patch,) * 2, bool) if vbox is None else box_to_patch_mask(vbox, size, size, patch)
        grid.append(t.mean())
        crop = eval_crop(w, h, size)
        for b in boxes[~np.all(boxes == target, axis=1)]:
            d = box_to_patch_mask(crop.apply(b), size, size, patch)
            if d.any():
                distractor.append((t & d).sum() / d.sum())
    return {"size": size, "patch": patch, "grid": f"{size // patch}x{size // patch}", "images": len(grid),
            "fallbacks": fallbacks, "distractors": len(distractor), "grid_share": _mean(grid),
            "distractor_share": _mean(distractor)}


def box_quality(manifest: str | Path, gt: str | Path, sampling: str = "area", iou: float = 0.5) -> dict:
    """Over the images of `gt`: boxes per image of `manifest`, the share of them with IoU >= `iou` to a GT object
    (`precision`), their mean best IoU, the share of GT objects matched by one of them (`recall`), and what a
    training step draws (`data.box_sampling`; an image without a box trains with the whole image): the box's mean
    share of the image and the chance that it matches an object."""
    boxes, truth = _boxes_by_image(manifest), _boxes_by_image(gt)
    best, found, n_gt, drawn_area, drawn_match = [], 0, 0, [], []
    for image, (t, w, h) in truth.items():
        b = boxes[image][0] if image in boxes else np.zeros((0, 4))
        n_gt += len(t)
        drawn = b if len(b) else np.array([[0, 0, w, h]], np.float64)
        m = box_iou(drawn, t)
        if len(b):
            best += list(m.max(1))
            found += int((m.max(0) >= iou).sum())
        p = box_probs(drawn, sampling)
        p = np.full(len(drawn), 1 / len(drawn)) if p is None else p
        drawn_area.append(float(p @ box_area(drawn)) / (w * h))
        drawn_match.append(float(p @ (m.max(1) >= iou)))
    best = np.array(best)
    return {"images": len(truth), "boxes_per_image": round(len(best) / max(1, len(truth)), 2),
            "precision": _mean(list(best >= iou)), "mean_best_iou": _mean(list(best)),
            "recall": round(found / n_gt, 4) if n_gt else None, "sampling": sampling,
            "drawn_area_share": _mean(drawn_area), "drawn_matches_object": _mean(drawn_match)}


def _boxes_by_image(manifest: str | Path) -> dict[str, tuple[np.ndarray, float, float]]:
    """image id -> (its boxes [n, 4], width, height), rows without a box left out (numpy slices, not a pandas
    group per image: a COCO-sized manifest in seconds)."""
    t = read_manifest(manifest, columns=["image_id", "width", "height", *BOX_COLUMNS])
    ids = np.asarray(t.column("image_id").to_pylist(), dtype=object)
    xyxy = np.stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in BOX_COLUMNS], 1)
    wh = np.stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in ("width", "height")], 1)
    keep = ~np.isnan(xyxy[:, 0])
    ids, xyxy, wh = ids[keep], xyxy[keep], wh[keep]
    order = np.argsort(ids, kind="stable")
    ids, xyxy, wh = ids[order], xyxy[order], wh[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(ids)]
    return {ids[a]: (xyxy[a:b], wh[a, 0], wh[a, 1]) for a, b in zip(starts, ends)}


def _mean(x: list) -> float | None:
    return round(float(np.mean(x)), 4) if x else None


def run_diagnostics(folder: str | Path) -> dict:
    """{"teacher_entropy": t_entropy / ln K at the last logged step, "crop_fallbacks", "obj_invalid": shares of
    the global views (two a sample) of the training's last start}; None where the run's files do not hold it
    (e.g. an untrained network)."""
    folder = Path(folder)
    out = {"teacher_entropy": None, "crop_fallbacks": None, "obj_invalid": None}
    try:
        with open(folder / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("t_entropy")]
        k = yaml.safe_load((folder / "config.yaml").read_text())["model"]["out_dim"]
        if rows:
            out["teacher_entropy"] = round(float(rows[-1]["t_entropy"]) / math.log(int(k)), 4)
        stats = json.loads((folder / "data.json").read_text())
    except (OSError, KeyError, ValueError, TypeError, yaml.YAMLError):
        return out
    if stats.get("samples"):
        for key in ("crop_fallbacks", "obj_invalid"):
            out[key] = round(stats.get(key, 0) / (2 * stats["samples"]), 4)
    return out
