"""Box-conditioned inference on real Tiny-ImageNet shards (GT boxes), and `odis eval knn|linear` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from odis.boxes import box_to_patch_mask
from odis.eval.features import (IMAGENET_MEAN, IMAGENET_STD, ViewConfig, box_view, eval_crop, eval_view,
                                extract_features, select_box, shard_loader)
from odis.samples import BoxTable

SIZE, PATCH = 64, 8  # Tiny-ImageNet's 64-px images; Resize 73 / CenterCrop 64, an 8 x 8 patch grid


def _tiny_boxes(root: Path, wnid: str) -> dict[str, list[float]]:
    """Tiny-ImageNet's inclusive pixel boxes -> [x0, y0, x1, y1) in continuous pixels."""
    out = {}
    for line in (root / "train" / wnid / f"{wnid}_boxes.txt").read_text().splitlines():
        name, *v = line.split()
        x0, y0, x1, y1 = map(float, v)
        out[name] = [x0, y0, x1 + 1, y1 + 1]
    return out


def _write_shards(folder: Path, samples: list[tuple[str, bytes, dict]], maxcount: int) -> None:
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / f"{folder.name}-%06d.tar"), maxcount=maxcount, verbose=0) as w:
        for key, data, meta in samples:
            w.write({"__key__": key, "jpg": data, "json": json.dumps(meta).encode()})


@pytest.fixture(scope="module")
def tiny_shards(tiny_imagenet, tmp_path_factory):
    """3 classes: 6 training images each (two shards) and 3 held-out images each, with their GT boxes."""
    out = tmp_path_factory.mktemp("tiny-shards")
    wnids = sorted(p.name for p in (tiny_imagenet / "train").iterdir() if p.is_dir())[:3]
    train, val = [], []
    for label, wnid in enumerate(wnids):
        boxes = _tiny_boxes(tiny_imagenet, wnid)
        names = sorted(boxes, key=lambda n: int(n.split("_")[1].split(".")[0]))[:9]
        for i, name in enumerate(names):
            key = name.split(".")[0]
            meta = {"image_id": key, "label": label, "width": 64, "height": 64, "boxes": [boxes[name]],
                    "scores": [1.0]}
            data = (tiny_imagenet / "train" / wnid / "images" / name).read_bytes()
            (train if i < 6 else val).append((key, data, meta))
    _write_shards(out / "train", train, maxcount=10)
    _write_shards(out / "val", val, maxcount=100)
    (out / "ids.txt").write_text("\n".join(k for k, _, _ in train + val))
    return out


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from odis.model import OdisViT, export_backbone

    torch.manual_seed(0)
    model = OdisViT("vit_tiny_patch16_224", img_size=SIZE, patch_size=PATCH)
    path = tmp_path_factory.mktemp("backbone") / "backbone.safetensors"
    export_backbone(model, path)
    return path


# ---- the transform carries the box ----------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(w=st.integers(40, 300), h=st.integers(40, 300), data=st.data())
def test_box_follows_resize_and_center_crop(w, h, data):
    x0 = data.draw(st.integers(0, w - 12))
    y0 = data.draw(st.integers(0, h - 12))
    x1 = data.draw(st.integers(x0 + 12, w))
    y1 = data.draw(st.integers(y0 + 12, h))
    arr = np.zeros((h, w, 3), np.uint8)
    arr[y0:y1, x0:x1] = 255
    view = np.asarray(eval_view(Image.fromarray(arr), SIZE)).mean(-1) / 255.0
    vb = eval_crop(w, h, SIZE).apply(np.array([x0, y0, x1, y1], float))
    if vb[2] - vb[0] < 3 or vb[3] - vb[1] < 3:
        return  # the crop cut the box (nearly) away: nothing to compare
    rows, cols = np.nonzero(view > 0.5)
    # the white pixels span the carried box, up to resampling blur (about a pixel)
    assert abs(cols.min() - vb[0]) <= 1.5 and abs(cols.max() + 1 - vb[2]) <= 1.5
    assert abs(rows.min() - vb[1]) <= 1.5 and abs(rows.max() + 1 - vb[3]) <= 1.5


