"""Box math: patch masks against rasterised pixels; crops carry boxes exactly."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from odis.boxes import Crop, box_iou, box_to_patch_mask, boxes_to_patch_masks, sample_box


def _raster(box, h, w):
    """Pixels (i, j) whose unit square overlaps the box with positive area."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return np.zeros((h, w), bool)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    return (jj < x1) & (jj + 1 > x0) & (ii < y1) & (ii + 1 > y0)


boxes_st = st.tuples(st.floats(0, 63), st.floats(0, 63), st.floats(0, 64), st.floats(0, 64))


@settings(max_examples=200, deadline=None)
@given(b=boxes_st, patch=st.sampled_from([4, 8, 16]))
def test_patch_mask_is_any_pixel_inside(b, patch):
    box = np.array(b)
    pix = _raster(box, 64, 64)
    want = pix.reshape(64 // patch, patch, 64 // patch, patch).any(axis=(1, 3))
    assert np.array_equal(box_to_patch_mask(box, 64, 64, patch), want)
    assert np.array_equal(boxes_to_patch_masks(box[None], 64, 64, patch)[0], want)


@settings(max_examples=200, deadline=None)
@given(top=st.integers(0, 40), left=st.integers(0, 40), size=st.integers(8, 24), flip=st.booleans(),
       b=st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 30), st.integers(1, 30)))
def test_crop_moves_box_pixel_for_pixel(top, left, size, flip, b):
    """Integer crop at scale 1: the carried box is exactly where the box's pixels land."""
    x, y, w, h = b
    box = np.array([x, y, min(x + w, 64), min(y + h, 64)], float)
    img = _raster(box, 64, 64)
    view = img[top:top + size, left:left + size]
    if flip:
        view = view[:, ::-1]
    crop = Crop(top, left, size, size, size, size, flip)
    carried = crop.apply(box)
    assert np.array_equal(_raster(carried, size, size), view)


def test_visible_fraction_and_iou():
    c = Crop(0, 0, 10, 10, 10, 10)
    assert c.visible_fraction(np.array([5, 5, 15, 15])) == 0.25
    assert box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [0, 0, 2, 2]])).tolist() == [[1 / 7, 1.0]]


def test_sample_box_area_mode_prefers_large_boxes():
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 1, 1], [0, 0, 10, 10]], float)
    picks = [sample_box(boxes, "area", rng) for _ in range(500)]
    assert 0.97 < np.mean(picks) <= 1.0
    assert 0.4 < np.mean([sample_box(boxes, "uniform", rng) for _ in range(500)]) < 0.6
