"""Files from others, through every command that can reach them (the corpus: tests/badinputs.py).

Asserts the accounting, not just the exit code: every input image is a box row, a no-box row, an error row or
left out by name; every sample is stored or skipped by name; every manifest row is a used box or a counted one;
decoded pixels equal the reference decode; no command runs and no file appears outside the output folders."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import badinputs as B
from odis.cli import app
from odis.imageio import decode_rgb
from odis.image_ids import image_id_for
from odis.manifest import SCHEMA, make_metadata, read_manifest, write_manifest
from odis.manifest_boxes import read_box_rows
from odis.names import UnsafeName
from odis.shards import _load_index_json, iter_samples, list_shards

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["model.arch=vit_tiny_patch16_224", "model.patch_size=8", "model.depth=1", "model.out_dim=64",
         "model.hidden_dim=64", "model.bottleneck_dim=32", "data.global_size=32", "data.local_size=16",
         "data.n_local=2", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=16", "optim.epochs=1",
         "optim.warmup_epochs=0", "log_every=1", "device=cpu"]


def odis(*args, ok: bool = True):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    else:
        assert r.exit_code != 0 and not isinstance(r.exception, (AssertionError, TypeError, KeyError, IndexError,
                                                                 AttributeError)), r.output + repr(r.exception)
    return r


def train(shards, out, *extra, ok=True):
    return odis("train", "--shards", shards, "--out", out, "--quiet", *TRAIN, *extra, ok=ok)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, coco_tiny, ray_local, yolo320):
    """The image corpus, its extract-boxes manifest and its shards (the real commands)."""
    root = tmp_path_factory.mktemp("bad")
    ref = B.image_corpus(root / "imgs", sorted((coco_tiny / "val2017").glob("*.jpg"))[0])
    listing = sorted(os.listdir(os.fsencode(root / "imgs")))
    ex = odis("extract-boxes", "--detector", "yolo", "--weights", yolo320, "--imgsz", 320, "--images",
              root / "imgs", "--out", root / "m", "--batch-size", 8, "--quiet")
    sh = odis("shard", "--images", root / "imgs", "--out", root / "sh", "--labels", "none", "--manifest", root / "m")
    return {"root": root, "ref": ref, "extract": ex.output, "shard": sh.output, "listing": listing}


def test_every_image_is_a_row_or_left_out_by_name(corpus):
    root, ref = corpus["root"], corpus["ref"]
    t = read_manifest(root / "m").to_pandas()
    assert set(t.path) == set(ref)  # every image, and nothing else
    for name, pixels in ref.items():
        rows = t[t.path == name]
        if pixels is None:
            assert len(rows) == 1 and rows.x0.isna().all(), name
            assert rows.error.iloc[0].startswith(f"{name}: {B.ERRORS[name]}"), rows.error.iloc[0]
        else:
            assert rows.error.isna().all() and (rows.width.iloc[0], rows.height.iloc[0]) == pixels.shape[1::-1], name
    for name in (*B.LEFT_OUT, "sub/up", "\\xffbad.jpg"):
        assert f"  {name}: " in corpus["extract"], name
    # the shards: stored or skipped by name, the listing's left-outs as warnings, the manifest's rows counted
    index = json.loads((root / "sh" / "index.json").read_text())
    stored = {s.meta["image_id"] for s in iter_samples(root / "sh")}
    ids = {image_id_for(n): n for n in ref}
    assert {ids[i] for i in stored} == {n for n, p in ref.items() if p is not None}
    assert {x["path"] for x in index["skipped"]} == set(B.ERRORS)
    assert {x["path"] for x in index["warnings"]} >= {*B.LEFT_OUT, "sub/up", "\\xffbad.jpg"}
    c = index["boxes"]
    assert c["rows"] == len(t) and c["error_rows"] == 4
    assert c["rows"] == sum(c[k] for k in ("duplicate_rows_dropped", "error_rows", "no_box_rows", "used",
                                           "dropped_not_finite", "dropped_empty"))
    assert not (REPO / "PWNED").exists()
    # nothing was written into the input folder (the commands write only under their --out)
    assert sorted(os.listdir(os.fsencode(root / "imgs"))) == corpus["listing"]


def test_decoded_pixels_equal_the_reference(corpus):
    """16-bit, CMYK, palette, alpha and every EXIF orientation: the one decoder gives the reference pixels, from the
    file and from its shard sample (the trainer and the evaluators decode samples with it)."""
    root, ref = corpus["root"], corpus["ref"]
    samples = {s.meta["image_id"]: s for s in iter_samples(root / "sh")}
    for name in B.GOOD_DECODES:
        arr, size = decode_rgb(root / "imgs" / name)
        assert arr.dtype == np.uint8 and arr.shape == ref[name].shape and (arr == ref[name]).all(), name
        stored, _ = decode_rgb(samples[image_id_for(name)].image)
        diff = np.abs(stored.astype(int) - ref[name].astype(int)).mean()
        # rotated JPEGs are stored upright, re-encoded at quality >= 95; the others as they came
        assert stored.shape == ref[name].shape and diff < (3 if name.startswith("exif") else 1e-9), (name, diff)
    g16, _ = decode_rgb(samples[image_id_for("gray16.png")].image)
    assert abs(g16.mean() - 127.5) < 1  # the finding: clipped, it reached the model with mean 254


def test_train_and_eval_account_for_every_box_and_sample(corpus, tmp_path):
    root = corpus["root"]
    train(root / "sh", tmp_path / "run", "--boxes", root / "m", "max_steps=2")
    boxes = json.loads((tmp_path / "run" / "boxes.json").read_text())
    index = json.loads((root / "sh" / "index.json").read_text())
    assert boxes["manifest_rows"] == {k: v for k, v in index["boxes"].items() if k != "images_not_under_root"}
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["samples"] == 8 and data["bad_samples"] == 0


# ---- manifests ------------------------------------------------------------------------------------------------

def _manifest(path: Path, rows: list[tuple], meta: bool = True) -> Path:
    """rows: (image_id, path, w, h, x0, y0, x1, y1); None coordinates are null."""
    cols = {n: [] for n in SCHEMA.names}
    for iid, p, w, h, *box in rows:
        for k, v in zip(("image_id", "path", "width", "height", "x0", "y0", "x1", "y1"), (iid, p, w, h, *box)):
            cols[k].append(v)
        cols["score"].append(0.9)
        cols["category"].append(None)
        cols["source"].append("yolo")
        cols["error"].append(None)
    table = pa.table(cols, schema=SCHEMA)
    if meta:
        return write_manifest(table, path, make_metadata("yolo", None, "path"))
    pq.write_table(table.replace_schema_metadata(None), path)
    return path


@pytest.fixture(scope="module")
def good_shards(corpus):
    """The corpus's twelve plain images in two class folders, sharded alone (ids by path)."""
    root = corpus["root"]
    if not (root / "good").exists():
        for i in range(12):
            (root / "good" / _good(i)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "imgs" / f"good_{i:02d}.jpg", root / "good" / _good(i))
        odis("shard", "--images", root / "good", "--out", root / "good-sh", "--labels", "folder")
    return root / "good-sh"


