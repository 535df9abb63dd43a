"""Hummingbird dense NN retrieval on real COCO masks: an oracle feature scores mIoU ~ 1, random features low."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from odis.eval.dense import (confusion, dense_nn_from_features, memory_ranking, miou, patch_histograms,
                             subsample)
from odis.eval.segdata import IGNORE, coco_semantic

S = 24  # masks resized to S x S; the oracle's "patches" are pixels so the oracle can be exact


def small_masks(ds, n=None):
    out = []
    for i in range(len(ds) if n is None else n):
        m = torch.from_numpy(ds[i][2])[None, None].float()
        out.append(F.interpolate(m, size=(S, S), mode="nearest")[0, 0].long())
    return torch.stack(out)


def test_coco_semantic_masks(coco_tiny):
    ds = coco_semantic(coco_tiny / "annotations" / "instances_val2017.json", coco_tiny / "val2017")
    assert len(ds) == 80 and ds.num_classes == 81 and ds.class_names[1] == "person"
    image_id, img, mask = ds[0]
    assert mask.shape == (img.height, img.width) and image_id.isdigit() and len(image_id) == 12
    labels = set(np.unique(mask).tolist())
    assert 0 in labels and len(labels - {0, IGNORE}) >= 1 and max(labels - {IGNORE}) <= 80


def _set_first(section, key, value):
    def change(data):
        data[section][0][key] = value
        return f"{section}[index 0, id={data[section][0]['id']}]"
    return change


# Each used to reach pycocotools unchecked: a NaN polygon point made annToMask rasterise ~22 GB (OOM-killed), an
# RLE of another size was decoded past its buffer, a huge image size allocated the mask before anything was read.
BROKEN_MASKS = [
    (_set_first("annotations", "segmentation", [[10, 10, 20, 10, float("nan"), 20]]),
     "segmentation polygon 0: nan is not a finite number"),
    (_set_first("annotations", "segmentation", [[10, 10, 20, 10, 20, -1e9]]), "is outside the"),
    (_set_first("annotations", "segmentation", {"size": [3], "counts": "garbage!!"}),
     "segmentation RLE: size [3] is not the image's [height, width]"),
    (_set_first("annotations", "segmentation", []), "no segmentation"),
    (_set_first("images", "width", 10**6), "pixels is over the"),
]


@pytest.mark.parametrize("change, problem", BROKEN_MASKS, ids=[p for _, p in BROKEN_MASKS])
def test_coco_semantic_refuses_a_broken_annotation_naming_it(coco_tiny, tmp_path, change, problem):
    import json

    data = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    where = change(data)
    ann = tmp_path / "instances_val2017.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:  # the CLI turns a ValueError into one `error:` line
        coco_semantic(ann, coco_tiny / "val2017")
    assert str(e.value).startswith(f"{ann}: {where}: ") and problem in str(e.value), str(e.value)


def test_dense_nn_oracle_and_random(coco_tiny):
    train = coco_semantic(coco_tiny / "annotations" / "instances_train2017.json", coco_tiny / "train2017")
    val = coco_semantic(coco_tiny / "annotations" / "instances_val2017.json", coco_tiny / "val2017")
    c = train.num_classes
    tm, vm = small_masks(train), small_masks(val, 6)
    th = patch_histograms(tm, (S, S), c)
    vh = patch_histograms(vm, (S, S), c)
    # oracle: each patch's feature is the one-hot of its true label
    res = dense_nn_from_features(th, th, vh, vm, (S, S), c, factors=(1, 8))
    assert res[0]["mIoU"] > 99.0, res[0]["mIoU"]
    assert res[1]["memory_size"] < res[0]["memory_size"] / 7
    assert res[1]["mIoU"] > 90.0
    g = torch.Generator().manual_seed(0)
    rand = dense_nn_from_features(torch.randn(*th.shape[:2], 16, generator=g), th,
                                  torch.randn(*vh.shape[:2], 16, generator=g), vm, (S, S), c, factors=(1,))
    assert rand[0]["mIoU"] < 20.0, rand[0]["mIoU"]


def test_patch_histograms_and_sampling():
    m = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, IGNORE], [3, 3, IGNORE, IGNORE], [3, 3, IGNORE, IGNORE]]])
    h = patch_histograms(m, (2, 2), 4)
    assert torch.allclose(h[0, 0], torch.tensor([0.75, 0, 0.25, 0]))
    assert torch.allclose(h[0, 1], torch.tensor([0, 1.0, 0, 0]))
    assert torch.allclose(h[0, 3], torch.zeros(4))  # all ignored: no label
    order = memory_ranking(h, torch.Generator().manual_seed(0))
    assert order[0, -1] == 3  # unlabelled patch ranks last
    mem = subsample(torch.randn(1, 4, 5), h, order, 1)
    assert mem.feats.shape == (3, 5) and torch.allclose(mem.feats.norm(dim=1), torch.ones(3))


def test_miou_counts():
    t = torch.tensor([0, 0, 1, 1, IGNORE])
    p = torch.tensor([0, 1, 1, 1, 0])
    m, ious = miou(confusion(p, t, 3))
    assert ious[0] == 0.5 and abs(ious[1] - 2 / 3) < 1e-9 and ious[2] is None
    assert abs(m - (0.5 + 2 / 3) / 2) < 1e-9


def test_cli_dense_nn_on_coco_tiny(coco_tiny, tmp_path):
    """The whole command on real COCO images and masks, with a small random ViT (numbers are not the point)."""
    import json

    from typer.testing import CliRunner

    from odis.cli import app
    from odis.model import OdisViT, export_backbone

    torch.manual_seed(0)
    export_backbone(OdisViT("vit_tiny_patch16_224", img_size=64), tmp_path / "b.safetensors")
    args = ["eval", "dense-nn", "--backbone", str(tmp_path / "b.safetensors"), "--dataset", "coco", "--root",
            str(coco_tiny), "--size", "64", "--max-train", "12", "--max-val", "4", "--factors", "1,8",
            "--out", str(tmp_path / "d.json")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["n_train"] == 12 and res["n_val"] == 4 and res["num_classes"] == 81
    assert [x["factor"] for x in res["results"]] == [1, 8]
    assert res["results"][0]["memory_size"] <= 12 * 16 and res["results"][1]["memory_size"] <= 12 * 2
    assert all(0 <= x["mIoU"] <= 100 for x in res["results"]) and "mIoU memory 1/8" in r.output
    r = CliRunner().invoke(app, args[:-2] + ["--size", "60"])
    assert r.exit_code == 2 and "not a multiple of the patch size" in r.output
    r = CliRunner().invoke(app, [*args[:6], "--root", str(tmp_path), *args[8:]])  # a root without annotations/
    assert r.exit_code == 2 and "no annotations/instances_train2017.json (the COCO layout" in r.output


def test_voc_and_ade20k_folder_loaders(coco_tiny, tmp_path):
    """Both layouts, written here from a real COCO image and its semantic mask."""
    import shutil

    from PIL import Image

    from odis.eval.segdata import ade20k_semantic, open_dataset, voc_semantic

    coco = coco_semantic(coco_tiny / "annotations" / "instances_val2017.json", coco_tiny / "val2017")
    image_id, img, mask = coco[0]
    labels = np.where(mask == IGNORE, IGNORE, mask % 21).astype(np.uint8)
    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    shutil.copy(coco.items[0][1], voc / "JPEGImages" / "2007_000001.jpg")
    png = Image.fromarray(labels, mode="P")
    png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])  # colours are not labels
    png.save(voc / "SegmentationClass" / "2007_000001.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    ds = voc_semantic(voc, "val")
    assert len(ds) == 1 and ds.num_classes == 21
    _, vimg, vmask = ds[0]
    assert vimg.size == img.size and np.array_equal(vmask, labels)

    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "validation").mkdir(parents=True)
    (ade / "annotations" / "validation").mkdir(parents=True)
    shutil.copy(coco.items[0][1], ade / "images" / "validation" / "ADE_val_00000001.jpg")
    grey = np.where(mask == IGNORE, 0, mask % 151).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(ade / "annotations" / "validation" / "ADE_val_00000001.png")
    ds = open_dataset("ade20k", ade, "validation")
    _, _, amask = ds[0]
    assert ds.num_classes == 150
    assert np.array_equal(amask, np.where(grey == 0, IGNORE, grey.astype(np.int64) - 1))
    (ade / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="annotation PNGs missing"):
        ade20k_semantic(ade, "validation")
    with pytest.raises(FileNotFoundError, match="split file not found"):
        voc_semantic(voc, "train")