def test_box_view_modes_and_fallbacks():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 80, 3), np.uint8))
    box = np.array([10.0, 30.0, 50.0, 70.0])
    none = box_view(img, None, "none", SIZE, patch=PATCH)
    assert none.obj_mask is None and none.fallback is None
    # no box: every mode falls back to the whole image, counted
    for mode in ("mask", "crop", "blackout"):
        v = box_view(img, None, mode, SIZE, patch=PATCH)
        assert v.fallback == "no_box" and torch.equal(v.image, none.image)
    m = box_view(img, box, "mask", SIZE, patch=PATCH)
    assert torch.equal(m.image, none.image)
    vb = eval_crop(80, 100, SIZE).apply(box)
    assert torch.equal(m.obj_mask, torch.from_numpy(box_to_patch_mask(vb, SIZE, SIZE, PATCH)))
    # blackout: outside the box the pixels are black before normalisation, i.e. -mean/std after
    b = box_view(img, box, "blackout", SIZE, patch=PATCH)
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    keep = torch.from_numpy(box_to_patch_mask(vb, SIZE, SIZE, 1))
    assert torch.allclose(b.image[:, ~keep], black[:, None].expand(3, int((~keep).sum())))
    assert torch.allclose(b.image[:, keep], none.image[:, keep])
    c = box_view(img, box, "crop", SIZE, patch=PATCH)
    ref = img.resize((SIZE, SIZE), Image.BICUBIC, box=(10, 30, 50, 70))
    assert torch.allclose(c.image, box_view(ref, None, "none", SIZE, resize=SIZE, patch=PATCH).image, atol=1e-6)
    # a box in the corner that the centre crop removes: whole image, counted
    gone = box_view(img, np.array([0.0, 0.0, 5.0, 5.0]), "mask", SIZE, patch=PATCH)
    assert gone.fallback == "box_cropped_away" and gone.obj_mask is None


def test_select_box():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 30], [40, 40, 41, 41]], float)
    assert select_box(boxes, np.array([0.9, 0.1, 0.5]), "largest").tolist() == [5, 5, 30, 30]
    assert select_box(boxes, np.array([0.9, 0.1, 0.5]), "score").tolist() == [0, 0, 10, 10]
    assert select_box(boxes, None, "union").tolist() == [0, 0, 41, 41]
    assert select_box(np.zeros((0, 4)), None, "largest") is None
    # an empty box is skipped, and its score with it
    with_empty = np.array([[3, 3, 3, 9], [0, 0, 10, 10], [5, 5, 30, 30]], float)
    assert select_box(with_empty, np.array([1.0, 0.2, 0.1]), "score").tolist() == [0, 0, 10, 10]
    with pytest.raises(ValueError, match="box_select"):
        select_box(boxes, None, "biggest")


# ---- the four modes on real shards ------------------------------------------------------------------------------

def _features(backbone, spec, mode, manifest=None):
    from odis.model import load_backbone

    model = load_backbone(backbone)
    loader = shard_loader(str(spec), ViewConfig(mode, SIZE, None, PATCH), manifest, batch_size=8)
    return extract_features(model, loader, progress=False)


def test_four_box_modes_differ_and_full_box_mask_equals_none(tiny_shards, backbone):
    feats = {m: _features(backbone, tiny_shards / "train", m) for m in ("none", "mask", "crop", "blackout")}
    ids = feats["none"].image_ids
    assert len(ids) == 18 and all(f.image_ids == ids for f in feats.values())
    assert all(f.counts == {"no_box": 0, "not_in_manifest": 0, "box_cropped_away": 0, "errors": 0}
               for f in feats.values())
    # the GT boxes are not all full-image: at least one image's feature changes under every other mode
    for a in feats:
        for b in feats:
            if a < b:
                diff = (feats[a].feats - feats[b].feats).norm(dim=1)
                assert (diff > 1e-3).sum() >= 3, (a, b)
    # a full-image box: the masked OBJ row sees every patch, so `mask` is exactly the plain CLS
    full = BoxTable.from_images({iid: (64.0, 64.0, np.array([[0, 0, 64, 64]], float), np.array([1.0]))
                                 for iid in ids})
    masked_full = _features(backbone, tiny_shards / "train", "mask", manifest=full)
    assert torch.allclose(masked_full.feats, feats["none"].feats, atol=1e-5)


# ---- the CLI ------------------------------------------------------------------------------------------------------