@pytest.fixture(scope="module")
def backbone(good_shards):
    """A one-step run on the good shards: a backbone for the evaluators."""
    out = good_shards.parent / "run-1"
    if not (out / "backbone.safetensors").exists():
        train(good_shards, out, "max_steps=1")
    return out


def _good(i: int) -> str:
    return f"{'ab'[i // 6]}/good_{i:02d}.jpg"


def _box_rows(i: int) -> list[tuple]:
    n = _good(i)
    return [(image_id_for(n), n, 96, 72, *b) for b in
            ([10, 10, 50, 40], [-5, 0, 120, 80], [float("nan"), 0, 5, 5], [0, 0, float("inf"), 5],
             [0, float("-inf"), 5, 5], [20, 20, 20, 30], [None] * 4)]


def test_bad_boxes_are_used_clipped_or_counted_the_same_everywhere(good_shards, tmp_path):
    rows = [r for i in range(12) for r in _box_rows(i)]
    m = _manifest(tmp_path / "m.parquet", rows + rows[:3])  # 3 exact duplicate rows
    c = read_box_rows(m).counts
    assert c == {"rows": 87, "duplicate_rows_dropped": 3, "error_rows": 0, "no_box_rows": 12, "used": 24,
                 "clipped": 12, "dropped_not_finite": 36, "dropped_empty": 12}
    assert odis("stats", m, ok=False).exit_code == 1  # NaN and out-of-bounds rows are violations there
    sh = odis("shard", "--images", good_shards.parent / "good", "--out", tmp_path / "sh", "--labels", "none",
              "--manifest", m)
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert {k: v for k, v in index["boxes"].items() if k != "images_not_under_root"} == c
    assert "dropped_not_finite 36" in sh.output and "clipped 12" in sh.output
    assert all(len(s.meta["boxes"]) == 2 for s in iter_samples(tmp_path / "sh"))
    for s in iter_samples(tmp_path / "sh"):
        assert [0, 0, 96, 72] in [[round(v) for v in b] for b in s.meta["boxes"]]  # the clipped one
    r = train(good_shards, tmp_path / "run", "--boxes", m, "max_steps=1")
    assert json.loads((tmp_path / "run" / "boxes.json").read_text())["manifest_rows"] == c
    assert "dropped_not_finite': 36" in r.output
    odis("eval", "knn", "--backbone", tmp_path / "run", "--train", good_shards, "--val", good_shards, "--boxes", m,
         "--boxes-mode", "mask", "--k", "3", "--workers", "0", "--device", "cpu", "--out", tmp_path / "knn.json")
    assert json.loads((tmp_path / "knn.json").read_text())


