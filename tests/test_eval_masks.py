"""`odis eval knn|linear --boxes-mode mask --masks COCO_JSON`: the [OBJ] mask from the selected object's
segmentation instead of its box (the paper's Table 5 "Use Masks"), on a synthetic L and on real coco_tiny shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from odis.boxes import box_to_patch_mask
from odis.eval.features import eval_crop, load_features
from odis.eval.segments import SegmentTable, decode_segmentation, mask_to_view, pixels_to_patch_mask
from odis.image_ids import coco_image_id

SIZE, PATCH = 64, 8  # Resize 73 / CenterCrop 64, an 8 x 8 patch grid

# An L in a 200 x 120 image: its box less the top-right quadrant [106, 26, 132, 66]. In the eval view
# (x * 0.605 - 28, y * 0.608 - 4) its edges fall inside patches, never on their borders.
W, H = 200, 120
BBOX = [66.0, 26.0, 132.0, 92.0]
L_POLY = [66, 26, 106, 26, 106, 66, 132, 66, 132, 92, 66, 92]
KEY = "000000000007"


def _grid(rows, cols) -> np.ndarray:
    g = np.zeros((SIZE // PATCH, SIZE // PATCH), bool)
    g[rows[0]:rows[1], cols[0]:cols[1]] = True
    return g


def _l_table(scale: int = 1, segm="polygon") -> SegmentTable:
    """The L annotated on an image `scale` times the stored one (a shard stored resized)."""
    poly = [[v * scale for v in L_POLY]] if segm == "polygon" else segm
    return SegmentTable({KEY: (W * scale, H * scale, np.array([BBOX]) * scale, [poly])}, "synthetic.json")


def _patch_mask(table, key=KEY, width=W, height=H, boxes=(BBOX,), selected=BBOX, how="largest"):
    return table.patch_mask(key, width, height, np.array(boxes, float), np.array(selected, float), how,
                            eval_crop(width, height, SIZE), PATCH)


def test_l_shaped_segmentation_is_a_strict_subset_of_its_box_through_eval_crop():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    crop = eval_crop(W, H, SIZE)
    box_pm = box_to_patch_mask(crop.apply(np.array(BBOX)), SIZE, SIZE, PATCH)
    assert (box_pm == _grid((1, 7), (1, 7))).all()  # the box: rows and columns 1..6
    l_pm = _grid((1, 4), (1, 5)) | _grid((4, 7), (1, 7))  # the L: the box less rows 1..3 x columns 5..6
    for scale in (1, 2, 3):  # annotated at the stored size, and on a larger original (the shard resized it)
        pm, source = _patch_mask(_l_table(scale))
        assert source == "segmentation"
        assert (pm <= box_pm).all() and pm.sum() < box_pm.sum()  # a strict subset of the box's patches
        assert (pm == l_pm).all(), (scale, pm.astype(int))
    # The same as the transform written out: the L rasterised at the stored size, torchvision's nearest
    # Resize + CenterCrop, then a patch is in when any of its pixels is.
    raster = np.zeros((H, W), np.uint8)
    raster[26:92, 66:106] = raster[66:92, 66:132] = 255
    view = TF.center_crop(TF.resize(Image.fromarray(raster), round(SIZE * 256 / 224),
                                    interpolation=InterpolationMode.NEAREST), [SIZE, SIZE])
    assert (pixels_to_patch_mask(np.asarray(view) > 0, PATCH) == l_pm).all()
    assert (mask_to_view(raster > 0, crop, W, H) == (np.asarray(view) > 0)).all()


def test_mask_falls_back_to_the_box_and_says_why():
    table = _l_table(2)
    assert _patch_mask(table, key="000000000008") == (None, "mask_not_in_annotations")
    assert _patch_mask(table, width=120, height=120, boxes=([40, 26, 100, 92],),
                       selected=[40, 26, 100, 92]) == (None, "mask_size_mismatch")  # another picture
    far = [150.0, 90.0, 190.0, 115.0]  # a box no annotation matches (IoU 0)
    assert _patch_mask(table, boxes=(far,), selected=far) == (None, "mask_no_matching_annotation")
    shifted = [70.0, 30.0, 136.0, 96.0]  # a detector's box near the object (IoU ~0.78): still its segmentation
    assert _patch_mask(table, boxes=(shifted,), selected=shifted)[1] == "segmentation"
    no_segm = SegmentTable({KEY: (W, H, np.array([BBOX]), [None])})
    assert _patch_mask(no_segm) == (None, "mask_no_segmentation")
    # union: each box's segmentation, or the box itself where no annotation matches
    pm, source = _patch_mask(table, boxes=(BBOX, far), selected=[66, 26, 190, 115], how="union")
    far_pm = box_to_patch_mask(eval_crop(W, H, SIZE).apply(np.array(far)), SIZE, SIZE, PATCH)
    l_pm, _ = _patch_mask(table)
    assert source == "segmentation" and (pm == (l_pm | far_pm)).all()
    # an uncompressed RLE (what COCO's crowds have) gives the polygon's mask
    from pycocotools import mask as mask_utils

    l_mask = decode_segmentation([L_POLY], W, H)
    assert l_mask.sum() == 40 * 66 + 26 * 26  # pycocotools: the integer polygon's pixels exactly
    rle = mask_utils.encode(np.asfortranarray(l_mask.astype(np.uint8)))  # compressed; a str once in JSON
    assert (decode_segmentation({"counts": rle["counts"].decode(), "size": [H, W]}, W, H) == l_mask).all()
    flat = l_mask.T.ravel()  # column-major runs, starting with the background's
    assert not flat[0]
    counts = [int(c) for c in np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, W * H])]
    assert (decode_segmentation({"counts": counts, "size": [H, W]}, W, H) == l_mask).all()
    assert (_patch_mask(_l_table(1, {"counts": counts, "size": [H, W]}))[0] == l_pm).all()


def test_the_real_crowd_rles_decode_as_pycocotools_does(coco_tiny):
    from odis.eval.segdata import load_coco_masks

    ann = coco_tiny / "annotations" / "instances_val2017.json"
    coco = load_coco_masks(ann)
    table = SegmentTable.from_coco(ann)
    crowds = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert len(crowds) == 11 and len(table.images) == 80
    for a in crowds:
        img = coco.imgs[a["image_id"]]
        w, h, boxes, segms = table.images[coco_image_id(a["image_id"])]
        assert (w, h) == (img["width"], img["height"]) and a["segmentation"] in segms
        assert (decode_segmentation(a["segmentation"], w, h) == coco.annToMask(a).astype(bool)).all()


# ---- the CLI on coco_tiny shards -----------------------------------------------------------------------------

N_VAL, N_TRAIN = 8, 4  # shards of 8 val2017 images (in --masks) and 4 train2017 ones (not in it: box masks)


def _odis(*args):
    from odis.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def coco_mask_shards(coco_tiny, tmp_path_factory):
    """12 coco_tiny images through import-boxes + shard --labels coco, stored resized (short side 128), and a
    random ViT-Ti/8 at 64 px."""
    from odis.model import OdisViT, export_backbone

    out = tmp_path_factory.mktemp("coco-masks")
    va = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    tr = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    keep = {"val2017": sorted(va["images"], key=lambda i: i["id"])[:N_VAL],
            "train2017": sorted(tr["images"], key=lambda i: i["id"])[:N_TRAIN]}
    images = out / "images"
    images.mkdir()
    for split, ims in keep.items():
        for im in ims:
            (images / im["file_name"]).symlink_to(coco_tiny / split / im["file_name"])
    ids = {im["id"] for ims in keep.values() for im in ims}
    both = out / "instances_both.json"  # labels and boxes for all 12; --masks gets val2017's file alone
    both.write_text(json.dumps({"images": keep["val2017"] + keep["train2017"], "categories": va["categories"],
                                "annotations": [a for a in va["annotations"] + tr["annotations"]
                                                if a["image_id"] in ids]}))
    r = _odis("import-boxes", "--format", "coco", "--images", images, "--annotations", both,
              "--out", out / "gt.parquet")
    assert r.exit_code == 0, r.output
    shard = ["shard", "--images", images, "--labels", "coco", "--coco-json", both, "--resize-short", 128,
             "--num-workers", 1]
    r = _odis(*shard, "--out", out / "shards", "--manifest", out / "gt.parquet")  # keys: the COCO ids
    assert r.exit_code == 0, r.output
    r = _odis(*shard, "--out", out / "shards-path", "--id-scheme", "path")  # keys that are no COCO id
    assert r.exit_code == 0, r.output
    torch.manual_seed(0)
    export_backbone(OdisViT("vit_tiny_patch16_224", img_size=SIZE, patch_size=PATCH), out / "backbone.safetensors")
    return out, {coco_image_id(im["id"]) for im in keep["val2017"]}, {coco_image_id(im["id"]) for im in keep["train2017"]}


def test_cli_knn_with_masks(coco_mask_shards, coco_tiny, tmp_path):
    out, in_file, not_in_file = coco_mask_shards
    masks = coco_tiny / "annotations" / "instances_val2017.json"
    base = ["eval", "knn", "--backbone", out / "backbone.safetensors", "--train", out / "shards", "--val",
            out / "shards", "--k", "1,5", "--boxes-mode", "mask", "--cache", tmp_path / "cache"]
    r = _odis(*base, "--masks", masks, "--workers", 1, "--out", tmp_path / "masks.json")  # a loader worker
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "masks.json").read_text())
    assert res["masks"] == str(masks) and res["n_train"] == res["n_val"] == N_VAL + N_TRAIN
    for split in ("train", "val"):
        c = res["counts"][split]
        assert c["mask_segmentation"] == N_VAL and c["mask_fallback_box"] == c["mask_not_in_annotations"] == N_TRAIN
        assert c["mask_no_matching_annotation"] == c["mask_no_segmentation"] == c["mask_size_mismatch"] == 0
    assert f"val: segmentation mask used for {N_VAL}, box mask for {N_TRAIN} ({N_TRAIN} not in annotations)" in r.output
    with_masks = set((tmp_path / "cache").iterdir())
    r = _odis(*base, "--workers", 0, "--out", tmp_path / "box.json")
    assert r.exit_code == 0, r.output
    box = json.loads((tmp_path / "box.json").read_text())
    assert box["masks"] is None and "mask_segmentation" not in box["counts"]["val"]
    # the masks file is in the cache key: the box-mask run extracted its own features
    box_files = set((tmp_path / "cache").iterdir()) - with_masks
    assert len(with_masks) == len(box_files) == 2
    seg_f = load_features(next(p for p in with_masks if p.name.startswith("val-")))
    box_f = load_features(next(p for p in box_files if p.name.startswith("val-")))
    order = [box_f.image_ids.index(i) for i in seg_f.image_ids]
    diff = (seg_f.feats - box_f.feats[order]).norm(dim=1)
    by_id = dict(zip(seg_f.image_ids, diff.tolist()))
    assert all(by_id[i] < 1e-4 for i in not_in_file)  # fell back to the box mask: the same feature
    assert all(by_id[i] > 1e-3 for i in in_file), by_id  # here every segmentation changes the feature
    # linear takes --masks too (features reused from the cache: the same key)
    r = _odis("eval", "linear", "--backbone", out / "backbone.safetensors", "--train", out / "shards", "--val",
              out / "shards", "--boxes-mode", "mask", "--masks", masks, "--n-last-blocks", 1, "--lrs", "0.01",
              "--epochs", 2, "--cache", tmp_path / "cache", "--workers", 0, "--out", tmp_path / "linear.json")
    assert r.exit_code == 0, r.output
    lin = json.loads((tmp_path / "linear.json").read_text())
    assert lin["masks"] == str(masks) and lin["counts"] == res["counts"]
    assert set((tmp_path / "cache").iterdir()) == with_masks | box_files


def test_cli_masks_refusals(coco_mask_shards, coco_tiny, tmp_path):
    out, _, _ = coco_mask_shards
    masks = coco_tiny / "annotations" / "instances_val2017.json"
    base = ["eval", "knn", "--backbone", out / "backbone.safetensors", "--train", out / "shards", "--val",
            out / "shards", "--k", "1", "--workers", 0]
    r = _odis(*base, "--masks", masks)
    assert r.exit_code == 2 and "--masks needs --boxes-mode mask" in r.output
    r = _odis(*base, "--boxes-mode", "mask", "--masks", tmp_path / "missing.json")
    assert r.exit_code == 2 and "no such file" in r.output
    bad = tmp_path / "bad.json"
    data = json.loads(masks.read_text())
    data["annotations"][3]["segmentation"] = [[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]]
    bad.write_text(json.dumps(data))
    r = _odis(*base, "--boxes-mode", "mask", "--masks", bad)
    assert r.exit_code == 2 and "annotations[index 3" in r.output and "not a finite number" in r.output
    # shards keyed by path: no key is a COCO id, refused before any extraction
    r = _odis(*base[:5], out / "shards-path", "--val", out / "shards-path", *base[8:], "--boxes-mode", "mask",
              "--masks", masks)
    assert r.exit_code == 2 and "none of the shards' image ids is in this annotation file" in r.output, r.output
    assert "--id-scheme coco" in r.output
