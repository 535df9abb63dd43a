"""Ground-truth import: COCO (bbox, masks, crowd), YOLO txt (coco8), Tiny-ImageNet, ILSVRC XML fixtures.
Expected values are computed independently from the annotation files."""
from __future__ import annotations

import json
import os
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from odis.cli import app
from odis.importers import AnnotationError, import_coco, import_imagenet, import_tiny_imagenet, import_yolo
from odis.manifest import manifest_metadata, read_manifest, write_manifest
from odis.manifest_validate import validate_manifest

runner = CliRunner()


def _rows_by_image(table):
    rows = defaultdict(list)
    for r in table.to_pylist():
        if r["x0"] is not None:
            rows[r["image_id"]].append((r["x0"], r["y0"], r["x1"], r["y1"], r["category"]))
    return rows


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco_tiny_rows_and_boxes_equal_the_json(coco_tiny, split, tmp_path):
    ann = coco_tiny / "annotations" / f"instances_{split}.json"
    out = tmp_path / f"{split}.parquet"
    res = runner.invoke(app, ["import-boxes", "--format", "coco", "--images", str(coco_tiny / split),
                              "--annotations", str(ann), "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(ann.read_text())
    size = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    expected = defaultdict(list)
    for a in data["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        W, H = size[a["image_id"]]
        expected[f"{a['image_id']:012d}"].append((max(x, 0), max(y, 0), min(x + w, W), min(y + h, H),
                                                  a["category_id"]))
    n_boxes = sum(map(len, expected.values()))
    n_empty_images = sum(1 for i in size if f"{i:012d}" not in expected)
    t = read_manifest(out)
    assert t.num_rows == n_boxes + n_empty_images
    assert t.column("image_id").to_pylist() and set(t.column("image_id").to_pylist()) == {f"{i:012d}" for i in size}
    got = _rows_by_image(t)
    for iid, boxes in expected.items():
        np.testing.assert_allclose(sorted(got[iid]), sorted(boxes), atol=1e-3, err_msg=iid)
    assert validate_manifest(out) == []
    meta = manifest_metadata(out)
    assert meta["source"] == "coco-gt" and meta["id_scheme"] == "coco" and meta["keep_crowd"] is False
    assert f"{out}: {t.num_rows} rows" in res.output


def test_coco_crowd_flag_and_boxes_from_segmentation(coco_tiny):
    ann = coco_tiny / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    n_crowd = sum(a["iscrowd"] for a in data["annotations"])
    assert n_crowd > 0  # the flag must make a difference on this data
    drop = import_coco(coco_tiny / "val2017", ann)
    keep = import_coco(coco_tiny / "val2017", ann, keep_crowd=True)
    assert keep.table.num_rows - drop.table.num_rows == n_crowd == drop.counts["dropped_crowd"]
    seg = import_coco(coco_tiny / "val2017", ann, from_segmentation=True)
    assert seg.table.num_rows == drop.table.num_rows
    b, s = drop.table.to_pandas(), seg.table.to_pandas()
    # the rows come in annotation order per image: each mask box lies inside its bbox (1 px of rasterisation)
    assert (b.image_id.to_numpy() == s.image_id.to_numpy()).all()
    for c in ("x0", "y0"):
        assert (s[c] >= b[c] - 1.0).all()
    for c in ("x1", "y1"):
        assert (s[c] <= b[c] + 1.0).all()
    assert (np.abs(s[["x0", "y0", "x1", "y1"]].to_numpy() - b[["x0", "y0", "x1", "y1"]].to_numpy()) > 0.01).any()


def test_coco_missing_image_is_an_error_row(coco_tiny, tmp_path):
    ann = coco_tiny / "annotations" / "instances_val2017.json"
    img_dir = tmp_path / "val2017"
    img_dir.mkdir()
    first = sorted((coco_tiny / "val2017").iterdir())[0]
    (img_dir / first.name).symlink_to(first)
    res = import_coco(img_dir, ann)
    t = res.table.to_pandas()
    assert res.counts["missing_files"] == 79 and t.error.notna().sum() == 79
    assert t[t.error.notna()].error.str.contains("file not found").all()


def test_coco_annotations_of_another_split_are_one_line_and_nothing_written(coco_tiny, tmp_path):
    """val2017 images with the train2017 JSON: 80 error rows and exit 0 before; a partial miss stays error rows
    (test_coco_missing_image_is_an_error_row)."""
    out = tmp_path / "m.parquet"
    ann = coco_tiny / "annotations" / "instances_train2017.json"
    first = min(json.loads(ann.read_text())["images"], key=lambda im: im["id"])["file_name"]
    res = _import_cli("coco", coco_tiny / "val2017", out, "--annotations", ann)
    _one_error_line(res, f"--images {coco_tiny / 'val2017'}", f"--annotations {ann}", f"e.g. {first}", "none of the 80")
    assert not out.exists()


def test_coco_2014_file_names_join_import_boxes_and_shard(coco_tiny, tmp_path):
    """COCO-2014 names (`COCO_val2014_<12-digit id>.jpg`): import-boxes keys rows by the JSON's id, shard keyed the
    files by every digit of the name ('2014' + id), so `shard --labels coco --manifest` joined no box."""
    data = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    keep = sorted(im["id"] for im in data["images"])[:6]
    images, ann = tmp_path / "val2014", tmp_path / "instances_val2014.json"
    images.mkdir()
    for im in data["images"]:
        if im["id"] in keep:
            (images / f"COCO_val2014_{im['id']:012d}.jpg").symlink_to(coco_tiny / "val2017" / im["file_name"])
            im["file_name"] = f"COCO_val2014_{im['id']:012d}.jpg"
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    ann.write_text(json.dumps(data))
    gt = tmp_path / "gt.parquet"
    assert _import_cli("coco", images, gt, "--annotations", ann).exit_code == 0
    want = defaultdict(list)
    for r in read_manifest(gt).to_pylist():
        if r["x0"] is not None:
            want[r["image_id"]].append([r["x0"], r["y0"], r["x1"], r["y1"]])
    assert set(want) == {f"{i:012d}" for i in keep}  # every one of these images has boxes
    res = runner.invoke(app, ["shard", "--images", str(images), "--out", str(tmp_path / "shards"), "--labels", "coco",
                              "--coco-json", str(ann), "--manifest", str(gt), "--num-workers", "1"])
    assert res.exit_code == 0, res.output
    got = {}
    for tar in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    got[meta["image_id"]] = meta["boxes"]
    assert set(got) == set(want)
    for iid, boxes in want.items():
        np.testing.assert_allclose(np.reshape(got[iid], (-1, 4)), boxes, atol=1e-3, err_msg=iid)


def _broken_coco(coco_tiny: Path, tmp_path: Path, mutate) -> tuple[Path, dict]:
    """A copy of the real train2017 JSON with `mutate(data)` applied: real data around one broken entry."""
    data = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    mutate(data)
    path = tmp_path / "instances_broken.json"
    path.write_text(json.dumps(data))
    return path, data


def _import_coco_cli(coco_tiny: Path, ann: Path, out: Path, *extra: str):
    return runner.invoke(app, ["import-boxes", "--format", "coco", "--images", str(coco_tiny / "train2017"),
                               "--annotations", str(ann), "--out", str(out), *extra])


def _drop(key):
    return lambda entry, data: entry.pop(key)


def _set(key, value):
    return lambda entry, data: entry.__setitem__(key, value)


def _hw(ann, data):
    """[height, width] of the image of an annotation: the RLE `size` that fits it."""
    img = next(im for im in data["images"] if im["id"] == ann["image_id"])
    return [img["height"], img["width"]]


# (section, index, change to that entry, extra flags, expected problem): each used to end in a raw traceback
# (ValueError, KeyError) or in an error that did not say which entry was wrong
BROKEN_COCO = [
    ("annotations", 17, _set("bbox", [1, 2, 3]), (), "bbox must be 4 numbers [x, y, w, h], got [1, 2, 3]"),
    ("annotations", 17, _set("bbox", [1, "a", 3, 4]), (), "bbox must be 4 numbers [x, y, w, h], got [1, 'a', 3, 4]"),
    ("annotations", 17, _drop("category_id"), (), "missing key(s) 'category_id'"),
    ("annotations", 17, _drop("image_id"), (), "missing key(s) 'image_id'"),
    ("annotations", 17, _set("segmentation", {"size": [1, 2]}), ("--from-segmentation",),
     "segmentation RLE: missing key(s) 'counts'"),
    ("annotations", 17, _set("segmentation", "abc"), ("--from-segmentation",),
     "segmentation is not a polygon list or RLE, got 'abc'"),
    # a NaN or far-out polygon point made pycocotools rasterise ~22 GB (OOM-killed); an RLE whose size or runs do
    # not fit the image was decoded past its buffer or gave a box of another image
    ("annotations", 17, _set("segmentation", [[10, 10, 20, 10, float("nan"), 20]]), ("--from-segmentation",),
     "segmentation polygon 0: nan is not a finite number"),
    ("annotations", 17, _set("segmentation", [[10, 10, 20, 10, 20, 1e9]]), ("--from-segmentation",),
     "segmentation polygon 0: point (20, 1000000000.0) is outside the"),
    ("annotations", 17, _set("segmentation", [[10, 10, 20, 10, 20]]), ("--from-segmentation",),
     "segmentation polygon 0: expected [x1, y1, x2, y2, x3, y3, ...] (an even number, at least 6"),
    ("annotations", 17, _set("segmentation", {"size": [3], "counts": "garbage!!"}), ("--from-segmentation",),
     "segmentation RLE: size [3] is not the image's [height, width]"),
    ("annotations", 17, _set("segmentation", {"size": [10, 10], "counts": [5, 95]}), ("--from-segmentation",),
     "segmentation RLE: size [10, 10] is not the image's [height, width]"),
    ("annotations", 17, lambda e, d: e.__setitem__("segmentation", {"size": _hw(e, d), "counts": [3, 4]}),
     ("--from-segmentation",), "segmentation RLE: the runs cover 7 pixels, the image has"),
    ("annotations", 17, lambda e, d: e.__setitem__("segmentation", {"size": _hw(e, d), "counts": "0T3"}),
     ("--from-segmentation",), "segmentation RLE: the runs cover 100 pixels, the image has"),  # a 10x10 mask
    ("annotations", 17, lambda e, d: e.__setitem__("segmentation", {"size": _hw(e, d), "counts": "bad!"}),
     ("--from-segmentation",), "segmentation RLE: counts 'bad!' is not a compressed COCO RLE string"),
    ("images", 3, _drop("file_name"), (), "missing key(s) 'file_name'"),
    ("images", 3, _drop("width"), (), "missing key(s) 'width'"),
    ("images", 3, _set("height", "tall"), (), "height must be a positive integer up to 2147483647, got 'tall'"),
    # too large for the manifest's int32 column: was a pyarrow ArrowInvalid traceback when writing
    ("images", 3, _set("width", 10**10), (), "width must be a positive integer up to 2147483647, got 10000000000"),
    ("images", 1, lambda e, d: e.__setitem__("id", d["images"][0]["id"]), (), "duplicate id (also images[index 0])"),
]


@pytest.mark.parametrize("section, k, change, extra, problem", BROKEN_COCO,
                         ids=[f"{c[0]}-{c[4][:28]}" for c in BROKEN_COCO])
def test_coco_malformed_entry_is_one_error_line_naming_file_and_entry(coco_tiny, tmp_path, section, k, change,
                                                                      extra, problem):
    ann, data = _broken_coco(coco_tiny, tmp_path, lambda d: change(d[section][k], d))
    res = _import_coco_cli(coco_tiny, ann, tmp_path / "m.parquet", *extra)
    # an uncaught exception gives exit code 1 and res.exception set to it; fail() gives 2 and SystemExit
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert "Traceback" not in res.output and not (tmp_path / "m.parquet").exists()
    where = f"{section}[index {k}, id={data[section][k]['id']}]"
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ann}: {where}: {problem}"), res.output


def test_unwritable_out_is_one_line_before_reading(coco_tiny, unwritable_outs):
    """A file as the parent folder, /proc, or an existing folder with --overwrite ended in a traceback (the last
    after the import, leaving a temporary file next to it)."""
    for out in unwritable_outs("m.parquet"):
        r = _import_coco_cli(coco_tiny, coco_tiny / "annotations" / "instances_train2017.json", out, "--overwrite")
        assert r.exit_code == 2 and f"error: --out {out}: " in r.output, r.output


def test_coco_annotation_of_unknown_image_is_counted(coco_tiny, tmp_path):
    def orphan(data):  # an image_id that no image has (the real file has no such annotation)
        data["annotations"][17]["image_id"] = max(im["id"] for im in data["images"]) + 1

    ann, data = _broken_coco(coco_tiny, tmp_path, orphan)
    ids = {im["id"] for im in data["images"]}
    n_orphans = sum(a["image_id"] not in ids for a in data["annotations"])
    assert n_orphans == 1 and not data["annotations"][17]["iscrowd"]  # so it would otherwise have been a box
    res = _import_coco_cli(coco_tiny, ann, tmp_path / "m.parquet")
    assert res.exit_code == 0, res.output
    assert "not turned into boxes: {" in res.output and "'dropped_image_id_not_in_images': 1" in res.output
    full = import_coco(coco_tiny / "train2017", coco_tiny / "annotations" / "instances_train2017.json")
    got = import_coco(coco_tiny / "train2017", ann)
    # one box fewer, and that one is accounted for rather than lost
    assert got.counts["boxes"] == full.counts["boxes"] - 1 and got.counts["dropped_image_id_not_in_images"] == 1
    assert full.counts["dropped_image_id_not_in_images"] == 0


def test_coco8_yolo_labels(shared, tmp_path):
    root = shared / "data" / "coco8" / "images"
    res = import_yolo(root)
    t = res.table.to_pandas()
    labels = sorted((shared / "data" / "coco8" / "labels").rglob("*.txt"))
    lines = [(p, ln.split()) for p in labels for ln in p.read_text().splitlines() if ln.strip()]
    assert len(t) == len(lines) and t.image_id.nunique() == 8
    # every label line, in pixels, is a row of its image
    for p, (c, cx, cy, w, h) in lines:
        rel = p.relative_to(shared / "data" / "coco8" / "labels").with_suffix(".jpg").as_posix()
        W, H = Image.open(root / rel).size
        cx, cy, w, h = float(cx) * W, float(cy) * H, float(w) * W, float(h) * H
        rows = t[(t.path == rel) & (t.category == int(c))]
        d = np.abs(rows[["x0", "y0", "x1", "y1"]].to_numpy() - [max(cx - w / 2, 0), max(cy - h / 2, 0),
                                                                 min(cx + w / 2, W), min(cy + h / 2, H)])
        assert (d.max(axis=1) < 0.01).any(), (rel, c)
    out = write_manifest(res.table, tmp_path / "coco8.parquet", res.metadata)
    assert validate_manifest(out) == []


def test_yolo_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.jpg")
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "b.jpg")  # no label file: a no-box row
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 oops 0.1 0.1\n")
    res = runner.invoke(app, ["import-boxes", "--format", "yolo", "--images", str(tmp_path / "images"),
                              "--out", str(tmp_path / "m.parquet")])
    assert res.exit_code == 2 and f"{tmp_path / 'labels' / 'a.txt'}:2" in res.output
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    t = import_yolo(tmp_path / "images").table.to_pandas()
    assert len(t) == 2 and t.x0.isna().sum() == 1 and t.loc[t.x0.notna(), "x1"].item() == pytest.approx(12.0)


def test_tiny_imagenet_subset(tiny_imagenet):
    res = import_tiny_imagenet(tiny_imagenet)
    t = res.table.to_pandas()
    val_lines = (tiny_imagenet / "val" / "val_annotations.txt").read_text().split("\n")
    n_val = sum(1 for ln in val_lines if ln.strip())
    n_train = sum(len([ln for ln in f.read_text().splitlines() if ln.strip()])
                  for f in (tiny_imagenet / "train").glob("*/*_boxes.txt"))
    assert len(t) == n_train + n_val == 12000 and t.image_id.is_unique
    assert t.x0.notna().all() and (t.x1 <= 64).all() and (t.x0 >= 0).all()
    wnids = sorted((tiny_imagenet / "wnids.txt").read_text().split())
    assert res.metadata["classes"] == wnids and set(t.category) <= set(range(200))
    # val_0.JPEG  n03444034  0 32 44 62  (inclusive) -> (0, 32, 45, 63), class index of n03444034
    v = t[t.image_id == "val_0"].iloc[0]
    assert (v.x0, v.y0, v.x1, v.y1) == (0, 32, 45, 63) and v.category == wnids.index("n03444034")
    tr = t[t.image_id == "n01443537_0"].iloc[0]
    assert (tr.x0, tr.y0, tr.x1, tr.y1, tr.category) == (0, 10, 64, 59, wnids.index("n01443537"))


VOC = """<annotation>
  <folder>{folder}</folder><filename>{stem}</filename>
  <source><database>ILSVRC_2012</database></source>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <segmented>0</segmented>
{objects}</annotation>
"""
OBJ = """  <object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>
"""


def _ilsvrc_fixture(root: Path):
    """ILSVRC layout: Data/CLS-LOC/{train/<wnid>/<wnid>_<n>.JPEG, val/ILSVRC2012_val_*.JPEG} and
    Annotations/CLS-LOC/{train/<wnid>/*.xml, val/*.xml} in the official VOC format."""
    data, ann = root / "Data" / "CLS-LOC", root / "Annotations" / "CLS-LOC"
    imgs = {"train/n01440764/n01440764_10026.JPEG": (500, 375,
                                                     [("n01440764", 1, 1, 250, 200), ("n01440764", 200, 100, 500, 375)]),
            "train/n01440764/n01440764_10027.JPEG": (300, 200, None),  # no XML: a no-box row
            "train/n02102040/n02102040_7.JPEG": (320, 240, [("n02102040", 11, 21, 100, 120)]),
            "val/ILSVRC2012_val_00000001.JPEG": (400, 300, [("n02102040", 5, 6, 400, 300)])}
    for rel, (w, h, objs) in imgs.items():
        p = data / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 120, 30)).save(p, "JPEG")
        if objs is not None:
            x = (ann / rel).with_suffix(".xml")
            x.parent.mkdir(parents=True, exist_ok=True)
            objects = "".join(OBJ.format(name=n, x0=a, y0=b, x1=c, y1=d) for n, a, b, c, d in objs)
            x.write_text(VOC.format(folder=rel.split("/")[-2], stem=p.stem, w=w, h=h, objects=objects))
    return data, ann


