"""`odis shard` / `odis verify` on the real data in ../shared, read back with plain webdataset (no odis reader)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from odis.cli import app
from odis.importers import import_coco
from odis.image_ids import image_id_for
from odis.manifest import read_manifest, write_manifest

runner = CliRunner()
TIN_CLASSES = ["n01443537", "n01629819", "n01641577", "n01644900"]  # 4 of 200 classes: 200 images


def odis(*args: str, code: int = 0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, f"odis {' '.join(map(str, args))} -> {r.exit_code}\n{r.output}\n{r.exception!r}"
    return r


def read_plain(folder: Path) -> dict[str, dict]:
    """Every sample of a shard folder through webdataset alone: key -> {ext: bytes, "json": dict}."""
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in out, f"duplicate key {s['__key__']}"
        out[s["__key__"]] = {**s, "json": json.loads(s["json"])}
    return out


def index_of(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


@pytest.fixture(scope="module")
def coco_manifest(coco_tiny, tmp_path_factory) -> Path:
    """coco_tiny train2017 boxes, imported with the project's COCO importer (pycocotools)."""
    imp = import_coco(coco_tiny / "train2017", coco_tiny / "annotations" / "instances_train2017.json")
    return write_manifest(imp.table, tmp_path_factory.mktemp("man") / "coco.parquet", imp.metadata)


@pytest.fixture(scope="module")
def tin_root(tiny_imagenet, tmp_path_factory) -> Path:
    """A Tiny-ImageNet train folder with 4 classes (copies: list_images does not follow symlinked folders)."""
    root = tmp_path_factory.mktemp("tin") / "train"
    for c in TIN_CLASSES:
        shutil.copytree(tiny_imagenet / "train" / c, root / c)
    return root


def manifest_boxes(path: Path) -> dict[str, list]:
    t = read_manifest(path).to_pydict()
    out: dict[str, list] = {}
    for i, iid in enumerate(t["image_id"]):
        out.setdefault(iid, [])
        if t["x0"][i] is not None:
            out[iid].append(([t[c][i] for c in ("x0", "y0", "x1", "y1")], t["score"][i], t["width"][i]))
    return out


def coco_largest_category(coco_tiny: Path) -> tuple[dict[str, str], list[str]]:
    """file stem -> name of the category of its largest non-crowd box (what --labels coco promises)."""
    d = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in d["categories"]}
    best = {}
    for a in d["annotations"]:
        area = a["bbox"][2] * a["bbox"][3]
        if not a["iscrowd"] and area > best.get(a["image_id"], (-1, None))[0]:
            best[a["image_id"]] = (area, names[a["category_id"]])
    return {f"{k:012d}": v[1] for k, v in best.items()}, [names[k] for k in sorted(names)]


# ---- round trips -------------------------------------------------------------------------------------------

def test_coco_with_manifest_roundtrip(coco_tiny, coco_manifest, tmp_path):
    out = tmp_path / "coco"
    images = coco_tiny / "train2017"
    r = odis("shard", "--images", images, "--out", out, "--labels", "coco", "--manifest", coco_manifest,
             "--max-samples", 30, "--num-workers", 2)
    assert "3 shard(s)" in r.output and "80 samples" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["coco-000000.tar", "coco-000001.tar", "coco-000002.tar",
                                                     "index.json"]
    got = read_plain(out)
    files = {p.stem: p for p in images.glob("*.jpg")}
    assert set(got) == set(files)  # COCO keys: the 12-digit id == the file stem
    boxes = manifest_boxes(coco_manifest)
    largest, names = coco_largest_category(coco_tiny)
    index = index_of(out)
    assert index["classes"] == names and index["id_scheme"] == "coco"
    for key, s in got.items():
        assert s["jpg"] == files[key].read_bytes()  # bytes copied unchanged
        meta = s["json"]
        assert meta["image_id"] == key
        assert (meta["width"], meta["height"]) == Image.open(files[key]).size
        assert meta["boxes"] == [b for b, _, _ in boxes[key]]  # exactly the manifest's values
        assert meta["scores"] == [sc for _, sc, _ in boxes[key]]
        assert index["classes"][meta["label"]] == largest[key]
    assert [sh["count"] for sh in index["shards"]] == [30, 30, 20]
    assert sum(len(m["json"]["boxes"]) for m in got.values()) == sum(map(len, boxes.values())) > 500
    # Shuffled with the seed, not in file order.
    keys_in_order = [s["__key__"] for s in wds.WebDataset(str(out / "coco-000000.tar"), shardshuffle=False)]
    assert keys_in_order != sorted(keys_in_order)
    assert "OK" in odis("verify", out, "--decode").output