def test_one_id_for_two_images_is_refused_where_the_manifest_is_used(good_shards, backbone, tmp_path):
    a, b = _good(0), _good(1)
    m = _manifest(tmp_path / "m.parquet", [(image_id_for(a), a, 96, 72, 1, 1, 9, 9),
                                           (image_id_for(a), b, 96, 72, 2, 2, 9, 9)])
    for r in (odis("stats", m, ok=False),
              odis("shard", "--images", good_shards.parent / "good", "--out", tmp_path / "sh", "--labels", "none",
                   "--manifest", m, ok=False),
              train(good_shards, tmp_path / "run", "--boxes", m, "max_steps=1", ok=False),
              odis("eval", "knn", "--backbone", backbone, "--train", good_shards, "--val", good_shards,
                   "--boxes", m, "--device", "cpu", "--workers", "0", ok=False)):
        assert "names two different images" in r.output and a in r.output and b in r.output, r.output
    assert not (tmp_path / "sh" / "index.json").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["missing-column", "not-parquet"])
def test_broken_manifests_are_one_error_naming_the_file(good_shards, tmp_path, kind):
    m = tmp_path / "m.parquet"
    if kind == "missing-column":
        pq.write_table(pa.table({"image_id": ["a"], "path": ["a.jpg"]}), m)
    else:
        m.write_text("image_id,path\n")
    for r in (odis("stats", m, ok=False), train(good_shards, tmp_path / "run", "--boxes", m, ok=False),
              odis("shard", "--images", good_shards.parent / "good", "--out", tmp_path / "sh", "--labels", "none",
                   "--manifest", m, ok=False)):
        assert str(m) in r.output and "Traceback" not in r.output, r.output


def test_a_pandas_round_trip_reads_as_the_original(tmp_path):
    m = _manifest(tmp_path / "m.parquet", _box_rows(0))
    read_manifest(m).to_pandas().to_parquet(tmp_path / "p.parquet")
    assert read_box_rows(tmp_path / "p.parquet").counts == read_box_rows(m).counts
    assert "metadata" in odis("stats", tmp_path / "p.parquet", ok=False).output


# ---- COCO JSON --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("images, ann, why", [
    ([(1, "a/good_00.jpg", 96, 72)], {"bbox": [1, 2, 3]}, "bbox must be 4 numbers"),
    ([(1, "a/good_00.jpg", 96, 72)], {"bbox": [float("nan"), 2, 3, 4]}, "bbox must be 4 numbers"),
    ([(1, "a/good_00.jpg", 96, 72), (1, "a/good_01.jpg", 96, 72)], {"bbox": [1, 2, 3, 4]}, "duplicate id"),
    ([(1, "a/../../good_00.jpg", 96, 72)], {"bbox": [1, 2, 3, 4]}, "leaves its folder"),
    ([(1, "/etc/passwd", 96, 72)], {"bbox": [1, 2, 3, 4]}, "is absolute"),
])
def test_coco_json_from_others(good_shards, tmp_path, images, ann, why):
    ann_path = tmp_path / "a.json"
    ann_path.write_text(B.coco_json(images, [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, **ann}]))
    r = odis("import-boxes", "--format", "coco", "--images", good_shards.parent / "good", "--annotations",
             ann_path, "--out", tmp_path / "m.parquet", ok=False)
    assert why in r.output and str(ann_path) in r.output and not (tmp_path / "m.parquet").exists(), r.output


