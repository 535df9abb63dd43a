"""Box math: pure functions on `[x0, y0, x1, y1]` boxes in pixels.

Convention: continuous pixel coordinates. Pixel (i, j) covers [j, j+1) x [i, i+1); a box covers the pixels it
overlaps with positive area. A box is *empty* when x1 <= x0 or y1 <= y0 (e.g. an object cropped away).
Arrays are numpy float (..., 4); every function is vectorised over leading dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A box is empty when its area is below this (in squared pixels of whatever image it lives in).
EMPTY_AREA = 1e-6
# Edges this close outside the image are float32 rounding, not a box that reaches outside: not counted as clipped.
CLIP_TOL = 1e-3


def box_area(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def is_empty(boxes: np.ndarray) -> np.ndarray:
    return box_area(boxes) <= EMPTY_AREA


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    b = np.array(boxes, dtype=np.float64, copy=True)
    b[..., 0::2] = np.clip(b[..., 0::2], 0, width)
    b[..., 1::2] = np.clip(b[..., 1::2], 0, height)
    return b


def account_boxes(boxes: np.ndarray, width, height) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Boxes [n,4] checked against their images (width, height: scalars or [n]): (boxes clipped to the image,
    which of them are used, which of those were clipped, counts). The counts are the box-accounting vocabulary
    of import-boxes, shard, the trainer and the evaluators: `used` (of which `clipped`: it reached outside),
    `dropped_not_finite` (a NaN or infinite coordinate: clipping would make it a wrong box), `dropped_empty`."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w = np.broadcast_to(np.asarray(width, np.float64), len(b))
    h = np.broadcast_to(np.asarray(height, np.float64), len(b))
    finite = np.isfinite(b).all(axis=1)
    with np.errstate(invalid="ignore"):
        c = np.minimum(np.maximum(b, 0.0), np.stack([w, h, w, h], axis=1))
        used = finite & (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
        clipped = used & (np.abs(c - b) > CLIP_TOL).any(axis=1)
    counts = {"used": int(used.sum()), "clipped": int(clipped.sum()), "dropped_not_finite": int((~finite).sum()),
              "dropped_empty": int((finite & ~used).sum())}
    return c, used, clipped, counts


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise intersection box (possibly empty: x1 <= x0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.concatenate([np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU between a [N,4] and b [M,4] -> [N,M]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    inter = box_area(intersect(a[:, None, :], b[None, :, :]))
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def scale_boxes(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Boxes of an image resized by (sx, sy) (new = old * s)."""
    b = np.array(boxes, dtype=np.float64, copy=True)
    b[..., 0::2] *= sx
    b[..., 1::2] *= sy
    return b


BOX_SAMPLINGS = ("uniform", "area")


def sample_box(boxes: np.ndarray, mode: str, rng: np.random.Generator) -> int:
    """Index of one box: `uniform` over boxes or proportional to `area` (paper: one object per image per step)."""
    p = box_probs(boxes, mode)
    return int(rng.integers(len(boxes))) if p is None else int(rng.choice(len(boxes), p=p))


def box_probs(boxes: np.ndarray, mode: str) -> np.ndarray | None:
    """Each box's chance under `sample_box`: proportional to its area (`area`), or None for equal chances
    (`uniform`, or `area` where every box is empty)."""
    if len(boxes) == 0:
        raise ValueError("sample_box needs at least one box")
    if mode == "uniform":
        return None
    if mode == "area":
        w = box_area(boxes)
        total = w.sum()
        return w / total if total > 0 else None
    raise ValueError(f"box sampling must be 'uniform' or 'area', got {mode!r}")


@dataclass(frozen=True)
class Crop:
    """A crop region of the source image (pixels) resized to an output view of `out_h` x `out_w`, maybe flipped."""

    top: float
    left: float
    height: float
    width: float
    out_h: int
    out_w: int
    flip: bool = False

    def apply(self, boxes: np.ndarray) -> np.ndarray:
        """Carry boxes from source pixels into the view's pixels: crop, resize, then horizontal flip."""
        b = np.asarray(boxes, np.float64)
        sx, sy = self.out_w / self.width, self.out_h / self.height
        x0 = (b[..., 0] - self.left) * sx
        x1 = (b[..., 2] - self.left) * sx
        y0 = (b[..., 1] - self.top) * sy
        y1 = (b[..., 3] - self.top) * sy
        if self.flip:
            x0, x1 = self.out_w - x1, self.out_w - x0
        out = np.stack([x0, y0, x1, y1], axis=-1)
        return clip_boxes(out, self.out_w, self.out_h)

    def visible_fraction(self, box: np.ndarray) -> float:
        """Share of the box's area (in the source image) that lies inside the crop region."""
        area = float(box_area(box))
        if area <= EMPTY_AREA:
            return 0.0
        region = np.array([self.left, self.top, self.left + self.width, self.top + self.height])
        return float(box_area(intersect(np.asarray(box, np.float64), region))) / area


def box_to_patch_mask(box: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
    """Boolean [height//patch, width//patch] grid: True where the patch has any pixel inside the box.

    Patch (r, c) covers [c*p, (c+1)*p) x [r*p, (r+1)*p); it is inside when that square overlaps the box with
    positive area (the reference's `Unfold(p).any()` on the rasterised box). An empty box gives an all-False grid.
    """
    gh, gw = height // patch, width // patch
    x0, y0, x1, y1 = (float(v) for v in box)
    cols = np.arange(gw) * patch
    rows = np.arange(gh) * patch
    in_x = (cols < x1) & (cols + patch > x0)
    in_y = (rows < y1) & (rows + patch > y0)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((gh, gw), dtype=bool)
    return in_y[:, None] & in_x[None, :]


def boxes_to_patch_masks(boxes: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
    """Vectorised `box_to_patch_mask` for [B,4] boxes -> bool [B, gh, gw]."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    gh, gw = height // patch, width // patch
    cols = np.arange(gw) * patch
    rows = np.arange(gh) * patch
    in_x = (cols[None] < b[:, 2:3]) & (cols[None] + patch > b[:, 0:1])
    in_y = (rows[None] < b[:, 3:4]) & (rows[None] + patch > b[:, 1:2])
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return in_y[:, :, None] & in_x[:, None, :] & valid[:, None, None]
