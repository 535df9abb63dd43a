"""`odis synth`: exact boxes (pixel checks), labels, COCO JSON through pycocotools, determinism, MNIST reading."""
from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from odis.cli import app
from odis.boxes import box_area, box_iou
from odis.synth import (DIGITS, SHAPES, MnistSource, PhotoBackgrounds, ShapeSource, SynthConfig, load_mnist,
                        read_idx, render_scene, scene_rng, tight_box)

runner = CliRunner()


def synth(*args: str) -> None:
    res = runner.invoke(app, ["synth", "--no-progress", *args])
    assert res.exit_code == 0, res.output
    return res


def read_rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def exclusive(masks: np.ndarray) -> np.ndarray:
    """Per object: its mask pixels that no other object covers."""
    count = masks.sum(0)
    return masks & (count == 1)[None]


# ---- the scene generator as a library: properties over random settings -------------------------------------

configs = st.builds(
    SynthConfig,
    size=st.sampled_from([32, 64, 96]),
    objects=st.tuples(st.integers(1, 3), st.integers(0, 3)).map(lambda t: (t[0], t[0] + t[1])),
    scale=st.tuples(st.floats(0.2, 0.6), st.floats(0, 0.4)).map(lambda t: (t[0], min(1.0, t[0] + t[1]))),
    max_iou=st.sampled_from([0.0, 0.1, 0.3, 1.0]),
    clutter=st.sampled_from([0.0, 0.3, 1.0]),
    distractors=st.sampled_from(["other", "any"]),
    palette=st.sampled_from(["colour", "gray"]),
    seed=st.integers(0, 2**31),
)


@settings(max_examples=60, deadline=None)
@given(cfg=configs, target=st.integers(0, 9), index=st.integers(0, 10**6))
def test_scene_invariants(cfg, target, index):
    scene = render_scene(cfg, ShapeSource(), target, scene_rng(cfg.seed, "train", index))
    n = len(scene.labels)
    assert scene.image.shape == (cfg.size, cfg.size, 3) and scene.image.dtype == np.uint8
    assert cfg.objects[0] <= n + scene.dropped <= cfg.objects[1] and n >= 1
    assert scene.label == target
    if cfg.distractors == "other":
        assert (scene.labels[1:] != target).all()
    # boxes: the tight box of each object's mask, inside the image, integer pixels
    for box, mask in zip(scene.boxes, scene.masks):
        np.testing.assert_array_equal(box, tight_box(mask))
    assert (scene.boxes >= 0).all() and (scene.boxes <= cfg.size).all()
    # overlap rule and the target is strictly the largest box
    if n > 1:
        iou = box_iou(scene.boxes, scene.boxes)[~np.eye(n, dtype=bool)]
        assert iou.max() <= cfg.max_iou + 1e-9
        assert (box_area(scene.boxes[1:]) < box_area(scene.boxes[0])).all()
    # pixels: the image differs from its background only on objects, and every uncovered object pixel shows
    differs = (scene.image != scene.background).any(-1)
    assert not (differs & ~scene.masks.any(0)).any()
    if cfg.clutter == 0:  # plain background: contrast is guaranteed, so every exclusive object pixel is visible
        assert not (exclusive(scene.masks) & ~differs[None]).any()
    # the target is drawn on top: none of its pixels is hidden (where opaque, it covers what lies beneath)
    assert scene.masks[0].sum() > 0
    if cfg.palette == "gray":  # every pixel gray; objects light (>= 180 where fully opaque) on a dark base
        assert (scene.image == scene.image[..., :1]).all()
        solid = scene.masks[0] & (scene.image[..., 0] >= 180)
        assert solid.any()


@settings(max_examples=30, deadline=None)
@given(size=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**31), target=st.integers(0, 9),
       palette=st.sampled_from(["colour", "gray"]))
def test_single_object_box_is_the_tight_box_of_changed_pixels(size, seed, target, palette):
    """Pixel check without the generator's masks: plain background, one object -> box = bbox of changed pixels."""
    cfg = SynthConfig(size=size, objects=(1, 1), clutter=0.0, palette=palette, seed=seed)
    scene = render_scene(cfg, ShapeSource(), target, scene_rng(seed, "val", 0))
    bg = scene.image[0, 0] if not scene.masks[0][0, 0] else scene.image[-1, -1]
    changed = (scene.image != bg).any(-1)
    np.testing.assert_array_equal(tight_box(changed), scene.boxes[0])