def test_ilsvrc_xml_fixtures(tmp_path):
    data, ann = _ilsvrc_fixture(tmp_path)
    out = tmp_path / "in1k.parquet"
    res = runner.invoke(app, ["import-boxes", "--format", "imagenet", "--images", str(data), "--annotations",
                              str(ann), "--out", str(out)])
    assert res.exit_code == 0, res.output
    t = read_manifest(out).to_pandas()
    assert len(t) == 5 and t.image_id.nunique() == 4
    fish = t[t.image_id == "n01440764_10026"].sort_values("x0")
    assert fish[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [[0, 0, 250, 200], [199, 99, 500, 375]]
    assert (fish.category == 0).all()
    nobox = t[t.image_id == "n01440764_10027"].iloc[0]
    assert np.isnan(nobox.x0) and (nobox.width, nobox.height) == (300, 200) and not isinstance(nobox.error, str)
    val = t[t.image_id == "ILSVRC2012_val_00000001"].iloc[0]
    assert (val.x0, val.y0, val.x1, val.y1, val.category) == (4, 5, 400, 300, 1)
    assert manifest_metadata(out)["classes"] == ["n01440764", "n02102040"]
    assert validate_manifest(out) == []
    assert "no-box images 1" in res.output


def test_ilsvrc_malformed_xml_names_the_file(tmp_path):
    data, ann = _ilsvrc_fixture(tmp_path)
    bad = ann / "val" / "ILSVRC2012_val_00000001.xml"
    bad.write_text(bad.read_text().replace("<xmax>400</xmax>", "<xmax>four</xmax>"))
    with pytest.raises(AnnotationError, match=r"ILSVRC2012_val_00000001\.xml: object\[0\]/bndbox/xmax"):
        import_imagenet(data, ann)


def test_import_refuses_to_overwrite(coco_tiny, tmp_path):
    out = tmp_path / "m.parquet"
    out.write_bytes(b"x")
    res = runner.invoke(app, ["import-boxes", "--format", "tiny-imagenet", "--images", str(coco_tiny),
                              "--out", str(out)])
    assert res.exit_code == 2 and "exists" in res.output


# ---- malformed sizes, non-finite boxes, files that are not UTF-8 ----------------------------------------------------

def _import_cli(fmt: str, images: Path, out: Path, *extra):
    return runner.invoke(app, ["import-boxes", "--format", fmt, "--images", str(images), "--out", str(out),
                               *map(str, extra)])


def _one_error_line(res, *parts: str) -> str:
    """The CLI stopped with one `error:` line (no traceback, exit 2) holding every part."""
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(p in lines[0] for p in parts), res.output
    return lines[0]


@pytest.mark.parametrize("key, text", [("width", "nan"), ("width", "1e12"), ("width", "-64"), ("height", "0"),
                                       ("height", "12.5")])
def test_ilsvrc_bad_image_size_stops_naming_the_file(tmp_path, key, text):
    """nan was a ValueError traceback, 1e12 a pyarrow ArrowInvalid one; -64 x 0 was written (exit 0) and then broke
    `stats` and `show boxes`."""
    data, ann = _ilsvrc_fixture(tmp_path)
    bad = ann / "val" / "ILSVRC2012_val_00000001.xml"
    bad.write_text(re.sub(rf"<{key}>\d+</{key}>", f"<{key}>{text}</{key}>", bad.read_text()))
    out = tmp_path / "m.parquet"
    _one_error_line(_import_cli("imagenet", data, out, "--annotations", ann), f"{bad}: size/{key}: expected a "
                    "positive integer")
    assert not out.exists()


def _tiny_fixture(root: Path, train_lines: list[str], val_lines: list[str]) -> Path:
    """A tiny-imagenet-200 layout with two classes, two 64x64 train images each and two val images."""
    wnids = ["n01443537", "n01629819"]
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (10 * i, 80, 20)).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text(
            "".join(ln + "\n" for ln in train_lines if ln.startswith(w)))
    (root / "val" / "images").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64)).save(root / "val" / "images" / f"val_{i}.JPEG")
    (root / "val" / "val_annotations.txt").write_text("".join(ln + "\n" for ln in val_lines))
    return root