def _odis(*args):
    from odis.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_knn_json_table_compare_and_manifest(tiny_shards, backbone, tmp_path):
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest

    base = ["eval", "knn", "--backbone", backbone, "--train", tiny_shards / "train", "--val", tiny_shards / "val",
            "--workers", "0", "--k", "1,5,20"]
    r = _odis(*base, "--out", tmp_path / "none.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "none.json").read_text())
    assert res["protocol"] == "knn" and res["n_train"] == 18 and res["n_val"] == 9 and res["size"] == SIZE
    assert [x["k_effective"] for x in res["results"]] == [1, 5, 18]
    assert all(0 <= x["top1"] <= x["top5"] <= 100 for x in res["results"])
    assert "k=20 (eff. 18) top-1" in r.output
    # boxes from a manifest (full-image boxes, stored at twice the size: scaled to the stored image)
    cols = empty_columns()
    for iid in (tiny_shards / "ids.txt").read_text().split():
        add_row(cols, iid, f"{iid}.JPEG", 128, 128, "tiny-imagenet-gt", box=(0, 0, 128, 128))
    man = write_manifest(table_from_columns(cols), tmp_path / "full.parquet",
                         make_metadata("tiny-imagenet-gt", None, "stem"))
    r = _odis(*base, "--boxes-mode", "mask", "--boxes", man, "--out", tmp_path / "mask.json",
              "--compare", tmp_path / "none.json")
    assert r.exit_code == 0, r.output
    mask = json.loads((tmp_path / "mask.json").read_text())
    assert [x["top1"] for x in mask["results"]] == [x["top1"] for x in res["results"]]
    assert "none.json" in r.output and "+0.00" in r.output and "[mask]" in r.output
    # wrong input: a clear message, exit 2
    r = _odis(*base, "--boxes-mode", "cutout")
    assert r.exit_code == 2 and "--boxes-mode must be one of" in r.output


def test_cli_knn_backbone_of_another_width_is_one_line(tiny_shards, backbone):
    r = _odis("eval", "knn", "--backbone", backbone, "--arch", "vit_small_patch16_224", "--train",
              tiny_shards / "train", "--val", tiny_shards / "val", "--workers", "0")
    assert r.exit_code == 2 and "does not fit vit_small_patch16_224: size mismatch for" in r.output, r.output
    assert "more tensors)" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_knn_manifest_ids_must_match_the_shards(tiny_shards, backbone, tmp_path):
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest

    base = ["eval", "knn", "--backbone", backbone, "--train", tiny_shards / "train", "--val", tiny_shards / "val",
            "--workers", "0", "--k", "5", "--boxes-mode", "mask", "--boxes"]
    ids = (tiny_shards / "ids.txt").read_text().split()

    def manifest(name, keys, scheme):
        cols = empty_columns()
        for iid in keys:
            add_row(cols, iid, f"{iid}.JPEG", 64, 64, "yolo", box=(8, 8, 40, 40))
        return write_manifest(table_from_columns(cols), tmp_path / name, make_metadata("yolo", None, scheme))

    # keyed by path, shards keyed by stem: nothing matches -> refused before any feature is extracted
    by_path = manifest("by-path.parquet", [f"train_{i}_JPEG-0123456789" for i in ids], "path")
    r = _odis(*base, by_path)
    assert r.exit_code == 2 and "none of the shards' image ids is in this manifest" in r.output, r.output
    assert "id scheme path" in r.output and "Traceback" not in r.output
    # half of the train images listed (and the val images): the rest is counted apart from images without a box
    some = manifest("some.parquet", ids[:9] + ids[18:], "stem")
    r = _odis(*base, some)
    assert r.exit_code == 0, r.output
    assert "train: whole image used for 9 (not in manifest)" in r.output


_KNN = ["eval", "knn", "--backbone", "b.pt", "--train", "t", "--val", "v"]
_LINEAR = ["eval", "linear", "--backbone", "b.pt", "--train", "t", "--val", "v"]
_DENSE = ["eval", "dense-nn", "--backbone", "b.pt", "--dataset", "coco", "--root", "r"]


@pytest.mark.parametrize("args", [
    [*_KNN, "--k", "0"], [*_KNN, "--k", "10,-1"], [*_KNN, "--k", ","], [*_KNN, "--temperature", "0"],
    [*_KNN, "--temperature", "-0.1"], [*_KNN, "--batch-size", "0"], [*_KNN, "--workers", "-1"], [*_KNN, "--size", "0"],
    [*_LINEAR, "--n-last-blocks", "0"], [*_LINEAR, "--lrs", "0.1,0"], [*_LINEAR, "--epochs", "0"],
    [*_LINEAR, "--shots", "0"], [*_LINEAR, "--fraction", "0"], [*_LINEAR, "--fraction", "1.5"],
    [*_LINEAR, "--seeds", "0"], [*_DENSE, "--k", "0"], [*_DENSE, "--beta", "0"], [*_DENSE, "--factors", "0"],
    [*_DENSE, "--max-train", "0"], [*_DENSE, "--max-val", "0"], [*_DENSE, "--batch-size", "0"],
    [*_DENSE, "--size", "0"]])
def test_cli_out_of_range_options_are_usage_errors(args):
    """Each used to run: --k -1 and dense --k -1, --factors 0, --batch-size 0 to a traceback, the others to numbers
    that mean nothing (k=0, T <= 0, 0 epochs, '0-shot', --n-last-blocks 0 = all blocks, --seeds 0 = NaN)."""
    r = _odis(*args)
    assert r.exit_code == 2 and f"Invalid value for '{args[-2]}'" in r.output, r.output


@pytest.mark.parametrize("cmd, option, folder", [(_KNN, "--out", False), (_KNN, "--cache", True),
                                                 (_LINEAR, "--out", False), (_DENSE, "--out", False)])
def test_cli_unwritable_out_is_one_line_before_any_work(cmd, option, folder, unwritable_outs):
    """These ended in a traceback after the features were extracted (or, --cache, after the backbone loaded)."""
    for out in unwritable_outs("r.json", folder):
        r = _odis(*cmd, option, out)
        assert r.exit_code == 2 and f"error: {option} {out}: " in r.output, r.output


def test_cli_size_and_blocks_must_fit_the_backbone(tiny_shards, backbone):
    base = ["--backbone", backbone, "--train", tiny_shards / "train", "--val", tiny_shards / "val", "--workers", "0"]
    r = _odis("eval", "knn", *base, "--size", "60")  # timm's AssertionError: not divisible by the patch size
    assert r.exit_code == 2 and "--size 60 is not a multiple of the patch size 8" in r.output, r.output
    r = _odis("eval", "linear", *base, "--n-last-blocks", "13")  # silently used the 12 there are
    assert r.exit_code == 2 and "--n-last-blocks 13: the backbone has 12 blocks" in r.output, r.output


def test_knn_size_and_box_select_change_the_features(tiny_shards, backbone, tmp_path):
    """--size and --box-select reach the features (read back from the cache), not only the result's record."""
    from odis.eval.features import load_features
    from odis.eval.protocols import run_knn
    from odis.eval.settings import KnnSettings
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest

    cols = empty_columns()  # two boxes per image: the larger one scores lower
    for iid in (tiny_shards / "ids.txt").read_text().split():
        add_row(cols, iid, f"{iid}.JPEG", 64, 64, "yolo", box=(0, 0, 48, 48), score=0.2)
        add_row(cols, iid, f"{iid}.JPEG", 64, 64, "yolo", box=(40, 40, 64, 64), score=0.9)
    man = str(write_manifest(table_from_columns(cols), tmp_path / "two.parquet", make_metadata("yolo", None, "stem")))
    feats = {}
    for name, kw in (("largest", {}), ("score", {"box_select": "score"}), ("size48", {"size": 48})):
        cache = tmp_path / name
        res = run_knn(KnnSettings(backbone, str(tiny_shards / "train"), str(tiny_shards / "val"), mode="mask",
                                  boxes=man, ks=(5,), workers=0, cache=str(cache), progress=False, **kw))
        assert res["size"] == kw.get("size", SIZE) and res["box_select"] == kw.get("box_select", "largest")
        feats[name] = load_features(next(cache.glob("train-*.safetensors"))).feats
    assert (feats["largest"] - feats["score"]).norm(dim=1).min() > 1e-3  # every image: another box
    assert (feats["largest"] - feats["size48"]).norm(dim=1).min() > 1e-3


def test_cli_knn_refuses_train_and_val_with_other_classes(tiny_imagenet, backbone, tmp_path):
    wnids = sorted(p.name for p in (tiny_imagenet / "train").iterdir() if p.is_dir())
    for name, classes in (("a", wnids[:2]), ("b", wnids[1:3])):
        for w in classes:
            (tmp_path / name / w).mkdir(parents=True)
            for f in sorted((tiny_imagenet / "train" / w / "images").iterdir())[:2]:
                (tmp_path / name / w / f.name).symlink_to(f)
        r = _odis("shard", "--images", tmp_path / name, "--out", tmp_path / f"shards-{name}", "--labels", "folder")
        assert r.exit_code == 0, r.output
    r = _odis("eval", "knn", "--backbone", backbone, "--train", tmp_path / "shards-a", "--val",
              tmp_path / "shards-b", "--workers", "0")
    assert r.exit_code == 2 and "different class lists" in r.output, r.output
    assert f"index 0: {wnids[0]!r} vs {wnids[1]!r}" in r.output


def test_cli_linear_few_shot(tiny_shards, backbone, tmp_path):
    r = _odis("eval", "linear", "--backbone", backbone, "--train", tiny_shards / "train", "--val",
              tiny_shards / "val", "--workers", "0", "--shots", "1,2", "--seeds", "2", "--epochs", "5",
              "--lrs", "1e-2,1e-1", "--boxes-mode", "mask", "--out", tmp_path / "lin.json", "--cache", tmp_path / "c")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "lin.json").read_text())
    assert res["feature_dim"] == 4 * 192 and res["n_last_blocks"] == 4
    assert [x["setting"] for x in res["results"]] == ["full", "1-shot", "2-shot"]
    assert [x["runs"][0]["n_train"] for x in res["results"]] == [18, 3, 6]
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    # the cached features are reused: same numbers again
    r2 = _odis("eval", "linear", "--backbone", backbone, "--train", tiny_shards / "train", "--val",
               tiny_shards / "val", "--workers", "0", "--shots", "1,2", "--seeds", "2", "--epochs", "5",
               "--lrs", "1e-2,1e-1", "--boxes-mode", "mask", "--out", tmp_path / "lin2.json", "--cache",
               tmp_path / "c")
    assert r2.exit_code == 0, r2.output
    assert json.loads((tmp_path / "lin2.json").read_text())["results"] == res["results"]


