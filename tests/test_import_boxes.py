"""Ground-truth import: COCO (bbox, masks, crowd), YOLO txt (coco8), Tiny-ImageNet, ILSVRC XML fixtures.
Expected values are computed independently from the annotation files."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from odis.importers import AnnotationError, import_coco, import_imagenet, import_tiny_imagenet, import_yolo
from odis.manifest import manifest_metadata, read_manifest, validate_manifest, write_manifest

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


# (section, index, change to that entry, extra flags, expected problem): each used to end in a raw traceback
# (ValueError, KeyError) or in an error that did not say which entry was wrong
BROKEN_COCO = [
    ("annotations", 17, _set("bbox", [1, 2, 3]), (), "bbox must be 4 numbers [x, y, w, h], got [1, 2, 3]"),
    ("annotations", 17, _set("bbox", [1, "a", 3, 4]), (), "bbox must be 4 numbers [x, y, w, h], got [1, 'a', 3, 4]"),
    ("annotations", 17, _drop("category_id"), (), "missing key(s) 'category_id'"),
    ("annotations", 17, _drop("image_id"), (), "missing key(s) 'image_id'"),
    ("annotations", 17, _set("segmentation", {"size": [1, 2]}), ("--from-segmentation",),
     "segmentation is not a polygon list or RLE"),
    ("images", 3, _drop("file_name"), (), "missing key(s) 'file_name'"),
    ("images", 3, _drop("width"), (), "missing key(s) 'width'"),
    ("images", 3, _set("height", "tall"), (), "height must be a positive integer, got 'tall'"),
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