def test_coco_annotation_of_an_unknown_image_is_counted(good_shards, tmp_path):
    ann_path = tmp_path / "a.json"
    ann_path.write_text(B.coco_json([(1, "a/good_00.jpg", 96, 72)], [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [1, 2, 30, 40]},
        {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [1, 2, 30, 40]},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [80, 60, 50, 50]}]))
    r = odis("import-boxes", "--format", "coco", "--images", good_shards.parent / "good", "--annotations",
             ann_path, "--out", tmp_path / "m.parquet")
    assert "dropped_image_id_not_in_images': 1" in r.output and "clipped to the image: 1" in r.output


# ---- shard sets -------------------------------------------------------------------------------------------------

def _copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["pipe:touch PWNED;cat x-000000.tar", "https:x-000000.tar", "/tmp/x-000000.tar",
                                  "../x-000000.tar", ".hidden.tar", "a\\b.tar"])
def test_index_names_never_run_or_leave_the_folder(good_shards, backbone, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    s = _copy_set(good_shards, tmp_path / "s")
    index = json.loads((s / "index.json").read_text())
    index["shards"][0]["name"] = name
    (s / "index.json").write_text(json.dumps(index))
    for r in (train(s, tmp_path / "run", "max_steps=1", ok=False), odis("verify", s, ok=False),
              odis("eval", "knn", "--backbone", backbone, "--train", s, "--val", s, "--device", "cpu", ok=False),
              odis("show", "views", "--shards", s, "--key", "x", "--out", tmp_path / "v.png", ok=False)):
        assert "shards[0].name" in r.output and "not a plain file name" in r.output, r.output
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()
    with pytest.raises(UnsafeName):
        list_shards(s)


def test_a_shard_file_named_like_a_command_is_refused(good_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = tmp_path / "s"
    s.mkdir()
    shutil.copy(next(good_shards.glob("*.tar")), s / "pipe:touch PWNED;cat a.tar.tar")
    r = train(s, tmp_path / "run", "max_steps=1", ok=False)
    assert "not a plain file name" in r.output and not list(tmp_path.rglob("PWNED"))
    monkeypatch.chdir(s)  # the folder typed as "." : its names are still never URLs
    assert "not a plain file name" in train(".", tmp_path / "run", "max_steps=1", ok=False).output
    assert not list(tmp_path.rglob("PWNED"))


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # what unpickling this does: a shell command
        return (os.system, (f"touch '{self.path}'",))


def test_yolo_weights_that_run_code_are_refused(coco_tiny, ray_local, tmp_path, monkeypatch):
    """ultralytics unpickles a .pt file whole by default; odis loads it with weights_only and ultralytics'
    allow-list of model classes, so the pickle's command never runs."""
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({"model": _RunsCode(tmp_path / "PWNED")}, tmp_path / "yolo_evil.pt")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(sorted((coco_tiny / "val2017").glob("*.jpg"))[0], imgs / "a.jpg")
    r = odis("extract-boxes", "--detector", "yolo", "--weights", tmp_path / "yolo_evil.pt", "--images", imgs,
             "--out", tmp_path / "m.parquet", "--quiet", ok=False)
    assert "cannot load the yolo detector" in r.output and "nothing was written" in r.output, r.output
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "m.parquet").exists()


def test_a_truncated_tar_counts_every_lost_sample(corpus, tmp_path):
    root = corpus["root"]
    s = tmp_path / "s"
    odis("shard", "--images", root / "imgs", "--out", s, "--labels", "none", "--max-samples", "9")
    index = json.loads((s / "index.json").read_text())
    tar0 = s / index["shards"][0]["name"]
    offsets = __import__("odis.tarscan", fromlist=["x"]).sample_offsets(tar0)
    tar0.write_bytes(tar0.read_bytes()[: offsets[3] + 700])  # samples 3.. of the first shard are lost
    lost = index["shards"][0]["count"] - 3
    steps = (index["num_samples"] - lost) // 4
    r = train(s, tmp_path / "run", f"max_steps={steps}", "data.epoch_samples=" + str(index["num_samples"]))
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["bad_samples"] >= lost, (data, lost)  # was 1: the tar's error, not the samples it lost
    from odis.eval.features import ViewConfig, extract_features, shard_loader

    class MeanRGB(torch.nn.Module):  # a stand-in backbone: only the reader is under test here
        def forward(self, x, obj_mask=None):
            return (x.mean(dim=(2, 3)),)

    f = extract_features(MeanRGB(), shard_loader(str(s), ViewConfig("none", 32, None, 8)), progress=False)
    assert f.counts["errors"] + len(f.image_ids) == index["num_samples"] and f.counts["errors"] >= lost
    v = odis("verify", s, ok=False)
    assert "unreadable" in v.output and index["shards"][0]["name"] in v.output
    (s / index["shards"][1]["name"]).unlink()
    assert "missing" in odis("verify", s, ok=False).output
    assert r.exit_code == 0


def test_tar_members_that_try_to_leave_the_folder_are_counted_never_used(good_shards, tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    good = list(iter_samples(good_shards))
    members = []
    for k, smp in enumerate(good[:8]):
        key = {0: "../evil", 1: "/abs/evil", 2: "a/b"}.get(k, smp.key)
        meta = dict(smp.meta, image_id=key)
        if k == 3:  # the shard's own boxes, checked as a manifest's: one clipped, two dropped, one used
            w, h = meta["width"], meta["height"]
            meta.update(boxes=[[-5, 0, w + 50, h], [float("nan"), 0, 1, 1], [5, 5, 5, 9], [1, 1, 9, 9]],
                        scores=[1.0] * 4)
        members += [(f"{key}.jpg", smp.image), (f"{key}.json", json.dumps(meta).encode())]
    B.tar_with_members(s / "t-000000.tar", members)
    train(s, tmp_path / "run", "max_steps=1", "data.shuffle_buffer=1")  # file order: the 3 bad, then 4 good
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["bad_samples"] == 3 and data["samples"] == 4
    assert data["json_boxes_clipped"] == 1 and data["json_boxes_dropped"] == 2
    from odis.verify import check_sample
    for key in ("../evil", "/abs/evil", "a/b"):
        assert check_sample(key, {"jpg": b"", "json": b"{}"})[0][0] == "bad-sample"
    assert not (tmp_path / "evil.jpg").exists() and not Path("/abs").exists()
    with tarfile.open(s / "t-000000.tar") as t:
        assert t.getnames()[0] == "../evil.jpg"  # the names really were there


# ---- fuzzing the readers ----------------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)
_index = st.fixed_dictionaries({"format": st.just("odis-shards"), "version": st.just(1),
                                "shards": st.lists(st.dictionaries(st.sampled_from(["name", "count", "sha256"]),
                                                                   _json | st.text(max_size=20)), max_size=3)})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _json.map(lambda j: json.dumps(j).encode()),
                 _index.map(lambda j: json.dumps(j).encode())))