def test_coco_resize_scales_boxes_exactly(coco_tiny, coco_manifest, tmp_path):
    out = tmp_path / "small"
    odis("shard", "--images", coco_tiny / "train2017", "--out", out, "--manifest", coco_manifest,
         "--resize-short", 128, "--num-workers", 1)
    got = read_plain(out)
    boxes = manifest_boxes(coco_manifest)
    assert len(got) == 80
    for key, s in got.items():
        meta = s["json"]
        src = Image.open(coco_tiny / "train2017" / f"{key}.jpg")
        im = Image.open(__import__("io").BytesIO(s["jpg"]))
        assert im.size == (meta["width"], meta["height"]) and min(im.size) == 128
        assert abs(im.width / im.height - src.width / src.height) < 0.02
        sx, sy = im.width / src.width, im.height / src.height
        want = np.array([b for b, _, _ in boxes[key]]).reshape(-1, 4) * [sx, sy, sx, sy]
        np.testing.assert_allclose(np.array(meta["boxes"]).reshape(-1, 4), want, rtol=1e-12, atol=1e-9)
        assert meta["label"] is None
    odis("verify", out, "--decode")
    # --quality sets the re-encoding's JPEG quality; --prefix names the shards
    low = tmp_path / "low"
    odis("shard", "--images", coco_tiny / "train2017", "--out", low, "--resize-short", 128, "--quality", 30,
         "--prefix", "coco-q30", "--id-scheme", "coco", "--num-workers", 1)
    assert sorted(p.name for p in low.glob("*.tar")) == ["coco-q30-000000.tar"]
    small = read_plain(low)
    assert set(small) == set(got)
    assert sum(len(x["jpg"]) for x in small.values()) < 0.6 * sum(len(x["jpg"]) for x in got.values())


def test_tiny_imagenet_folder_labels(tin_root, tmp_path):
    out = tmp_path / "tin"
    odis("shard", "--images", tin_root, "--out", out, "--labels", "folder", "--max-size", "100KB",
         "--num-workers", 2)
    index = index_of(out)
    assert index["classes"] == TIN_CLASSES and index["num_samples"] == 200 and index["num_shards"] > 3
    assert index["ignored_files"]["count"] == 4  # the *_boxes.txt files, counted, not silently dropped
    got = read_plain(out)
    sources = {image_id_for(p.relative_to(tin_root).as_posix()): p for p in tin_root.rglob("*.JPEG")}
    assert set(got) == set(sources)
    for key, s in got.items():
        assert s["jpg"] == sources[key].read_bytes()
        assert index["classes"][s["json"]["label"]] == sources[key].relative_to(tin_root).parts[0]
        assert s["json"]["boxes"] == [] and (s["json"]["width"], s["json"]["height"]) == (64, 64)