def test_same_seed_same_scene_other_seed_other_scene():
    cfg = SynthConfig(size=64, objects=(2, 3))
    a = render_scene(cfg, ShapeSource(), 3, scene_rng(7, "train", 5))
    b = render_scene(cfg, ShapeSource(), 3, scene_rng(7, "train", 5))
    c = render_scene(cfg, ShapeSource(), 3, scene_rng(8, "train", 5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.image, c.image)


def test_bad_settings_are_refused():
    for bad in [dict(objects=(0, 2)), dict(objects=(3, 2)), dict(scale=(0.5, 0.2)), dict(scale=(0.1, 1.5)),
                dict(max_iou=-0.1), dict(clutter=2.0), dict(distractors="same"), dict(size=64, scale=(0.01, 0.1)), dict(palette="sepia")]:
        with pytest.raises(ValueError):
            SynthConfig(**bad).validate()


# ---- the CLI output: files, COCO JSON, pixel checks from the files alone --------------------------------------

@pytest.fixture(scope="module")
def shapes_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shapes"
    synth("--out", str(out), "--train", "30", "--val", "20", "--size", "64", "--objects", "2-3",
          "--clutter", "0", "--seed", "3")
    return out


def test_layout_and_coco_json_loads_in_pycocotools(shapes_out):
    from pycocotools.coco import COCO

    summary = json.loads((shapes_out / "synth.json").read_text())
    assert summary["settings"]["classes"] == list(SHAPES)
    seen_ids = set()
    for split, count in (("train", 30), ("val", 20)):
        coco = COCO(str(shapes_out / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count == summary["splits"][split]["images"]
        assert sorted(coco.getCatIds()) == list(range(len(SHAPES)))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
        assert len(coco.getAnnIds()) == summary["splits"][split]["objects"]
        for img in coco.loadImgs(coco.getImgIds()):
            assert isinstance(img["id"], int) and img["id"] not in seen_ids
            seen_ids.add(img["id"])
            assert re.fullmatch(rf"[a-z]+/{img['id']:012d}\.png", img["file_name"])
            assert (shapes_out / split / img["file_name"]).is_file()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 2 <= len(anns) <= 3 and all(a["iscrowd"] == 0 for a in anns)
            target = [a for a in anns if a["target"] == 1]
            assert len(target) == 1 and target[0] is anns[0]
            # the image label is the target's class and the folder name
            assert img["label"] == target[0]["category_id"]
            assert img["file_name"].split("/")[0] == SHAPES[img["label"]]
            assert all(a["category_id"] != img["label"] for a in anns[1:])
    # folder labels (sorted class folders, as `odis shard --labels folder` indexes them) equal category ids
    assert sorted(p.name for p in (shapes_out / "train").iterdir()) == list(SHAPES)


def test_boxes_tightly_enclose_the_drawn_pixels_in_the_files(shapes_out):
    """From the PNG and the JSON only: masks (RLE) give the boxes; the plain background shows objects exactly."""
    from pycocotools.coco import COCO

    coco = COCO(str(shapes_out / "annotations" / "instances_val.json"))
    for img in coco.loadImgs(coco.getImgIds()):
        pixels = read_rgb(shapes_out / "val" / img["file_name"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
        for a, m in zip(anns, masks):
            x0, y0, x1, y1 = tight_box(m)
            assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert a["area"] == m.sum()
        # plain background: its colour is the most frequent one (objects cover well under half the image)
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        bg = colours[counts.argmax()]
        changed = (pixels != bg).any(-1)
        assert not (changed & ~masks.any(0)).any(), "pixels changed outside every object"
        assert not (exclusive(masks) & ~changed[None]).any(), "an uncovered object pixel shows background"
        # the target is on top and never occluded: the tight box of changed pixels inside its box is its box
        x, y, w, h = (int(v) for v in anns[0]["bbox"])
        inside = np.zeros_like(changed)
        inside[y:y + h, x:x + w] = masks[0][y:y + h, x:x + w]
        np.testing.assert_array_equal(tight_box(changed & inside), [x, y, x + w, y + h])


def test_target_is_drawn_on_top(shapes_out):
    """Where the target is opaque (its mask eroded twice), it shows one colour, even where distractors lie beneath."""
    from pycocotools.coco import COCO

    coco = COCO(str(shapes_out / "annotations" / "instances_train.json"))
    overlapped = 0
    for img in coco.loadImgs(coco.getImgIds()):
        pixels = read_rgb(shapes_out / "train" / img["file_name"])
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))]
        core = cv2.erode(masks[0], np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        overlapped += any((core & m.astype(bool)).any() for m in masks[1:])
        assert len(np.unique(pixels[core], axis=0)) <= 1
    assert overlapped >= 2, "too few scenes where a distractor lies under the target for this test to mean much"


def test_files_equal_the_library_scene(shapes_out):
    """The written PNG is exactly the scene the library renders for (seed, split, index)."""
    cfg = SynthConfig(size=64, objects=(2, 3), clutter=0.0, seed=3)
    data = json.loads((shapes_out / "annotations" / "instances_val.json").read_text())
    img = data["images"][4]
    scene = render_scene(cfg, ShapeSource(), 4 % len(SHAPES), scene_rng(3, "val", 4))
    np.testing.assert_array_equal(read_rgb(shapes_out / "val" / img["file_name"]), scene.image)
    boxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == img["id"]]
    assert boxes == [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in scene.boxes.tolist()]


def test_determinism_of_the_whole_output(tmp_path, shapes_out):
    args = ["--train", "30", "--val", "20", "--size", "64", "--objects", "2-3", "--clutter", "0"]
    synth("--out", str(tmp_path / "again"), *args, "--seed", "3")
    synth("--out", str(tmp_path / "other"), *args, "--seed", "4")
    files = sorted(p.relative_to(shapes_out) for p in shapes_out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for f in files:
        assert (shapes_out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    assert (shapes_out / "annotations/instances_val.json").read_bytes() != \
        (tmp_path / "other/annotations/instances_val.json").read_bytes()


def test_jpg_format_overwrite_and_errors(tmp_path):
    out = tmp_path / "j"
    synth("--out", str(out), "--train", "4", "--val", "2", "--format", "jpg", "--objects", "3", "--size", "96")
    names = [i["file_name"] for i in json.loads((out / "annotations/instances_train.json").read_text())["images"]]
    assert all(n.endswith(".jpg") for n in names) and read_rgb(out / "train" / names[0]).shape == (96, 96, 3)
    keep = out / "mine.txt"
    keep.write_text("not synth's")
    res = runner.invoke(app, ["synth", "--out", str(out), "--train", "2", "--val", "0"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    synth("--out", str(out), "--train", "2", "--val", "0", "--overwrite")
    assert keep.read_text() == "not synth's"  # --overwrite removes only what synth writes
    assert len(json.loads((out / "annotations/instances_train.json").read_text())["images"]) == 2
    for bad, words in [(["--objects", "x"], "--objects"), (["--scale", "0.5-0.1"], "scale"),
                       (["--format", "gif"], "format"), (["--distractors", "no"], "distractors")]:
        res = runner.invoke(app, ["synth", "--out", str(tmp_path / "bad"), "--train", "1", *bad])
        assert res.exit_code == 2 and words in res.output, res.output


def test_negative_seed_and_unwritable_out_are_one_line(tmp_path, unwritable_outs):
    """--seed -1 gave numpy's "expected non-negative integer"; a file as the parent and /proc gave tracebacks."""
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--seed", "-1"])
    assert res.exit_code == 2 and "Invalid value for '--seed'" in res.output, res.output
    for out in unwritable_outs("s", folder=True):
        res = runner.invoke(app, ["synth", "--out", str(out), "--train", "1", "--val", "0"])
        assert res.exit_code == 2 and f"error: --out {out}: " in res.output, res.output


# ---- MNIST --------------------------------------------------------------------------------------------------

def test_real_mnist_reads_and_pools_are_disjoint(shared):
    images, labels = load_mnist(shared / "data" / "mnist")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train, val = MnistSource(images, labels, "train"), MnistSource(images, labels, "val")
    for c in range(10):
        assert (labels[train.by_class[c]] == c).all() and (labels[val.by_class[c]] == c).all()
        assert not set(train.by_class[c]) & set(val.by_class[c])
    assert sum(len(v) for v in val.by_class) == 2000


@pytest.fixture(scope="module")
def mnist_val(shared) -> MnistSource:
    return MnistSource(*load_mnist(shared / "data" / "mnist"), "val")


@settings(max_examples=25, deadline=None)
@given(cfg=configs, target=st.integers(0, 9), index=st.integers(0, 10**6))
def test_mnist_scene_invariants(mnist_val, cfg, target, index):
    scene = render_scene(cfg, mnist_val, target, scene_rng(cfg.seed, "val", index))
    assert scene.label == target and (cfg.distractors == "any" or (scene.labels[1:] != target).all())
    for box, mask in zip(scene.boxes, scene.masks):
        np.testing.assert_array_equal(box, tight_box(mask))
    differs = (scene.image != scene.background).any(-1)
    assert not (differs & ~scene.masks.any(0)).any()
    if cfg.clutter == 0:
        assert not (exclusive(scene.masks) & ~differs[None]).any()
    if len(scene.labels) > 1:
        assert box_iou(scene.boxes, scene.boxes)[~np.eye(len(scene.labels), dtype=bool)].max() <= cfg.max_iou + 1e-9


def test_mnist_scenes_via_cli(shared, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "mnist"
    res = synth("--out", str(out), "--mnist", str(shared / "data" / "mnist"), "--train", "20", "--val", "10",
                "--objects", "2-3", "--size", "96", "--clutter", "0")
    assert "digits (10 classes)" in res.output
    coco = COCO(str(out / "annotations" / "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(DIGITS)
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert img["file_name"].startswith(f"{img['label']}/") and anns[0]["category_id"] == img["label"]
        pixels = read_rgb(out / "train" / img["file_name"])
        masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        changed = (pixels != colours[counts.argmax()]).any(-1)
        assert not (changed & ~masks.any(0)).any()
        assert not (exclusive(masks) & ~changed[None]).any(), "a digit's ink pixel shows background"
        for a, m in zip(anns, masks):
            x0, y0, x1, y1 = tight_box(m)
            assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]


def _idx_bytes(magic: int, dims: list[int], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


@pytest.mark.parametrize("name,content,words", [
    ("wrong magic", gzip.compress(_idx_bytes(0x12340803, [1, 2, 2], bytes(4))), "not an IDX file"),
    ("float type", gzip.compress(_idx_bytes(0x00000D03, [1, 2, 2], bytes(16))), "type 0x0d"),
    ("truncated", gzip.compress(_idx_bytes(0x00000803, [5, 28, 28], bytes(100))), "header says shape (5, 28, 28)"),
    ("not gzip", b"hello, this is text", "cannot read as gzip"),
])
def test_wrong_mnist_file_gives_a_clear_error(tmp_path, name, content, words):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(content)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(0x801, [1], bytes(1))))
    with pytest.raises(ValueError, match=re.escape(words)):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "o"), "--mnist", str(tmp_path), "--train", "1"])
    assert res.exit_code == 2 and "t10k-images-idx3-ubyte.gz" in res.output and words in res.output, res.output


def test_mnist_count_mismatch_and_plain_idx(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(0x803, [2, 28, 28], bytes(2 * 784)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(0x801, [3], bytes(3)))
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte").shape == (2, 28, 28)  # uncompressed files work too
    with pytest.raises(ValueError, match="has 2 images but .* has 3 labels"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="no MNIST IDX files"):
        load_mnist(tmp_path / "..")


# ---- photo backgrounds ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tiny_imagenet, tmp_path_factory) -> Path:
    """Two Tiny-ImageNet classes' photos (real JPEGs, with the class's boxes .txt beside them)."""
    root = tmp_path_factory.mktemp("photos")
    for wnid in sorted(p.name for p in (tiny_imagenet / "train").iterdir() if p.is_dir())[:2]:
        shutil.copytree(tiny_imagenet / "train" / wnid, root / wnid)
    return root


def test_photo_pools_are_disjoint_and_cover_the_folder(photos):
    from odis.imageio import list_images

    train, val = PhotoBackgrounds(photos, "train"), PhotoBackgrounds(photos, "val")
    everything = list_images(photos)[0]
    assert len(everything) == 100 and all(f.endswith(".JPEG") for f in everything)  # not the boxes .txt
    assert not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == everything
    assert len(val.files) == round(len(everything) * 0.2)
    assert PhotoBackgrounds(photos, "val", seed=1).files != val.files


@settings(max_examples=25, deadline=None)
@given(cfg=configs, target=st.integers(0, 9), index=st.integers(0, 10**6))
def test_photo_scene_invariants(photos, cfg, target, index):
    bgs = PhotoBackgrounds(photos, "train", cfg.seed)
    scene = render_scene(cfg, ShapeSource(), target, scene_rng(cfg.seed, "train", index), bgs)
    for box, mask in zip(scene.boxes, scene.masks):
        np.testing.assert_array_equal(box, tight_box(mask))
    differs = (scene.image != scene.background).any(-1)
    assert not (differs & ~scene.masks.any(0)).any()
    assert scene.background.std() > 2, "a photo crop is not a flat colour"
    if cfg.palette == "gray":  # the photo's luminance, dimmed so that light objects keep their contrast
        assert (scene.image == scene.image[..., :1]).all()
        if cfg.clutter == 0:
            assert scene.background.max() <= 110


def test_each_split_draws_only_its_own_photos(tmp_path):
    """Five flat-colour photos: at clutter 0 a scene's background is exactly one photo's colour, one of its split's."""
    colours = {f"p{i}.png": (40 * i + 20, 200 - 30 * i, 90) for i in range(5)}
    for name, c in colours.items():
        cv2.imwrite(str(tmp_path / name), np.full((30, 50, 3), c[::-1], np.uint8))
    cfg = SynthConfig(size=32, objects=(1, 2), clutter=0.0)
    for split in ("train", "val"):
        bgs = PhotoBackgrounds(tmp_path, split)
        allowed = {colours[f] for f in bgs.files}
        seen = set()
        for i in range(12):
            bg = render_scene(cfg, ShapeSource(), i % 10, scene_rng(0, split, i), bgs).background
            assert (bg == bg[0, 0]).all()
            seen.add(tuple(int(v) for v in bg[0, 0]))
        assert seen <= allowed and (split == "val" or len(seen) > 1)


def test_photo_backgrounds_via_cli_and_their_errors(photos, tmp_path):
    out = tmp_path / "scenes"
    synth("--out", str(out), "--train", "6", "--val", "4", "--size", "64", "--objects", "2-3",
          "--backgrounds", str(photos), "--seed", "2")
    assert json.loads((out / "synth.json").read_text())["settings"]["backgrounds"] == str(photos)
    again = tmp_path / "again"
    synth("--out", str(again), "--train", "6", "--val", "4", "--size", "64", "--objects", "2-3",
          "--backgrounds", str(photos), "--seed", "2")
    for f in sorted((out / "val").rglob("*.png")):
        assert f.read_bytes() == (again / "val" / f.relative_to(out / "val")).read_bytes()
    # a missing folder is refused before an earlier output is touched
    res = runner.invoke(app, ["synth", "--no-progress", "--out", str(out), "--overwrite", "--train", "2",
                              "--val", "1", "--backgrounds", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "backgrounds folder not found" in res.output and (out / "synth.json").exists()
    # a photo that cannot be decoded is named; a folder with one image cannot feed two splits
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.jpg").write_bytes(b"not a jpeg")
    res = runner.invoke(app, ["synth", "--no-progress", "--out", str(tmp_path / "o1"), "--train", "3", "--val", "0",
                              "--backgrounds", str(bad)])
    assert res.exit_code != 0 and re.search(r"bad/[ab]\.jpg: (empty file|not an image)", res.output), res.output
    (bad / "b.jpg").unlink()
    res = runner.invoke(app, ["synth", "--no-progress", "--out", str(out), "--overwrite", "--train", "1", "--val",
                              "1", "--backgrounds", str(bad)])
    assert res.exit_code != 0 and "at least 2 images" in res.output, res.output
    assert (out / "synth.json").exists(), "refused before the earlier output was removed"