def test_cli_knn_unlabelled_shards_fail_clearly(tiny_imagenet, backbone, tmp_path):
    name = "n01443537_0.JPEG"
    data = next((tiny_imagenet / "train").glob(f"*/images/{name}")).read_bytes()
    _write_shards(tmp_path / "nolabel", [("n01443537_0", data, {"image_id": "n01443537_0", "label": None,
                                                                 "width": 64, "height": 64, "boxes": []})], 10)
    r = _odis("eval", "knn", "--backbone", backbone, "--train", tmp_path / "nolabel", "--val", tmp_path / "nolabel",
              "--workers", "0")
    assert r.exit_code == 2 and "have no label" in r.output and "n01443537_0" in r.output


def test_unreadable_sample_is_counted_not_fatal(tiny_imagenet, backbone, tmp_path):
    good = next((tiny_imagenet / "train").glob("*/images/*_0.JPEG"))
    key = good.stem
    meta = {"image_id": key, "label": 0, "width": 64, "height": 64, "boxes": [[4, 4, 40, 40]], "scores": [1.0]}
    bad = dict(meta, image_id="broken_1")
    _write_shards(tmp_path / "mixed", [(key, good.read_bytes(), meta), ("broken_1", b"not a jpeg", bad)], 10)
    f = _features(backbone, tmp_path / "mixed", "mask")
    assert f.image_ids == [key] and f.counts["errors"] == 1
    assert "broken_1" in f.errors[0] and "mixed" in f.errors[0]  # names the sample and the shard