TINY_TRAIN = ["n01443537_0.JPEG\t0\t10\t63\t58", "n01443537_1.JPEG\t5\t5\t20\t20",
              "n01629819_0.JPEG\t1\t2\t30\t40", "n01629819_1.JPEG\t3\t3\t9\t9"]
TINY_VAL = ["val_0.JPEG\tn01443537\t0\t32\t44\t62", "val_1.JPEG\tn01629819\t1\t1\t10\t10"]


def test_tiny_imagenet_bad_boxes_are_counted_and_missing_images_are_error_rows(tmp_path):
    """A NaN box and an inverted one silently became no-box rows, uncounted; a box line naming a missing image was
    ignored although an error row is promised."""
    train = [TINY_TRAIN[0], "n01443537_1.JPEG\tnan\t5\t20\t20", "n01629819_0.JPEG\t30\t2\t1\t40", TINY_TRAIN[3],
             "n01629819_7.JPEG\t1\t1\t5\t5"]  # no such image
    root = _tiny_fixture(tmp_path / "tin", train, TINY_VAL)
    res = import_tiny_imagenet(root)
    c = res.counts
    assert (c["dropped_not_finite"], c["dropped_empty"], c["missing_files"], c["boxes"]) == (1, 1, 1, 4)
    t = res.table.to_pandas().set_index("image_id")
    assert np.isnan(t.loc["n01443537_1", "x0"]) and np.isnan(t.loc["n01629819_0", "x0"])
    missing = t.loc["n01629819_7"]
    assert missing.path == "train/n01629819/images/n01629819_7.JPEG" and "file not found" in missing.error
    out = write_manifest(res.table, tmp_path / "m.parquet", res.metadata)
    assert validate_manifest(out) == []
    cli = _import_cli("tiny-imagenet", root, tmp_path / "cli.parquet")
    assert cli.exit_code == 0 and "'dropped_not_finite': 1" in cli.output and "'missing_files': 1" in cli.output