def _odd_folder(root: Path, coco_tiny: Path) -> dict[str, str]:
    """Names with dots, spaces and non-ASCII; an EXIF-rotated JPEG; a BMP; broken files. relpath -> what it is."""
    jpgs = sorted((coco_tiny / "train2017").glob("*.jpg"))
    (root / "class a").mkdir(parents=True)
    (root / "kläss.b").mkdir()
    (root / "日本").mkdir()
    shutil.copy(jpgs[0], root / "class a" / "my.photo v2.jpg")
    shutil.copy(jpgs[1], root / "kläss.b" / "ñandú. .jpg")
    Image.open(jpgs[2]).convert("RGB").save(root / "日本" / "写真 1.png")
    Image.open(jpgs[3]).resize((40, 30)).save(root / "日本" / "tiny.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.open(jpgs[4]).save(root / "class a" / "rotated.jpg", exif=exif, quality=95)
    data = jpgs[5].read_bytes()
    (root / "class a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "kläss.b" / "not an image.jpg").write_text("hello")
    (root / "kläss.b" / "notes.txt").write_text("not an image, ignored and counted")
    return {"class a/my.photo v2.jpg": "copy", "kläss.b/ñandú. .jpg": "copy", "日本/写真 1.png": "copy",
            "日本/tiny.bmp": "png", "class a/rotated.jpg": "rotated", "class a/truncated.jpg": "bad",
            "kläss.b/not an image.jpg": "bad"}


def test_odd_names_exif_and_unreadable_files(coco_tiny, tmp_path):
    root = tmp_path / "odd images"
    kinds = _odd_folder(root, coco_tiny)
    out = tmp_path / "odd"
    r = odis("shard", "--images", root, "--out", out, "--labels", "folder", "--num-workers", 1)
    assert "2 left out (unreadable)" in r.output and "truncated.jpg" in r.output
    index = index_of(out)
    assert {s["path"] for s in index["skipped"]} == {k for k, v in kinds.items() if v == "bad"}
    assert all(s["reason"] for s in index["skipped"])
    assert index["ignored_files"] == {"count": 1, "examples": ["kläss.b/notes.txt"]}
    assert index["classes"] == ["class a", "kläss.b", "日本"]
    # non-ASCII names take PAX headers (over 512 bytes): the index's byte count is still the file's
    assert all(sh["bytes"] == (out / sh["name"]).stat().st_size for sh in index["shards"])
    got = read_plain(out)
    ids = {image_id_for(rel): rel for rel, kind in kinds.items() if kind != "bad"}
    assert set(got) == set(ids) and all("." not in k for k in got)
    for key, s in got.items():
        rel, meta = ids[key], s["json"]
        src = root / rel
        ext = next(e for e in ("jpg", "png", "webp") if e in s)
        stored = Image.open(__import__("io").BytesIO(s[ext]))
        assert stored.size == (meta["width"], meta["height"])
        assert index["classes"][meta["label"]] == rel.split("/")[0]
        if kinds[rel] == "copy":
            assert s[ext] == src.read_bytes()
        elif kinds[rel] == "png":
            assert ext == "png" and np.array_equal(np.asarray(stored), np.asarray(Image.open(src).convert("RGB")))
        else:  # rotated: stored upright, no orientation tag left, pixels as displayed
            from PIL import ImageOps

            upright = ImageOps.exif_transpose(Image.open(src)).convert("RGB")
            assert stored.size == upright.size == Image.open(src).size[::-1]
            assert stored.getexif().get(0x0112) is None
            diff = np.abs(np.asarray(stored, float) - np.asarray(upright, float)).mean()
            assert diff < 4.0, diff  # JPEG re-encoding noise; a wrong turn gives > 30
    odis("verify", out, "--decode")


def test_symlinked_folders_followed_once(tiny_imagenet, tmp_path):
    """Folders reached through symbolic links are sharded like real ones; a link back to an ancestor (a cycle)
    and a second link to a folder already walked are not walked again, and are listed, not silently skipped."""
    src = tiny_imagenet / "train"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(src / TIN_CLASSES[1] / "images", elsewhere / "pics")
    root = tmp_path / "root"
    shutil.copytree(src / TIN_CLASSES[0] / "images", root / "a")
    (root / "b").symlink_to(elsewhere / "pics", target_is_directory=True)   # a class folder kept elsewhere
    (root / "c").symlink_to(elsewhere / "pics", target_is_directory=True)   # the same folder again
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)        # a cycle
    (root / "a" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")          # a broken link
    out = tmp_path / "out"
    r = odis("shard", "--images", root, "--out", out, "--labels", "folder", "--num-workers", 1)
    index = index_of(out)
    assert index["classes"] == ["a", "b"] and index["num_samples"] == 100
    reasons = {w["path"]: w["reason"] for w in index["warnings"]}
    assert set(reasons) == {"a/loop", "c", "a/gone.jpg"}, reasons
    assert "'.' again" in reasons["a/loop"] and "'b' again" in reasons["c"] and "a/gone.jpg" in r.output
    got = read_plain(out)
    for key, s in got.items():
        rel = next(f"{c}/{p.name}" for c, d in (("a", root / "a"), ("b", elsewhere / "pics")) for p in d.iterdir()
                   if image_id_for(f"{c}/{p.name}") == key)
        assert s["jpg"] == (root / rel).read_bytes() and index["classes"][s["json"]["label"]] == rel[0]


# ---- resume after a kill -----------------------------------------------------------------------------------

def test_kill_then_rerun_equals_uninterrupted(tin_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out, ref = tmp_path / "killed" / "tin", tmp_path / "uninterrupted" / "tin"
    args = ["--images", str(tin_root), "--labels", "folder", "--max-samples", "20", "--seed", "7",
            "--num-workers", "1"]
    env = {**os.environ, "ODIS_SHARD_TEST_SLEEP": "0.02"}  # 0.4 s per shard of 20
    proc = subprocess.Popen([sys.executable, "-m", "odis", "shard", "--out", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # kill while shard 3 is being written
            if len(list(out.glob("*.tar"))) >= 3 and list(out.glob(".*.partial")):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the sharding run never reached its third shard")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    complete = sorted(out.glob("*.tar"))
    assert 3 <= len(complete) < 10 and list(out.glob(".*.partial")) and not (out / "index.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in complete}
    for p in complete:  # what a kill leaves under a final name is whole
        assert len(list(wds.WebDataset(str(p), shardshuffle=False))) == 20

    odis("shard", "--out", out, *args)  # rerun: only the missing shards
    index = index_of(out)
    assert index["last_run"]["shards_written"] == 10 - len(complete)
    assert {p.name: p.stat().st_mtime_ns for p in complete} == before
    assert not list(out.glob(".*")) and len(index["shards"]) == 10
    odis("verify", out)

    odis("shard", "--out", ref, *args)  # uninterrupted, same seed
    strip = lambda d: {k: v for k, v in d.items() if k not in ("created_at", "last_run")}  # noqa: E731
    assert strip(index_of(ref)) == strip(index)
    for p in ref.glob("*.tar"):
        assert p.read_bytes() == (out / p.name).read_bytes()

    # A rerun with other settings refuses to mix shard sets; --overwrite starts over.
    r = odis("shard", "--out", out, *args[:-4], "--seed", "8", "--num-workers", "1", code=2)
    assert "--overwrite" in r.output and "with --seed 7 (now 8)" in r.output
    odis("shard", "--out", out, *args[:-4], "--seed", "8", "--num-workers", "1", "--overwrite")
    assert index_of(out)["settings"]["seed"] == 8 and index_of(out)["last_run"]["shards_written"] == 10


def test_deleted_shard_is_rewritten_alone(tin_root, tmp_path):
    out = tmp_path / "tin"
    args = ["shard", "--images", tin_root, "--out", out, "--max-samples", 50, "--num-workers", 1]
    odis(*args)
    sha = {s["name"]: s["sha256"] for s in index_of(out)["shards"]}
    (out / "tin-000002.tar").unlink()
    odis(*args)
    assert index_of(out)["last_run"]["shards_written"] == 1
    assert {s["name"]: s["sha256"] for s in index_of(out)["shards"]} == sha
    odis(*args)  # complete: nothing to do
    assert index_of(out)["last_run"]["shards_written"] == 0


def test_ray_job_writes_the_same_shards(tin_root, tmp_path, ray_local):
    from odis.pipelines.shard import ShardSettings, run_shard

    s = ShardSettings(images=str(tin_root), out=str(tmp_path / "ray" / "tin"), labels="folder", max_samples=40)
    by_ray = run_shard(s, use_ray=True)
    local = run_shard(ShardSettings(**{**s.__dict__, "out": str(tmp_path / "local" / "tin")}), num_workers=1)
    assert len(by_ray["shards"]) == 5
    assert [x["sha256"] for x in by_ray["shards"]] == [x["sha256"] for x in local["shards"]]


def test_a_manifest_written_back_by_pandas_is_named_as_such(coco_tiny, coco_manifest, tin_root, tmp_path):
    """pandas drops the odis.* metadata: `stats` says so instead of printing Nones, `shard` asks for the id scheme
    the metadata held, and with it the boxes reach the shards as from the original."""
    from odis.manifest import read_manifest
    from odis.shards import read_index

    plain = tmp_path / "pandas.parquet"
    read_manifest(coco_manifest).to_pandas().to_parquet(plain, index=False)
    r = odis("stats", plain)
    assert f"{plain}: no odis metadata" in r.output and "None" not in r.output and "boxes 699" in r.output
    r = odis("shard", "--images", coco_tiny / "train2017", "--out", tmp_path / "a", "--manifest", plain, code=2)
    assert "carries no odis metadata (pandas drops it): give --id-scheme" in r.output
    odis("shard", "--images", coco_tiny / "train2017", "--out", tmp_path / "a", "--manifest", plain,
         "--id-scheme", "coco")
    odis("shard", "--images", coco_tiny / "train2017", "--out", tmp_path / "b", "--manifest", coco_manifest)
    assert read_index(tmp_path / "a")["shards"][0]["sha256"] == read_index(tmp_path / "b")["shards"][0]["sha256"]
    r = odis("shard", "--images", tin_root, "--out", tmp_path / "c", "--manifest", plain, "--labels", "coco",
             "--coco-json", coco_tiny / "annotations" / "instances_train2017.json",
             code=2)  # the scheme comes from --labels coco, not from the manifest: the advice stays
    assert "not a COCO image name" in r.output and "use --id-scheme stem" in r.output and "keys its" not in r.output
    (tmp_path / "parts").mkdir()
    r = odis("stats", tmp_path / "parts", code=2)
    assert "parts: no parquet parts in this folder" in r.output


def test_bad_inputs_fail_clearly(tin_root, coco_tiny, coco_manifest, tmp_path):
    r = odis("shard", "--images", tmp_path / "nope", "--out", tmp_path / "o", code=2)
    assert "not a folder" in r.output
    r = odis("shard", "--images", coco_tiny / "train2017", "--out", tmp_path / "o", "--labels", "folder", code=2)
    assert "not in a class folder" in r.output and ".jpg" in r.output
    r = odis("shard", "--images", tin_root, "--out", tmp_path / "o", "--max-size", "lots", code=2)
    assert "--max-size 'lots'" in r.output
    r = odis("shard", "--images", tin_root, "--out", tmp_path / "o", "--max-samples", 0, code=2)
    assert "--max-samples must be >= 1, got 0" in r.output
    r = odis("shard", "--images", tin_root, "--out", tmp_path / "o", "--labels", "coco", code=2)
    assert "instances_train.json not found" in r.output
    r = odis("shard", "--images", tin_root, "--out", tmp_path / "o", "--manifest", coco_manifest, code=2)
    assert f"--manifest {coco_manifest} keys its images by --id-scheme coco, which does not fit these files" \
        in r.output and ".JPEG: not a COCO image name" in r.output and "use --id-scheme" not in r.output
    r = odis("shard", "--images", tin_root, "--out", tmp_path / "o", "--manifest", coco_manifest, "--id-scheme",
             "stem", code=2)  # the manifest's ids were made by another rule: they could never match
    assert "differs from the manifest's id_scheme coco" in r.output
    r = odis("verify", tmp_path, code=2)
    assert "no shard index" in r.output


@pytest.mark.parametrize("option, value", [("--quality", "0"), ("--quality", "101"), ("--num-workers", "0"),
                                           ("--max-pixels", "0")])
def test_out_of_range_options_are_usage_errors(option, value):
    """These ran: out-of-range qualities reached the encoder, --num-workers 0 meant 1, --max-pixels 0 left out
    every image as over the cap."""
    r = odis("shard", "--images", ".", "--out", "o", option, value, code=2)
    assert f"Invalid value for '{option}'" in r.output


def test_unwritable_out_is_one_line_before_planning(tin_root, unwritable_outs):
    for out in unwritable_outs("s", folder=True):
        r = odis("shard", "--images", tin_root, "--out", out, code=2)
        assert f"error: --out {out}: " in r.output and "rerun" not in r.output


def test_unreachable_ray_address_fails_within_seconds_naming_it(tin_root, tmp_path):
    """ray.init waited without a bound (still retrying after 5 min). A subprocess: an in-process Ray runtime of
    this test session would be reused instead."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "odis", "shard", "--images", str(tin_root), "--out", str(tmp_path / "s"),
                        "--ray-address", f"127.0.0.1:{port}"], cwd=Path(__file__).parents[1], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - t0 < 30, r.stdout + r.stderr
    assert f"error: --ray-address 127.0.0.1:{port}: cannot reach a Ray head" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


def test_nan_and_inverted_manifest_boxes_are_left_out_and_counted(coco_tiny, coco_manifest, tmp_path):
    """NaN and x0 > x1 boxes of a manifest went into the sample json as they were (bare NaN is not JSON) with exit 0."""
    import pyarrow as pa

    from odis.manifest import SCHEMA, manifest_metadata

    t = read_manifest(coco_manifest).to_pydict()
    nan = float("nan")
    broken = {0: dict(x0=nan, y0=nan, x1=nan, y1=nan), 1: dict(x0=nan), 2: dict(x0=t["x1"][2] + 5), 3: dict(score=nan)}
    for row, change in broken.items():
        for col, v in change.items():
            t[col][row] = v
    bad = write_manifest(pa.table(t, schema=SCHEMA), tmp_path / "bad.parquet", manifest_metadata(coco_manifest))
    out = tmp_path / "shards"
    r = odis("shard", "--images", coco_tiny / "train2017", "--out", out, "--manifest", bad, "--num-workers", 1)
    assert "4 box(es) left out (dropped_not_finite 3: NaN, infinite or partly null coordinates or score; " \
           "dropped_empty 1: empty inside the image)" in r.output
    assert f"e.g. row 0 ({t['image_id'][0]!r})" in r.output
    (warning,) = [w for w in index_of(out)["warnings"] if w["path"] == str(bad)]
    assert warning["reason"].startswith("4 box(es) left out")
    assert index_of(out)["boxes"]["dropped_not_finite"] == 3 and index_of(out)["boxes"]["dropped_empty"] == 1

    def no_nan(word):
        raise ValueError(f"{word} in a sample json")

    samples = {}
    for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False, empty_check=False):
        samples[s["__key__"]] = json.loads(s["json"], parse_constant=no_nan)  # strict JSON: no bare NaN
    assert all(b[0] < b[2] and b[1] < b[3] for m in samples.values() for b in m["boxes"])
    n_boxes = sum(map(len, manifest_boxes(coco_manifest).values()))
    assert sum(len(m["boxes"]) for m in samples.values()) == n_boxes - 4  # those four, and only those


# ---- planning math (property tests) -------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from odis.pipelines.shard import Item, estimated_bytes, parse_size, split_items, target_size  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), max_size=60), max_samples=st.one_of(st.none(), st.integers(1, 10)),
       max_size=st.one_of(st.none(), st.integers(1, 30000)))
def test_split_items_keeps_order_and_limits(sizes, max_samples, max_size):
    items = [Item(f"f{i}.jpg", f"f{i}", n) for i, n in enumerate(sizes)]
    shards = split_items(items, max_samples, max_size)
    assert [it for sh in shards for it in sh] == items and all(shards)
    for sh in shards:
        assert max_samples is None or len(sh) <= max_samples
        assert max_size is None or len(sh) == 1 or sum(map(estimated_bytes, sh)) <= max_size
    for a, b in zip(shards, shards[1:]):  # greedy: a shard closes only when the next item would not fit
        full = (max_samples and len(a) == max_samples) or (
            max_size and sum(map(estimated_bytes, a)) + estimated_bytes(b[0]) > max_size)
        assert full


@given(w=st.integers(1, 20000), h=st.integers(1, 20000), n=st.integers(1, 2000))
def test_target_size_short_side(w, h, n):
    size = target_size(w, h, n)
    if min(w, h) <= n:
        assert size is None
    else:
        assert min(size) == n and abs(size[0] / size[1] - w / h) <= 1 / n * max(w, h) / min(w, h) + 1e-9


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 MB") == 1_500_000
    assert parse_size("0") is None and parse_size("123") == 123


def test_check_decode_leaves_out_corrupt_pixels(tmp_path):
    """A PNG with a damaged IDAT passes the header check (header and end marker intact) but not --check decode."""
    import io

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("good.png", "bad.png"):
        buf = io.BytesIO()
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(buf, "PNG")
        data = bytearray(buf.getvalue())
        if name == "bad.png":
            i = data.find(b"IDAT")
            data[i + 100:i + 140] = bytes(b ^ 0xFF for b in data[i + 100:i + 140])
        (root / name).write_bytes(bytes(data))
    odis("shard", "--images", root, "--out", tmp_path / "h", "--num-workers", 1)
    assert index_of(tmp_path / "h")["num_samples"] == 2
    odis("shard", "--images", root, "--out", tmp_path / "d", "--num-workers", 1, "--check", "decode")
    index = index_of(tmp_path / "d")
    assert index["num_samples"] == 1 and [s["path"] for s in index["skipped"]] == ["bad.png"]
    assert "cannot decode" in index["skipped"][0]["reason"]
    odis("shard", "--images", root, "--out", tmp_path / "cap", "--num-workers", 1, "--max-pixels", 4000)
    index = index_of(tmp_path / "cap")  # 64x64 = 4096 pixels: over the cap, refused before decoding
    assert index["num_samples"] == 0 and len(index["skipped"]) == 2
    assert all("decompression bomb" in s["reason"] for s in index["skipped"])


def test_fast_headers_match_tarfile_and_pil(coco_tiny, tiny_imagenet):
    """The shortcuts of the writer (own tar headers, JPEG SOF parsing) agree with tarfile and PIL."""
    import io
    import tarfile

    from odis.pipelines.shard import TAR_MTIME, jpeg_size, tar_header

    for name, n in [("a.jpg", 0), ("k" * 100, 12345), ("x-1.json", 511), ("ñandú.jpg", 3), ("k" * 101, 7)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = n, TAR_MTIME, 0o444, 0, 0, "", ""
        assert tar_header(name, n) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    files = sorted((coco_tiny / "train2017").glob("*.jpg")) + sorted(tiny_imagenet.glob("train/n014*/images/*"))
    fast = 0
    for f in files:
        data = f.read_bytes()
        size = jpeg_size(data)
        fast += size is not None
        assert size is None or size == Image.open(io.BytesIO(data)).size, f
        exif = Image.open(io.BytesIO(data)).getexif()
        assert size is None or not exif, f"{f}: has EXIF, must go through PIL for its orientation"
    assert fast > 0.9 * len(files)


def test_sample_meta_scales_and_clips_boxes():
    from odis.pipelines.shard import Prepared, sample_meta

    item = Item("a.jpg", "a", 10, 3, ((0.0, 0.0, 640.0, 480.0), (10.5, 20.25, 640.0004, 30.0)), (1.0, 0.5),
                (640, 480))
    meta, warn = sample_meta(item, Prepared("jpg", b"", 640, 480, 640, 480))
    assert warn is None and meta["boxes"] == [[0.0, 0.0, 640.0, 480.0], [10.5, 20.25, 640.0, 30.0]]
    meta, _ = sample_meta(item, Prepared("jpg", b"", 341, 256, 640, 480))  # --resize-short 256
    assert meta["boxes"][0] == [0.0, 0.0, 341.0, 256.0]  # borders stay exactly on the borders
    assert meta["boxes"][1][:2] == [10.5 * 341 / 640, 20.25 * 256 / 480] and meta["scores"] == [1.0, 0.5]
    meta, warn = sample_meta(item, Prepared("jpg", b"", 480, 640, 480, 640))  # not the image the manifest saw
    assert meta["boxes"] == [] and "differs" in warn and meta["label"] == 3
    # a box far outside the image (a wrong manifest row, not float32 rounding): clipped, and said
    far = item._replace(boxes=((10.0, 20.0, 99999.0, 30.0),), scores=(0.9,))
    meta, warn = sample_meta(far, Prepared("jpg", b"", 640, 480, 640, 480))
    assert meta["boxes"] == [[10.0, 20.0, 640.0, 30.0]] and "outside the 640x480 image" in warn


def test_shard_on_a_two_node_ray_cluster(tin_root, tmp_path):
    """`odis shard --ray-address`: one task per shard on a real two-node cluster (both nodes on this machine,
    sharing the filesystem); the shards equal a local run's. The nodes are stopped by killing their own process
    groups, never with `ray stop` (which would stop every Ray process on the machine)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    # A private, short temp dir (Ray's socket paths must stay under 108 bytes): no other Ray user attaches to
    # this cluster by accident.
    temp = Path(tempfile.mkdtemp(prefix="odis-shard-ray-", dir="/tmp"))
    start = dict(env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def alive() -> int:
        r = subprocess.run(["ray", "status", "--address", address], env=env, capture_output=True, text=True,
                           timeout=60)
        return sum(" node_" in line for line in r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0].splitlines())

    nodes = []
    try:
        nodes.append(subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                       f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                       f"--temp-dir={temp}"], **start))
        deadline = time.time() + 90
        while alive() < 1 and time.time() < deadline:
            time.sleep(1)
        nodes.append(subprocess.Popen(["ray", "start", "--block", f"--address={address}", "--num-cpus=1"], **start))
        while alive() < 2 and time.time() < deadline:
            time.sleep(1)
        assert alive() == 2, "the two-node test cluster did not come up"
        out = tmp_path / "cluster" / "tin"
        r = subprocess.run([sys.executable, "-m", "odis", "shard", "--images", str(tin_root), "--out", str(out),
                            "--labels", "folder", "--max-samples", "50", "--ray-address", address], env=env,
                           capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[1])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4 shard(s), 200 samples" in r.stdout
    finally:
        for p in reversed(nodes):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    odis("shard", "--images", tin_root, "--out", tmp_path / "local" / "tin", "--labels", "folder",
         "--max-samples", 50, "--num-workers", 1)
    assert [s["sha256"] for s in index_of(out)["shards"]] == [
        s["sha256"] for s in index_of(tmp_path / "local" / "tin")["shards"]]


@settings(max_examples=300, deadline=None)
@given(image_id=st.text(min_size=1, max_size=30), label=st.one_of(st.none(), st.integers(0, 10**6)),
       w=st.integers(1, 10**5), h=st.integers(1, 10**5),
       boxes=st.lists(st.tuples(*[st.floats(0, 1e4, allow_nan=False)] * 4), max_size=4),
       seed=st.integers(0, 3))
def test_encode_meta_equals_json_dumps(image_id, label, w, h, boxes, seed):
    """The json template of the writer gives json.dumps(meta, sort_keys=True)'s bytes exactly."""
    import json

    from odis.pipelines.shard.meta import encode_meta

    meta = {"image_id": image_id, "label": label, "width": w, "height": h, "boxes": [list(b) for b in boxes],
            "scores": [0.1 * seed + i / 3 for i in range(len(boxes))]}
    assert encode_meta(meta) == json.dumps(meta, sort_keys=True).encode()


def test_tar_writer_equals_tarfile(tmp_path):
    """TarWriter (small members copied into batches, large ones referenced, hashed in a thread) writes the bytes
    tarfile writes with the same metadata, and its sha256 is the file's."""
    import hashlib
    import io
    import os
    import tarfile

    from odis.pipelines.shard.tar import TAR_MTIME, TarWriter

    rng = np.random.default_rng(0)
    sizes = [0, 1, 511, 512, 513, 16383, 16384, 100_000, 3, 2_000_000] + list(rng.integers(0, 40_000, 700))
    samples = [(f"k{i:04d}", "jpg", rng.bytes(int(n)), rng.bytes(int(rng.integers(0, 600))))
               for i, n in enumerate(sizes)] + [("ñandú-日本", "png", b"x" * 700, b"{}")]  # PAX headers
    path = tmp_path / "a.tar"
    with open(path, "wb") as f:
        w = TarWriter(f.fileno())
        for sample in samples:
            w.add_sample(*sample)
        w.close()
    members = [m for key, ext, data, meta in samples for m in ((f"{key}.{ext}", data), (f"{key}.json", meta))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), TAR_MTIME, 0o444, 0, 0, "", "")
            t.addfile(info, io.BytesIO(data))
    assert path.read_bytes() == buf.getvalue()
    assert w.sha.hexdigest() == hashlib.sha256(buf.getvalue()).hexdigest() and w.nbytes == os.path.getsize(path)