def test_manifest_boxes_are_scaled_to_the_stored_image(tmp_path):
    from odis.eval.features import box_for_sample
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest

    cols = empty_columns()
    add_row(cols, "a", "a.jpg", 128, 256, "yolo", box=(20, 40, 60, 80), score=0.9)
    add_row(cols, "a", "a.jpg", 128, 256, "yolo", box=(0, 0, 100, 200), score=0.3)
    add_row(cols, "b", "b.jpg", 128, 256, "yolo", box=None)
    path = write_manifest(table_from_columns(cols), tmp_path / "m.parquet", make_metadata("yolo", None, "path"))
    man = BoxTable.from_manifest(path)
    stored = Image.new("RGB", (64, 64))  # the shard holds a resized copy: 0.5 x 0.25
    assert box_for_sample(stored, {}, "a", man, "score").tolist() == [10, 10, 30, 20]
    assert box_for_sample(stored, {}, "a", man, "largest").tolist() == [0, 0, 50, 50]
    assert box_for_sample(stored, {}, "b", man, "largest") is None      # processed, no box
    assert box_for_sample(stored, {"boxes": [[1, 2, 3, 4]]}, "c", man, "largest") is None  # not in the manifest
    assert box_for_sample(stored, {"boxes": [[1, 2, 3, 4]]}, "c", None, "largest").tolist() == [1, 2, 3, 4]