def test_yolo_and_ilsvrc_non_finite_boxes_have_their_own_count(tmp_path):
    """NaN coordinates were counted as `dropped_empty`, as if the box had been clipped away."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "labels" / "a.txt").write_text("0 nan 0.5 0.2 0.2\n1 0.5 0.5 inf 0.1\n2 1.5 1.5 0.1 0.1\n"
                                               "3 0.5 0.5 0.2 0.2\n")
    c = import_yolo(tmp_path / "images").counts
    assert (c["dropped_not_finite"], c["dropped_empty"], c["boxes"]) == (2, 1, 1)
    data, ann = _ilsvrc_fixture(tmp_path / "in")
    x = ann / "val" / "ILSVRC2012_val_00000001.xml"
    x.write_text(x.read_text().replace("<ymin>6</ymin>", "<ymin>nan</ymin>"))
    c = import_imagenet(data, ann).counts
    assert c["dropped_not_finite"] == 1 and c["dropped_empty"] == 0


LATIN1 = "café n°1".encode("latin-1")


@pytest.mark.parametrize("which", ["yolo label", "tiny boxes", "tiny wnids"])
def test_annotation_text_that_is_not_utf8_stops_naming_the_file(tmp_path, which):
    """Each was a UnicodeDecodeError traceback."""
    if which == "yolo label":
        (tmp_path / "images").mkdir()
        (tmp_path / "labels").mkdir()
        Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.jpg")
        bad = tmp_path / "labels" / "a.txt"
        bad.write_bytes(b"0 0.5 0.5 0.2 0.2 # " + LATIN1 + b"\n")
        res = _import_cli("yolo", tmp_path / "images", tmp_path / "m.parquet")
    else:
        root = _tiny_fixture(tmp_path / "tin", TINY_TRAIN, TINY_VAL)
        bad = root / ("train/n01443537/n01443537_boxes.txt" if which == "tiny boxes" else "wnids.txt")
        bad.write_bytes(bad.read_bytes() + LATIN1 + b"\n")
        res = _import_cli("tiny-imagenet", root, tmp_path / "m.parquet")
    _one_error_line(res, f"{bad}: not UTF-8 text")
    assert not (tmp_path / "m.parquet").exists()


def test_yolo_file_name_that_is_not_utf8_is_one_line(tmp_path):
    """A UnicodeEncodeError traceback from image_id_for; shard and extract-boxes say it in one line."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "ok.jpg")
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name on a UTF-8 file system
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / name, "JPEG")
    res = _import_cli("yolo", tmp_path / "images", tmp_path / "m.parquet")
    _one_error_line(res, "caf", "surrogates not allowed")
    assert not (tmp_path / "m.parquet").exists()