def test_index_reader_gives_a_result_or_one_clean_error(data):
    try:
        index = _load_index_json(data, "fuzz/index.json")
    except ValueError as e:
        assert str(e).startswith("fuzz/index.json"), e
        return
    for sh in index["shards"]:
        assert ":" not in sh["name"] and "/" not in sh["name"] and not sh["name"].startswith(".")


_coord = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), _coord, _coord, _coord, _coord), max_size=12),
       st.binary(max_size=64))
def test_manifest_reader_accounts_for_every_row_or_fails_cleanly(tmp_path, rows, junk):
    m = _manifest(tmp_path / "m.parquet", [(i, f"{i}.jpg", 50, 40, *b) for i, *b in rows])
    c = read_box_rows(m).counts
    assert c["rows"] == len(rows) == sum(c[k] for k in ("duplicate_rows_dropped", "error_rows", "no_box_rows",
                                                          "used", "dropped_not_finite", "dropped_empty"))
    assert c["clipped"] <= c["used"]
    bad = tmp_path / "junk.parquet"
    bad.write_bytes(junk)
    from odis.manifest import ManifestError
    with pytest.raises(ManifestError, match="junk.parquet"):
        read_box_rows(bad)


def test_the_documented_table_is_the_suites():
    page = (REPO / "docs" / "files-from-others.md").read_text()
    assert B.render_table() in page, "docs/files-from-others.md's table differs from tests/badinputs.TABLE"
