"""Object-aware multi-crop: the box follows the pixels; object-aware cropping on real COCO boxes."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odis.boxes import Crop, box_to_patch_mask
from odis.views import RATIO, ViewMaker, object_aware_crop, random_resized_crop, render

RED = np.array([255, 0, 0], np.uint8)


def synthetic(h: int, w: int, box, seed: int) -> np.ndarray:
    """Noise in green/blue (red = 0) with the box painted solid red: red > 0 only where the box landed."""
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[..., 0] = 0
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = RED
    return img


def expand(box, m):
    return np.asarray(box, float) + np.array([-m, -m, m, m])


def upscale(crop: Crop) -> float:
    return max(crop.out_w / crop.width, crop.out_h / crop.height)


def check_view(view: np.ndarray, crop: Crop, vbox: np.ndarray, patch: int):
    """Where the red landed agrees with the carried box, up to the resampling blur at its edges."""
    red = view[0] >= 128  # the pixel is mostly box
    size = view.shape[1]
    # bilinear enlarging smears an edge over ~half a source pixel; area shrinking over one output pixel
    m = 0.5 * upscale(crop) + 1.0
    ys, xs = np.nonzero(red)
    if len(xs):
        lo, hi = expand(vbox, m)[:2], expand(vbox, m)[2:]
        assert xs.min() >= lo[0] and xs.max() + 1 <= hi[0], (xs.min(), xs.max(), vbox, crop)
        assert ys.min() >= lo[1] and ys.max() + 1 <= hi[1], (ys.min(), ys.max(), vbox, crop)
    # patch level: red patches lie inside the loose mask; the tight (shrunk-box) mask is all red
    gh = size // patch
    red_patch = red[: gh * patch, : gh * patch].reshape(gh, patch, gh, patch).any(axis=(1, 3))
    loose = box_to_patch_mask(expand(vbox, m), size, size, patch)
    tight = box_to_patch_mask(expand(vbox, -m), size, size, patch)
    assert not (red_patch & ~loose).any(), "box colour landed outside the carried box"
    assert not (tight & ~red_patch).any(), "carried box covers patches without the box colour"


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(40, 300), w=st.integers(40, 300),
    fx=st.tuples(st.floats(0, 1), st.floats(0, 1)), fy=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 2**31 - 1), size_patch=st.sampled_from([(64, 8), (96, 16), (224, 16)]),
)
def test_box_follows_crop_resize_flip(h, w, fx, fy, seed, size_patch):
    size, patch = size_patch
    x0, x1 = sorted(int(round(f * w)) for f in fx)
    y0, y1 = sorted(int(round(f * h)) for f in fy)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    x1, y1 = min(x1, w), min(y1, h)
    x0, y0 = min(x0, x1 - 1), min(y0, y1 - 1)
    box = (x0, y0, x1, y1)
    img = synthetic(h, w, box, seed)
    vm = ViewMaker(global_size=size, local_size=32, n_local=1, patch_size=patch, method="odis")
    out = vm(img, np.array([box], float), np.random.default_rng(seed))
    for v in range(2):
        crop = out["crops"][v]
        vbox = crop.apply(np.array(box, float))  # float64; the batch's obj_box is its float32 copy
        np.testing.assert_allclose(out["obj_box"][v], vbox, atol=1e-4)
        check_view(out["global"][v], crop, vbox, patch)
        if out["obj_valid"][v]:
            assert (out["obj_mask"][v] == box_to_patch_mask(vbox, size, size, patch)).all()
            assert out["obj_mask"][v].any()
        else:
            assert not out["obj_mask"][v].any()


def test_flip_mirrors_pixels_and_box():
    img = synthetic(100, 200, (10, 20, 60, 80), 0)
    plain = Crop(0, 0, 100, 200, 100, 200, flip=False)
    flipped = Crop(0, 0, 100, 200, 100, 200, flip=True)
    a, b = render(img, plain), render(img, flipped)
    assert (a[:, :, ::-1] == b).all()
    np.testing.assert_allclose(flipped.apply(np.array([10, 20, 60, 80.0])), [140, 20, 190, 80])
    assert (b[0, 20:80, 140:190] == 255).all() and (b[0, :, :140] == 0).all()


def test_random_resized_crop_matches_torchvision_ranges():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        c = random_resized_crop(375, 500, (0.25, 1.0), RATIO, 224, rng)
        assert 0 <= c.top and c.top + c.height <= 375 and 0 <= c.left and c.left + c.width <= 500
        areas.append(c.height * c.width / (375 * 500))
        ratios.append(c.width / c.height)
    assert 0.2 < min(areas) < 0.3 and max(areas) <= 1.0
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # flips are fair
    flips = [random_resized_crop(50, 50, (0.5, 1), RATIO, 32, rng).flip for _ in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_methods_and_shapes():
    img = synthetic(120, 160, (10, 10, 50, 60), 1)
    for method in ("odis", "ibot", "dino"):
        vm = ViewMaker(global_size=64, local_size=32, n_local=3, patch_size=8, method=method)
        out = vm(img, np.zeros((0, 4)), np.random.default_rng(0))
        assert out["global"].shape == (2, 3, 64, 64) and out["global"].dtype == np.uint8
        assert out["local"].shape == (3, 3, 32, 32) and out["local"].dtype == np.uint8
        assert out["obj_mask"].shape == (2, 8, 8) and out["mim_mask"].shape == (2, 8, 8)
        if method == "dino":
            assert not out["mim_mask"].any()
        if method != "odis":
            assert out["obj_mask"].all() and out["obj_valid"].all()
    # odis without boxes: the whole image is the object, never a fallback, OBJ sees the whole view
    vm = ViewMaker(global_size=64, local_size=32, n_local=0, patch_size=8, method="odis")
    rng = np.random.default_rng(1)
    for _ in range(50):
        out = vm(img, np.zeros((0, 4)), rng)
        assert out["fallbacks"] == 0 and out["obj_valid"].all() and out["obj_mask"].all()
        assert out["local"].shape == (0, 3, 32, 32)


def test_local_object_aware_locals_show_the_object():
    # a white object on black: with local_object_aware (nearly) every local crop of odis shows it (pixel check); ordinary
    # locals often miss a small object; ibot ignores the option (it samples no box)
    img = np.zeros((96, 96, 3), np.uint8)
    box = np.array([[60, 8, 84, 32]], float)
    img[8:32, 60:84] = 255
    def locals_with_object(method, aware):
        vm = ViewMaker(global_size=32, local_size=16, n_local=8, global_scale=(0.3, 1.0), local_scale=(0.05, 0.2),
                       patch_size=8, method=method, local_object_aware=aware)
        rng = np.random.default_rng(0)
        seen = [(vm(img, box, rng)["local"] > 127).any(axis=(1, 2, 3)) for _ in range(20)]
        return np.concatenate(seen).mean()
    assert locals_with_object("odis", True) > 0.9  # the rest: 20 draws all missed (the fallback)
    assert locals_with_object("odis", False) < 0.6
    assert locals_with_object("ibot", True) < 0.6


def test_fallback_gives_invalid_view():
    # a 1-pixel box in a corner and crops forced small: found is rare; the fallback is counted and its mask empty
    box = np.array([0, 0, 1, 1], float)
    rng = np.random.default_rng(0)
    crop, found = object_aware_crop(400, 400, box, (0.01, 0.02), RATIO, 64, 3, 0.5, rng)
    assert not found and isinstance(crop, Crop)
    vm = ViewMaker(global_size=64, local_size=32, n_local=0, patch_size=8, global_scale=(0.01, 0.02), max_crop_tries=3)
    out = vm(np.zeros((400, 400, 3), np.uint8), box[None], rng)
    assert out["fallbacks"] == 2 and not out["obj_valid"].any() and not out["obj_mask"].any()


def test_object_aware_crop_on_real_coco_boxes(coco_tiny):
    """Each RandomResizedCrop redrawn up to 20 times contains the sampled COCO box in nearly all cases."""
    from pycocotools.coco import COCO

    ann = coco_tiny / "annotations" / "instances_val2017.json"
    if not ann.is_file() or not json.loads(ann.read_text()).get("annotations"):
        ann = coco_tiny / "annotations" / "instances_train2017.json"
    coco = COCO(str(ann))
    rng = np.random.default_rng(0)
    draws = fallbacks = first_try = 0
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0], float).reshape(-1, 4)
        if not len(boxes):
            continue
        for _ in range(5):
            box = boxes[rng.integers(len(boxes))]
            crop, found = object_aware_crop(info["height"], info["width"], box, (0.25, 1.0), RATIO, 224, 20, 0.5,
                                            rng)
            draws += 1
            fallbacks += not found
            if found:
                assert crop.visible_fraction(box) >= 0.5 or crop.visible_fraction(box) * (
                    (box[2] - box[0]) * (box[3] - box[1])) >= 0.5 * crop.height * crop.width
            first_try += random_crop_contains(info, box, rng)
    assert draws >= 300
    rate = fallbacks / draws
    print(f"COCO object-aware crops: {draws} draws, {fallbacks} fallbacks ({rate:.1%}); "
          f"a single random crop contains the box in {first_try / draws:.1%}")
    assert rate < 0.05
    assert first_try / draws < 0.95  # the redraw matters: plain random crops miss some boxes


def random_crop_contains(info, box, rng) -> bool:
    from odis.views import contains_object

    c = random_resized_crop(info["height"], info["width"], (0.25, 1.0), RATIO, 224, rng)
    return contains_object(c, box, 0.5)


def test_render_is_exact_on_integer_geometry():
    """Identity crops copy pixels, flips mirror them, a 2x shrink averages 2x2 blocks (half-pixel convention)."""
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = render(img, Crop(5, 7, 30, 40, 30, 40))
    assert (out.transpose(1, 2, 0) == img[5:35, 7:47]).all()
    out = render(img, Crop(5, 7, 30, 40, 30, 40, flip=True))
    assert (out.transpose(1, 2, 0) == img[5:35, 7:47][:, ::-1]).all()
    out = render(img, Crop(4, 6, 40, 60, 20, 30)).transpose(1, 2, 0).astype(float)
    blocks = img[4:44, 6:66].astype(float).reshape(20, 2, 30, 2, 3).mean(axis=(1, 3))
    assert np.abs(out - blocks).max() <= 1.0
    # 2x enlargement equals cv2.resize's bilinear (same pixel-centre convention) away from the crop's border,
    # where resize clamps to the cut-out and render reads the real neighbours
    out = render(img, Crop(10, 10, 20, 20, 40, 40)).transpose(1, 2, 0).astype(float)
    ref = cv2.resize(img[10:30, 10:30], (40, 40), interpolation=cv2.INTER_LINEAR).astype(float)
    assert np.abs(out[1:-1, 1:-1] - ref[1:-1, 1:-1]).max() <= 1.0


@pytest.mark.parametrize("flip", [False, True])
def test_resize_and_warp_paths_agree(flip):
    """Integer crops take cv2.resize, fractional ones warpAffine: the same geometry gives the same pixels."""
    img = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for (t, l, ch, cw, out) in [(10, 20, 70, 90, 64), (0, 0, 120, 160, 96), (33, 41, 50, 37, 32)]:
        a = render(img, Crop(t, l, ch, cw, out, out, flip)).astype(int)
        b = render(img, Crop(t + 1e-7, l, ch, cw, out, out, flip)).astype(int)  # not integral: the warp path
        assert np.abs(a - b)[:, 1:-1, 1:-1].max() <= 1


@settings(max_examples=300, deadline=None)
@given(box=st.tuples(*[st.floats(-20, 220) for _ in range(4)]), crop=st.tuples(
    st.integers(0, 100), st.integers(0, 100), st.integers(1, 100), st.integers(1, 100)), mv=st.floats(0.05, 1.0))
def test_contains_object_matches_visible_fraction(box, crop, mv):
    from odis.boxes import box_area
    from odis.views import contains_object

    b = np.array(box, float)
    c = Crop(crop[0], crop[1], crop[2], crop[3], 32, 32)
    area = float(box_area(b))
    inside = c.visible_fraction(b) * area
    expect = area > 1e-6 and (inside >= mv * area * (1 - 1e-12) or inside >= mv * c.height * c.width * (1 - 1e-12))
    got = contains_object(c, b, mv)
    if got != expect:  # only ties at float rounding may differ
        assert abs(inside - mv * area) < 1e-6 * max(area, 1) or abs(inside - mv * c.height * c.width) < 1e-6 * max(area, 1)


def test_random_resized_crop_positions_are_uniform():
    """Every top-left offset of a fixed-size crop is reachable, and evenly so."""
    rng = np.random.default_rng(3)
    tops = [random_resized_crop(12, 12, (0.25, 0.25), (1.0, 1.0), 8, rng).top for _ in range(7000)]
    counts = np.bincount(tops, minlength=7)
    assert len(counts) == 7 and counts.min() > 850 and counts.max() < 1150  # 6x6 crops: tops 0..6


def test_view_maker_from_the_config_carries_every_setting():
    """Each data.* view setting of the trainer's config reaches the ViewMaker (none silently left at default)."""
    from odis.trainer.recipes import load_config

    cfg = load_config(overrides=["data.global_size=96", "data.local_size=48", "data.n_local=3",
                                 "data.global_scale=[0.3,0.9]", "data.local_scale=[0.1,0.2]",
                                 "data.box_sampling=area", "data.max_crop_tries=7", "data.min_visible=0.6",
                                 "data.mask_prob=0.3", "data.mask_ratio=[0.2,0.4]", "data.local_object_aware=true"])
    vm = ViewMaker(cfg.data, 8, "odis")  # a DataConfig is a ViewSettings
    got = (vm.global_size, vm.local_size, vm.n_local, vm.global_scale, vm.local_scale, vm.box_sampling,
           vm.max_crop_tries, vm.min_visible, vm.mask_prob, vm.mask_ratio, vm.local_object_aware, vm.patch_size)
    assert got == (96, 48, 3, (0.3, 0.9), (0.1, 0.2), "area", 7, 0.6, 0.3, (0.2, 0.4), True, 8)
