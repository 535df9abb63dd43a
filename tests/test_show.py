"""`odis show boxes|attention|views`: PNGs of the expected size whose pixels show what they should."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from odis.boxes import box_to_patch_mask
from odis.eval.features import eval_crop
from odis.viz import BOX_COLOR, CROP_COLORS, attention_figure, colormap, fit

COCO_IMG = "000000010764.jpg"  # 640 x 424, a baseball catcher


def _odis(*args):
    from odis.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def coco_manifest(coco_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "coco-val.parquet"
    r = _odis("import-boxes", "--format", "coco", "--images", coco_tiny / "val2017", "--annotations",
              coco_tiny / "annotations" / "instances_val2017.json", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_show_boxes_grid(coco_manifest, coco_tiny, tmp_path):
    from odis.manifest import read_manifest

    out = tmp_path / "grid.png"
    r = _odis("show", "boxes", coco_manifest, "--images", coco_tiny / "val2017", "--out", out, "--n", "6",
              "--cols", "3", "--cell", "200")
    assert r.exit_code == 0, r.output
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert pic.shape == (400, 600, 3)
    # the largest box of the first image: the middle of its left edge is drawn in the box colour
    df = read_manifest(coco_manifest).to_pandas()
    first = sorted(df["image_id"].unique())[0]
    rows = df[df["image_id"] == first].dropna(subset=["x0"])
    b = rows.loc[((rows.x1 - rows.x0) * (rows.y1 - rows.y0)).idxmax()]
    img = Image.open(coco_tiny / "val2017" / b["path"])
    _, s, ox, oy = fit(img, 200)
    x, y = int(b.x0 * s + ox), int((b.y0 + b.y1) / 2 * s + oy)
    near = pic[y, max(0, x - 2):x + 3]  # the 2-px line, whatever the rounding
    assert any(tuple(p) == BOX_COLOR for p in near), near
    assert "6 images" in r.output


def test_show_boxes_ids_and_min_score_choose_what_is_drawn(coco_manifest, coco_tiny, tmp_path):
    from odis.manifest import read_manifest

    df = read_manifest(coco_manifest).to_pandas().dropna(subset=["x0"])
    per_image = df.groupby("image_id").size().sort_values()
    ids = list(per_image.index[-2:])  # the two images with most boxes, in this order
    out = tmp_path / "ids.png"
    base = ["show", "boxes", coco_manifest, "--images", coco_tiny / "val2017", "--out", out, "--cell", "100"]
    r = _odis(*base, "--ids", ",".join(ids))
    assert r.exit_code == 0 and f"2 images, {per_image[ids].sum()} boxes" in r.output, r.output
    # GT boxes score 1.0: a threshold above it hides them all
    r = _odis(*base, "--ids", ",".join(ids), "--min-score", "1.5")
    assert r.exit_code == 0 and "2 images, 0 boxes" in r.output, r.output
    r = _odis(*base, "--ids", "nope")
    assert r.exit_code == 2 and "not in the manifest: ['nope']" in r.output


def test_show_boxes_unreadable_image_is_a_red_cell(coco_manifest, tmp_path):
    out = tmp_path / "grid.png"
    r = _odis("show", "boxes", coco_manifest, "--images", tmp_path / "nowhere", "--out", out, "--n", "2",
              "--cols", "2", "--cell", "100")
    assert r.exit_code == 0, r.output
    assert "2 unreadable" in r.output
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert pic.shape == (100, 200, 3) and tuple(pic[90, 50]) == (60, 0, 0)


def test_attention_figure_puts_heat_where_the_attention_is():
    att = np.zeros((2, 4, 4))
    att[0, 1, 2] = 1.0   # head 0: one patch
    att[1, :, 0] = 0.25  # head 1: the first column
    view = Image.new("RGB", (64, 64), (128, 128, 128))
    pic = np.asarray(attention_figure(view, att))
    assert pic.shape == (64, 4 * 64, 3)
    hot, cold = tuple(colormap(np.array(1.0))), tuple(colormap(np.array(0.0)))
    head0 = pic[:, 2 * 64:3 * 64]
    assert tuple(head0[16 + 8, 32 + 8]) == hot and tuple(head0[8, 8]) == cold
    head1 = pic[:, 3 * 64:]
    assert tuple(head1[60, 4]) == hot and tuple(head1[60, 60]) == cold


def test_show_attention_masked_to_the_box(coco_tiny, tmp_path):
    from odis.model import OdisViT, export_backbone

    torch.manual_seed(0)
    export_backbone(OdisViT("vit_tiny_patch16_224", img_size=112), tmp_path / "b.safetensors")
    box = (280.0, 150.0, 440.0, 400.0)
    out = tmp_path / "att.png"
    r = _odis("show", "attention", "--backbone", tmp_path / "b.safetensors", "--image", coco_tiny / "val2017" /
              COCO_IMG, "--box", ",".join(map(str, box)), "--out", out)
    assert r.exit_code == 0, r.output
    pic = np.asarray(Image.open(out).convert("RGB"))
    heads = 3
    assert pic.shape == (112, (heads + 2) * 112, 3)
    inside = box_to_patch_mask(eval_crop(640, 424, 112).apply(np.array(box)), 112, 112, 16)
    cold = tuple(colormap(np.array(0.0)))
    for h in range(heads + 1):  # the mean, then each head
        panel = pic[:, (h + 1) * 112:(h + 2) * 112]
        centres = panel[8::16, 8::16]  # one pixel per patch
        assert all(tuple(c) == cold for c in centres[~inside])        # OBJ sees nothing outside its box
        assert sum(tuple(c) != cold for c in centres[inside]) >= inside.sum() // 2
    # the first panel is the view with the box drawn
    assert (np.abs(pic[:, :112].astype(int) - BOX_COLOR).sum(-1) == 0).sum() > 50
    r = _odis("show", "attention", "--backbone", tmp_path / "b.safetensors", "--image", coco_tiny / "val2017" /
              COCO_IMG, "--box", "5,5,1,1", "--out", out)
    assert r.exit_code == 2 and "--box must be" in r.output
    # a box reaching past the 640 x 424 image is clipped and said; one wholly outside is refused
    r = _odis("show", "attention", "--backbone", tmp_path / "b.safetensors", "--image", coco_tiny / "val2017" /
              COCO_IMG, "--box", "280,150,1000,400", "--out", out)
    assert r.exit_code == 0 and "clipped to [280.0, 150.0, 640.0, 400.0]" in r.output, r.output
    r = _odis("show", "attention", "--backbone", tmp_path / "b.safetensors", "--image", coco_tiny / "val2017" /
              COCO_IMG, "--box", "700,10,900,50", "--out", out)
    assert r.exit_code == 2 and "lies outside the 640x424 image" in r.output, r.output
    r = _odis("show", "attention", "--backbone", tmp_path / "b.safetensors", "--image", coco_tiny / "val2017" /
              COCO_IMG, "--size", "100", "--out", out)  # an AssertionError from timm's patch embedding
    assert r.exit_code == 2 and "--size 100 is not a multiple of the patch size 16" in r.output, r.output


def test_show_views(coco_tiny, tmp_path):
    out = tmp_path / "views.png"
    r = _odis("show", "views", "--image", coco_tiny / "val2017" / COCO_IMG, "--box", "280,150,440,400",
              "--out", out, "--global-size", "128", "--local-size", "64", "--n-local", "4", "--patch", "16")
    assert r.exit_code == 0, r.output
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert pic.shape == (256 + 128, 3 * 256, 3)
    src = pic[:256, :256].reshape(-1, 3)
    for color in (BOX_COLOR, *CROP_COLORS):  # the object box and both global crops are drawn on the source
        assert (np.abs(src.astype(int) - color).sum(-1) == 0).sum() > 20, color
    # the object's patches are tinted green in the global views (object in both views: "yes, yes")
    assert "yes, yes" in r.output
    g = pic[:256, 256:768].astype(int)
    assert ((g[..., 1] - g[..., 0] > 60) & (g[..., 1] - g[..., 2] > 60)).sum() > 500


def test_show_views_from_shards(tiny_imagenet, tmp_path):
    import json

    import webdataset as wds

    img = next((tiny_imagenet / "train").glob("*/images/*_3.JPEG"))
    meta = {"image_id": img.stem, "label": 0, "width": 64, "height": 64, "boxes": [[8, 16, 40, 60]],
            "scores": [1.0]}
    (tmp_path / "s").mkdir()
    with wds.ShardWriter(str(tmp_path / "s" / "s-%06d.tar"), maxcount=10, verbose=0) as w:
        w.write({"__key__": img.stem, "jpg": img.read_bytes(), "json": json.dumps(meta).encode()})
    out = tmp_path / "v.png"
    r = _odis("show", "views", "--shards", tmp_path / "s", "--key", img.stem, "--global-size", "64",
              "--local-size", "32", "--n-local", "2", "--patch", "8", "--out", out)
    assert r.exit_code == 0, r.output
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert pic.shape == (256 + 128, 768, 3)
    # the shard's box, fitted into the first cell (64 px image -> 256 px): its left edge is red
    assert tuple(pic[int(38 * 4), 8 * 4 + 1]) == BOX_COLOR
    r = _odis("show", "views", "--shards", tmp_path / "s", "--key", "missing", "--out", out)
    assert r.exit_code == 2 and "no sample with key 'missing'" in r.output


# ---- bad options and outputs: a usage error naming them, before anything is read ---------------------------------

_BOXES, _ATT = ["show", "boxes", "m.parquet"], ["show", "attention", "--backbone", "b.pt", "--image", "i.jpg"]
_VIEWS = ["show", "views", "--image", "i.jpg"]


@pytest.mark.parametrize("args", [
    [*_BOXES, "--n", "0"], [*_BOXES, "--n", "-1"], [*_BOXES, "--cols", "0"], [*_BOXES, "--cell", "0"],
    [*_BOXES, "--seed", "-1"], [*_ATT, "--size", "0"], [*_VIEWS, "--global-size", "0"], [*_VIEWS, "--local-size", "0"],
    [*_VIEWS, "--n-local", "-1"], [*_VIEWS, "--patch", "0"], [*_VIEWS, "--seed", "-1"]])
def test_out_of_range_options_are_usage_errors(args):
    """--cols 0, --cell 0, --patch 0, --global-size 0, --seed -1 ended in tracebacks (ZeroDivisionError, numpy's);
    --n -1 drew all images but the last."""
    r = _odis(*args)
    assert r.exit_code == 2 and f"Invalid value for '{args[-2]}'" in r.output, r.output


def test_views_global_size_must_be_a_multiple_of_the_patch():
    r = _odis(*_VIEWS, "--global-size", "60", "--patch", "8")
    assert r.exit_code == 2 and "--global-size 60 must be a multiple of --patch 8" in r.output, r.output


@pytest.mark.parametrize("cmd", [_BOXES, _ATT, _VIEWS])
def test_unwritable_out_is_one_line_before_any_work(cmd, unwritable_outs, tmp_path):
    """A file given as the folder, a folder given as the PNG, /proc, and a suffix no format is known by ended in
    tracebacks (FileExistsError, ValueError: unknown file extension, ...) after the picture was made."""
    for out in [*unwritable_outs("x.png"), tmp_path / "x.xyz"]:
        r = _odis(*cmd, "--out", out)
        assert r.exit_code == 2 and f"error: --out {out}: " in r.output, r.output
