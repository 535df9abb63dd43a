"""extract-boxes: real Ray, real ultralytics (int8 OpenVINO yolov8n @320), a tiny random OWL-ViT for the MAVL code
path, OpenCV selective search; the bad-input corpus; resume after a kill; safe image loading."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from odis.cli import app
from odis.boxes import box_iou
from odis.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, image_size, load_image
from odis.importers import import_coco
from odis.image_ids import image_id_for
from odis.manifest import manifest_metadata, read_manifest
from odis.manifest_validate import validate_manifest
from odis.pipelines.detectors import DetectorConfig
from odis.pipelines.extract import BoxExtractor, staging_dir

runner = CliRunner()
ODIS = [sys.executable, "-c", "from odis.cli import app; app()"]
REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _link_images(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.jpg"))[:n]:
        (dst / f.name).symlink_to(f)
    return dst


# ---- the bad-input corpus ------------------------------------------------------------------------------------

def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny (wrong) payload."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_bad_corpus(root: Path, good: Path) -> dict[str, object]:
    """Every case of the issue; value = expected (width, height) after EXIF, or 'error'."""
    root.mkdir(parents=True, exist_ok=True)
    jpg = good.read_bytes()
    w, h = Image.open(good).size
    expect: dict[str, object] = {}

    def save(name, img, fmt, **kw):
        img.save(root / name, fmt, **kw)
        expect[name] = img.size

    (root / "good.jpg").write_bytes(jpg)
    expect["good.jpg"] = (w, h)
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "not_an_image.jpg").write_text("this is a text file with a .jpg name\n")
    (root / "bomb.png").write_bytes(_png_bomb(30000, 30000))
    expect.update({k: "error" for k in ("zero.jpg", "truncated.jpg", "not_an_image.jpg", "bomb.png")})
    rgb = Image.open(good).convert("RGB").resize((160, 120))
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("sixteen_bit.png", Image.fromarray((np.arange(120 * 160).reshape(120, 160) * 3).astype(np.uint16)), "PNG")
    save("alpha.png", rgb.convert("RGBA"), "PNG")
    save("gray.jpg", rgb.convert("L"), "JPEG")
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rgb.save(root / "rotated.jpg", "JPEG", exif=exif.tobytes())
    expect["rotated.jpg"] = (120, 160)  # displayed size: width and height swapped
    (root / "sub").mkdir()
    save("sub/palette_transparent.png", rgb.convert("P"), "PNG", transparency=0)
    (root / "README.txt").write_text("not an image extension: listed, counted, not processed")
    return expect


def test_a_resume_redoes_only_the_read_errors_that_may_pass(tmp_path, coco_tiny):
    """The bad corpus's errors are the files' own: kept on resume. The system's errors (an errno: permissions, I/O
    on a network filesystem; here a folder named like an image) are "cannot read", and redone."""
    from odis.pipelines.extract import redone_on_resume

    expect = make_bad_corpus(tmp_path / "bad", sorted((coco_tiny / "val2017").glob("*.jpg"))[0])
    for name in [n for n, want in expect.items() if want == "error"]:
        msg = str(pytest.raises(ImageDecodeError, load_image, tmp_path / "bad" / name, name=name).value)
        assert not redone_on_resume(name, msg), msg
    (tmp_path / "folder.jpg").mkdir()
    msg = str(pytest.raises(ImageDecodeError, load_image, tmp_path / "folder.jpg", name="folder.jpg").value)
    assert msg.startswith("folder.jpg: cannot read ([Errno 21]") and redone_on_resume("folder.jpg", msg)
    assert redone_on_resume("a: b.jpg", "a: b.jpg: detector failed (RuntimeError: oops)")  # ': ' in a path
    assert redone_on_resume("x.jpg", "x.jpg: file not found")
    assert not redone_on_resume("x.jpg", "y.jpg: file not found")  # another row's path
    assert not redone_on_resume("x.jpg", None)


def test_load_image_on_the_bad_corpus(tmp_path, coco_tiny):
    expect = make_bad_corpus(tmp_path / "bad", sorted((coco_tiny / "val2017").glob("*.jpg"))[0])
    for name, want in expect.items():
        p = tmp_path / "bad" / name
        if want == "error":
            with pytest.raises(ImageDecodeError, match=name.replace(".", r"\.")):
                load_image(p, name=name)
            continue
        im = load_image(p)
        assert im.mode == "RGB" and im.size == want, name
        assert image_size(p) == want, name
        assert load_image(p.read_bytes()).size == want
    assert "decompression bomb" in str(pytest.raises(ImageDecodeError, load_image, tmp_path / "bad" / "bomb.png").value)
    assert "empty file" in str(pytest.raises(ImageDecodeError, load_image, tmp_path / "bad" / "zero.jpg").value)
    # 16-bit grey is rescaled, not clipped to white
    assert np.asarray(load_image(tmp_path / "bad" / "sixteen_bit.png")).max() < 255
    # EXIF orientation is applied to the pixels, not only to the size
    rotated = np.asarray(load_image(tmp_path / "bad" / "rotated.jpg")).astype(int)
    upright = np.asarray(Image.open(tmp_path / "bad" / "cmyk.jpg").convert("RGB").rotate(-90, expand=True)).astype(int)
    assert rotated.shape == upright.shape and np.abs(rotated - upright).mean() < 20


def test_bad_input_every_file_accounted_for(ray_local, yolo320, coco_tiny, tmp_path):
    expect = make_bad_corpus(tmp_path / "bad", sorted((coco_tiny / "val2017").glob("*.jpg"))[0])
    out = tmp_path / "bad.parquet"
    res = _cli("extract-boxes", "--detector", "yolo", "--weights", yolo320, "--imgsz", 320, "--images",
               tmp_path / "bad", "--out", out, "--batch-size", 4, "--quiet")
    t = read_manifest(out).to_pandas()
    assert set(t.path) == set(expect) and t.image_id.nunique() == len(expect)
    for name, want in expect.items():
        rows = t[t.path == name]
        assert (rows.image_id == image_id_for(name)).all()
        if want == "error":
            assert len(rows) == 1 and rows.error.iloc[0].startswith(name) and rows.x0.isna().all(), name
            assert "cannot read" not in rows.error.iloc[0], rows.error.iloc[0]  # an unexpected exception's wording
        else:
            assert rows.error.isna().all(), (name, rows.error.tolist())
            assert (rows.width.iloc[0], rows.height.iloc[0]) == want, name
    assert t[t.path == "not_an_image.jpg"].error.iloc[0] == "not_an_image.jpg: not an image (format not recognised)"
    assert "4 errors" in res.output and "1 file(s) without an image extension" in res.output
    assert t[t.path == "good.jpg"].x0.notna().sum() >= 1
    assert validate_manifest(out) == []


def test_yolo_batch_calls_a_text_file_not_an_image(yolo320, coco_tiny, tmp_path):
    """Importing ultralytics patches PIL.Image.open to install pi-heif on any unrecognised file; the YOLO batch
    function must still give the reason shard, show and selective search give. In-process: no Ray needed."""
    (tmp_path / "x.jpg").write_text("a text file with a .jpg name\n")
    shutil.copy(sorted((coco_tiny / "val2017").glob("*.jpg"))[0], tmp_path / "good.jpg")
    extractor = BoxExtractor(asdict(DetectorConfig("yolo", weights=str(yolo320), imgsz=320)), str(tmp_path),
                             DEFAULT_MAX_PIXELS)
    res = extractor({"image_id": np.array(["x", "good"]), "path": np.array(["x.jpg", "good.jpg"])}).to_pydict()
    assert res["error"][0] == "x.jpg: not an image (format not recognised)", res["error"][0]
    assert res["error"][1] is None and len(res["scores"][1]) >= 1  # real images still go through the detector


def test_two_batches_at_once_give_the_serial_results(yolo320, coco_tiny):
    """The actor runs two batches at a time (decoding one while the other is detected): the same rows as one at a
    time, from many threads at once, and the BGR array `prepare` makes is the channel flip ultralytics expects."""
    from concurrent.futures import ThreadPoolExecutor

    from odis.imageio import load_image

    root = coco_tiny / "val2017"
    names = sorted(p.name for p in root.glob("*.jpg"))[:24]
    extractor = BoxExtractor(asdict(DetectorConfig("yolo", weights=str(yolo320), imgsz=320)), str(root),
                             DEFAULT_MAX_PIXELS)
    im = load_image(root / names[0])
    assert np.array_equal(extractor.prepare(im), np.asarray(im)[:, :, ::-1])
    batches = [{"image_id": np.array(names[i:i + 4]), "path": np.array(names[i:i + 4])} for i in range(0, 24, 4)]
    serial = [extractor(b).to_pydict() for b in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            assert list(pool.map(lambda b: extractor(b).to_pydict(), batches)) == serial
    assert sum(len(r["scores"][0]) for r in serial) > 0 and all(e is None for r in serial for e in r["error"])


# ---- one-line errors before Ray starts ---------------------------------------------------------------------------

def test_missing_weights_is_one_line_before_ray(coco_tiny, tmp_path):
    """A bare `nope.pt` used to pass the CLI check (ultralytics might have downloaded it), start Ray, fail in the
    actor with pages of tracebacks and leave a staging folder. A subprocess sees everything printed, Ray's too."""
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    r = subprocess.run(ODIS + ["extract-boxes", "--detector", "yolo", "--weights", "nope.pt", "--images", str(images),
                               "--out", "o.parquet", "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).strip() == "error: --weights nope.pt: no such file", r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no output, no `.o.parquet.partial/`


def test_yolo_suffixes_cover_every_ultralytics_format():
    """extract-boxes refuses a --weights name no format has without importing ultralytics; an ultralytics that
    adds a format must not have its models refused."""
    from ultralytics.engine.exporter import export_formats

    from odis.pipelines.detectors import YOLO_SUFFIXES

    for suffix in export_formats()["Suffix"]:
        assert any(s in suffix for s in YOLO_SUFFIXES), suffix


@pytest.mark.parametrize("weights, why", [("emptymodel", "not a YOLO model"), ("boxes.parquet", "not a YOLO model"),
                                          ("empty_openvino_model", "an empty folder")])
def test_weights_of_the_wrong_kind_are_one_line_before_ray(coco_tiny, tmp_path, weights, why):
    """An existing --weights that is no model used to pass, start Ray, fail at the first predict (ultralytics loads
    lazily) and write an error row for every image, which a rerun then counted as done."""
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 2)
    if weights.endswith(".parquet"):
        shutil.copy(next((REPO / "tests").glob("*.py")), tmp_path / weights)
    else:
        (tmp_path / weights).mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    r = subprocess.run(ODIS + ["extract-boxes", "--detector", "yolo", "--weights", weights, "--images", str(images),
                               "--out", "o.parquet", "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert (r.stdout + r.stderr).strip().startswith(f"error: --weights {weights}: {why}"), r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["imgs", weights])  # no output, no staging


@pytest.mark.parametrize("name", ["broken_openvino_model", "truncated.pt"])
def test_weights_that_cannot_load_stop_the_job_writing_nothing(coco_tiny, tmp_path, name):
    """Weights of a YOLO kind that do not load: an OpenVINO folder passed YOLO() (lazy) and became an error row
    per image; a truncated .pt download made Ray print ~200 lines of retried-constructor tracebacks. Now: a few
    lines (the actor fails its first batch, not its constructor), ours last."""
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 3)
    weights = tmp_path / name
    if name.endswith(".pt"):
        weights.write_bytes(b"\x0c" + bytes(range(256)) * 8)
    else:
        weights.mkdir()
        (weights / "model.xml").write_text("<net>not a model</net>")
    out = tmp_path / "o.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    r = subprocess.run(ODIS + ["extract-boxes", "--detector", "yolo", "--weights", str(weights), "--images",
                               str(images), "--out", str(out), "--quiet"], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) <= 4, lines  # ours, and at most Ray's own warning about actor restarts
    (last,) = [ln for ln in lines if ln.startswith("error: ")]
    assert last.startswith("error: cannot load the yolo detector (") and name in last, last
    assert last.endswith("fix --weights or the detector options and rerun (nothing was written)")
    assert not out.exists() and not staging_dir(out).exists()


def test_a_detector_failing_on_a_whole_batch_stops_one_image_is_a_row(yolo320, coco_tiny, tmp_path):
    """Loaded, then failing on every image of a batch (here ultralytics refuses max_det=0): a broken detector or
    device, not the images, so no manifest of errors. A batch of one image cannot tell, and gets an error row that
    a resume redoes (redone_on_resume)."""
    from odis.pipelines.extract import DetectorBatchError, redone_on_resume

    names = [p.name for p in sorted((coco_tiny / "val2017").glob("*.jpg"))[:2]]
    extractor = BoxExtractor(asdict(DetectorConfig("yolo", weights=str(yolo320), imgsz=320)),
                             str(coco_tiny / "val2017"), DEFAULT_MAX_PIXELS)
    extractor.detector.cfg.max_boxes = 0
    with pytest.raises(DetectorBatchError, match=f"all 2 images of a batch, e.g. {names[0]} .*max_det"):
        extractor({"image_id": np.array(["a", "b"]), "path": np.array(names)})
    res = extractor({"image_id": np.array(["a"]), "path": np.array(names[:1])}).to_pydict()
    assert res["error"][0].startswith(f"{names[0]}: detector failed (ValueError:") and res["boxes"] == [[]]
    assert redone_on_resume(names[0], res["error"][0])
    assert not redone_on_resume("x.jpg", "x.jpg: not an image (format not recognised)")


def test_a_batch_of_images_the_detector_cannot_take_gets_rows_not_a_stop(yolo320, tmp_path):
    """A whole batch failing is the images' fault when the detector still works on a blank image (here a fault
    injected for images under 8 px, around the real YOLO): error rows a rerun redoes, not a stop. Else a resume,
    which batches the earlier failures together, would stop on them every time."""
    for name, size in (("tiny1.png", 3), ("tiny2.png", 4)):
        Image.new("RGB", (size, size), "white").save(tmp_path / name)
    extractor = BoxExtractor(asdict(DetectorConfig("yolo", weights=str(yolo320), imgsz=320)), str(tmp_path),
                             DEFAULT_MAX_PIXELS)
    real = extractor.detector

    def picky(images):
        if any(min(np.asarray(im).shape[:2]) < 8 for im in images):
            raise ValueError("image too small for this detector")
        return real(images)

    extractor.detector = picky
    res = extractor({"image_id": np.array(["a", "b"]), "path": np.array(["tiny1.png", "tiny2.png"])}).to_pydict()
    assert [e.split(" (")[0] for e in res["error"]] == ["tiny1.png: detector failed", "tiny2.png: detector failed"]
    assert extractor._works()


def test_detector_failed_and_unopened_rows_are_redone_on_resume_non_images_are_not(ray_local, yolo320, coco_tiny,
                                                                                  tmp_path):
    """`detector failed` rows, and images that could not be opened (an I/O error or permissions: may pass next
    time), were counted as done: a rerun said "0 processed" and kept them until --overwrite. A file that is not an
    image stays an error row."""
    from odis.manifest import manifest_files, write_manifest

    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 4)
    common = ["--detector", "yolo", "--weights", yolo320, "--imgsz", 320, "--images", images, "--batch-size", 2,
              "--part-size", 2, "--quiet"]
    out = tmp_path / "o.parquet"
    _cli("extract-boxes", *common, "--out", out)
    ref = _rows(out)
    parts = manifest_files(out)
    assert len(parts) == 2
    # What an earlier run may leave: part 0 a detector failure and an image it could not read, part 1 a detector
    # failure and a file that is not an image.
    for k, part in enumerate(parts):
        t = read_manifest(part).to_pandas().drop_duplicates("image_id")
        t[["x0", "y0", "x1", "y1", "score"]] = [np.nan] * 4 + [1.0]  # as results_to_manifest writes an error
        t["error"] = [f"{p}: detector failed (RuntimeError: oops)" for p in t.path]
        if k == 0:
            t.loc[t.index[1], ["error", "width", "height"]] = [
                f"{t.path.iloc[1]}: cannot read ([Errno 5] Input/output error)", 0, 0]
        if k == 1:
            t.loc[t.index[1], ["error", "width", "height"]] = [f"{t.path.iloc[1]}: not an image (truncated)", 0, 0]
        write_manifest(pa.Table.from_pandas(t, preserve_index=False), part, manifest_metadata(part))
    unreadable = read_manifest(parts[1]).to_pandas().iloc[1]
    res = _cli("extract-boxes", *common, "--out", out)
    assert "3 processed (1 already done)" in res.output and "0 errors" in res.output, res.output
    assert "3 image(s) an earlier run could not read or its detector failed on were processed again" in res.output
    t = read_manifest(out).to_pandas()
    assert t.error.notna().sum() == 1 and t[t.error.notna()].path.tolist() == [unreadable.path]
    assert _rows(out) == sorted([r for r in ref if r[0] != unreadable.image_id] +
                                [(unreadable.image_id, unreadable.path, 0, 0) + (None,) * 4 + (1.0,)], key=str)
    assert validate_manifest(out) == [] and "0 processed (4 already done)" in _cli("extract-boxes", *common,
                                                                                   "--out", out).output


def test_id_scheme_coco_refuses_names_that_are_no_coco_ids(tiny_imagenet, tmp_path):
    """Tiny-ImageNet names got made-up coco ids (n01443537_23 -> 000144353723); now one line before Ray."""
    out = tmp_path / "o.parquet"
    t0 = time.monotonic()
    res = runner.invoke(app, ["extract-boxes", "--detector", "selective-search", "--id-scheme", "coco", "--images",
                              str(tiny_imagenet / "train"), "--out", str(out), "--quiet", "--limit", "3"])
    assert res.exit_code == 2 and time.monotonic() - t0 < 20, res.output
    line = res.output.strip()
    assert line.startswith("error: n01443537/images/n01443537_0.JPEG: not a COCO image name") and "\n" not in line
    assert "--id-scheme stem" in line and not out.exists() and not staging_dir(out).exists()


# ---- image ids: --id-scheme ------------------------------------------------------------------------------------

def test_id_scheme_coco_keys_by_the_coco_id(ray_local, coco_tiny, tmp_path):
    """COCO shards are keyed by the 12-digit COCO id; detector boxes must be too, or the trainer matches none."""
    images = _link_images(coco_tiny / "train2017", tmp_path / "imgs", 3)
    out = tmp_path / "ss.parquet"
    common = ["--detector", "selective-search", "--imgsz", 64, "--max-boxes", 2, "--images", images, "--out", out,
              "--quiet"]
    _cli("extract-boxes", *common, "--id-scheme", "coco")
    t = read_manifest(out).to_pandas()
    assert sorted(t.image_id.unique()) == sorted(p.stem for p in images.iterdir())  # 000000008193, ...
    assert manifest_metadata(out)["id_scheme"] == "coco" and validate_manifest(out) == []
    # resuming with another scheme would mix two keyings of the same images in one manifest
    res = runner.invoke(app, ["extract-boxes", *map(str, common)])
    assert res.exit_code == 2 and "other settings" in res.output and "id_scheme" in res.output


def test_id_scheme_collision_is_refused_before_anything(coco_tiny, tmp_path):
    images = tmp_path / "imgs"
    (images / "a").mkdir(parents=True)
    (images / "b").mkdir()
    src = sorted((coco_tiny / "val2017").glob("*.jpg"))[0]
    (images / "a" / "000000000139.jpg").symlink_to(src)
    (images / "b" / "139.jpg").symlink_to(src)  # the same coco id, 000000000139
    out = tmp_path / "o.parquet"
    res = runner.invoke(app, ["extract-boxes", "--detector", "selective-search", "--id-scheme", "coco", "--images",
                              str(images), "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "'000000000139'" in res.output and "a/000000000139.jpg, b/139.jpg" in res.output
    assert not out.exists() and not staging_dir(out).exists()
    res = runner.invoke(app, ["extract-boxes", "--detector", "selective-search", "--id-scheme", "nope", "--images",
                              str(images), "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "--id-scheme 'nope'" in res.output


# ---- option ranges, unwritable --out, unreachable --ray-address: one line before Ray starts --------------------------

_SS = ["extract-boxes", "--detector", "selective-search", "--images", ".", "--out", "o.parquet"]


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--num-workers", "0"), ("--num-workers", "-1"),
                                           ("--cpus-per-worker", "0"), ("--cpus-per-worker", "-1"), ("--limit", "0"),
                                           ("--limit", "-1"), ("--part-size", "0"), ("--max-pixels", "0"),
                                           ("--num-gpus-per-worker", "0"), ("--num-gpus-per-worker", "nan")])
def test_out_of_range_options_are_usage_errors(option, value):
    """Each used to start Ray and run: --limit -1 took all images but the last, --max-pixels 0 made every image an
    error row, 0 meant the default for --num-workers and --cpus-per-worker; -1 failed inside Ray."""
    r = runner.invoke(app, [*_SS, option, value])
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output, r.output


def test_unwritable_out_is_one_line_before_ray(coco_tiny, unwritable_outs):
    """A file as the parent folder, or /proc, ended in a traceback after Ray had started."""
    for out in unwritable_outs("o.parquet", folder=True):
        r = runner.invoke(app, ["extract-boxes", "--detector", "selective-search", "--images",
                                str(coco_tiny / "val2017"), "--out", str(out), "--quiet"])
        assert r.exit_code == 2 and f"error: --out {out}: " in r.output, r.output


@pytest.mark.parametrize("how", ["option", "RAY_ADDRESS", "ray://"])
def test_unreachable_ray_address_fails_within_seconds_naming_it(coco_tiny, tmp_path, how):
    """ray.init on an address where nothing listens retried for as long as it ran (minutes, no timeout). A
    subprocess: this test session's own Ray runtime would be reused instead."""
    port = _free_port()  # nothing listens there
    address = f"ray://127.0.0.1:{port}" if how == "ray://" else f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": address if how == "RAY_ADDRESS" else ""}
    extra = [] if how == "RAY_ADDRESS" else ["--ray-address", address]
    t0 = time.monotonic()
    r = subprocess.run(ODIS + ["extract-boxes", "--detector", "selective-search", "--images",
                               str(coco_tiny / "val2017"), "--out", "o.parquet", "--quiet", *extra],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    named = f"RAY_ADDRESS={address}" if how == "RAY_ADDRESS" else f"--ray-address {address}"
    assert r.returncode == 2 and time.monotonic() - t0 < 30, r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip().startswith(f"error: {named}: cannot reach a Ray head at 127.0.0.1:{port}")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_port_that_is_not_a_ray_head_fails_within_seconds(coco_tiny, tmp_path):
    """A listening server that is not Ray's (here HTTP/1) took the TCP check and ray.init waited on it forever."""
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{srv.server_address[1]}"
        t0 = time.monotonic()
        r = subprocess.run(ODIS + ["extract-boxes", "--detector", "selective-search", "--images",
                                   str(coco_tiny / "val2017"), "--out", "o.parquet", "--quiet", "--ray-address",
                                   address], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=120)
    finally:
        srv.shutdown()
    assert r.returncode == 2 and time.monotonic() - t0 < 30, r.stdout + r.stderr
    assert f"--ray-address {address}: {address} answers, but not as a Ray head" in r.stdout + r.stderr


# ---- --overwrite deletes only what extract-boxes wrote -------------------------------------------------------------

def _ss(images, out, *extra):
    return runner.invoke(app, ["extract-boxes", "--detector", "selective-search", "--imgsz", "64", "--max-boxes", "2",
                               "--images", str(images), "--out", str(out), "--quiet", *map(str, extra)])


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_overlapping_images_is_refused(coco_tiny, tmp_path, where):
    """`--out` equal to `--images` with `--overwrite` used to rmtree the input images."""
    images = _link_images(coco_tiny / "val2017", tmp_path / "data" / "imgs", 2)
    out = {"same": images, "inside": images / "boxes.parquet", "contains": tmp_path / "data"}[where]
    before = sorted(p.name for p in images.iterdir())
    res = _ss(images, out, "--overwrite")
    assert res.exit_code == 2 and "--images" in res.output and str(out) in res.output, res.output
    assert sorted(p.name for p in images.iterdir()) == before


def test_overwrite_deletes_only_its_own_parts(ray_local, coco_tiny, tmp_path):
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 2)
    out = tmp_path / "ss.parquet"
    assert _ss(images, out).exit_code == 0
    parts = sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # a resume would mix in, --overwrite would delete, what it did not write
        res = _ss(images, out, *extra)
        assert res.exit_code == 2 and "notes.txt" in res.output and "did not write" in res.output, res.output
        assert sorted(p.name for p in out.iterdir()) == sorted(parts + ["notes.txt"])
    (out / "notes.txt").unlink()
    staging_dir(out).mkdir()
    (staging_dir(out) / "part-old-00000.parquet").write_bytes(b"left by a killed run")
    res = _ss(images, out, "--overwrite")
    assert res.exit_code == 0 and "2 processed (0 already done)" in res.output, res.output
    assert not staging_dir(out).exists() and validate_manifest(out) == []
    single = tmp_path / "single.parquet"
    single.write_bytes(b"someone's file")
    res = _ss(images, single, "--overwrite")
    assert res.exit_code == 2 and "is a file" in res.output and single.read_bytes() == b"someone's file"


# ---- YOLO recall against COCO ground truth --------------------------------------------------------------------

def test_yolo_class_agnostic_recall_on_coco_tiny(ray_local, yolo320, coco_tiny, tmp_path):
    out = tmp_path / "yolo.parquet"
    res = _cli("extract-boxes", "--detector", "yolo", "--weights", yolo320, "--imgsz", 320, "--images",
               coco_tiny / "val2017", "--out", out, "--batch-size", 8, "--quiet")
    assert "80 images in the manifest" in res.output and "0 errors" in res.output
    pred = read_manifest(out).to_pandas()
    assert pred.category.isna().all() and (pred.source == "yolo").all() and validate_manifest(out) == []
    meta = manifest_metadata(out)
    assert meta["detector"] == "yolo" and meta["imgsz"] == 320 and len(meta["weights_sha256"]) == 64
    gt = import_coco(coco_tiny / "val2017", coco_tiny / "annotations" / "instances_val2017.json").table.to_pandas()
    gt = gt[gt.x0.notna()]
    by_path = {p: g[["x0", "y0", "x1", "y1"]].to_numpy() for p, g in pred[pred.x0.notna()].groupby("path")}
    hit = 0
    for p, g in gt.groupby("path"):
        if p in by_path:
            hit += int((box_iou(g[["x0", "y0", "x1", "y1"]].to_numpy(), by_path[p]).max(axis=1) >= 0.5).sum())
    recall = hit / len(gt)
    print(f"class-agnostic recall@0.5 = {recall:.3f} over {len(gt)} GT boxes")
    assert recall >= 0.25


# ---- resume after a kill -----------------------------------------------------------------------------------

def _rows(out: Path) -> list[tuple]:
    t = read_manifest(out).to_pandas()
    def num(v):
        return None if np.isnan(v) else round(float(v), 2)
    return sorted(((r.image_id, r.path, r.width, r.height) + tuple(num(v) for v in (r.x0, r.y0, r.x1, r.y1, r.score))
                   for r in t.itertuples()), key=str)


def test_resume_after_kill_matches_uninterrupted_run(ray_local, yolo320, coco_tiny, tmp_path):
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 24)
    common = ["--detector", "yolo", "--weights", yolo320, "--imgsz", 320, "--images", images, "--batch-size", 2,
              "--part-size", 4, "--quiet"]
    ref = tmp_path / "ref.parquet"
    _cli("extract-boxes", *common, "--out", ref)

    out = tmp_path / "killed.parquet"
    stage = staging_dir(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(ODIS + ["extract-boxes", *map(str, common), "--out", str(out)], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list(stage.glob("part-*.parquet"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not out.exists(), "a killed run must not touch --out"
    staged = read_manifest(stage).to_pandas()
    assert 0 < staged.image_id.nunique() < 24

    res = _cli("extract-boxes", *common, "--out", out)
    assert f"({staged.image_id.nunique()} already done)" in res.output
    assert not stage.exists() and _rows(out) == _rows(ref)
    assert read_manifest(out).to_pandas().groupby("image_id").path.count().sum() == len(_rows(ref))  # no duplicate
    # a third run has nothing left to do; --overwrite starts over
    assert "0 processed (24 already done)" in _cli("extract-boxes", *common, "--out", out).output
    assert "24 processed (0 already done)" in _cli("extract-boxes", *common, "--out", out, "--overwrite").output
    assert _rows(out) == _rows(ref)
    # other settings on the same --out are refused instead of mixing two detectors' boxes
    res = runner.invoke(app, ["extract-boxes", *map(str, common), "--conf", "0.5", "--out", str(out)])
    assert res.exit_code == 2 and "other settings" in res.output


# ---- MAVL code path on a tiny random OWL-ViT, selective search ----------------------------------------------------

def build_tiny_owlvit(out: Path) -> Path:
    """A randomly initialised OWL-ViT (1 layer, 32 wide, 64 px input) and a byte-level CLIP tokenizer (every
    byte is a token, no merges), saved like a real model: the real `--detector mavl --weights DIR` path."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor,
                              OwlViTProcessor)

    chars = sorted(ByteLevel.alphabet())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + specials)}  # eos last: OWL pools at argmax
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    size = {"height": 64, "width": 64}
    OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tok).save_pretrained(out)
    torch.manual_seed(0)
    cfg = OwlViTConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab[specials[0]],
                         eos_token_id=vocab[specials[1]], pad_token_id=vocab[specials[1]]),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=32)
    OwlViTForObjectDetection(cfg).eval().save_pretrained(out)
    return out


def test_mavl_on_a_tiny_random_owlvit(ray_local, coco_tiny, tmp_path):
    weights = build_tiny_owlvit(tmp_path / "owl")
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 6)
    out = tmp_path / "mavl.parquet"
    _cli("extract-boxes", "--detector", "mavl", "--weights", weights, "--conf", 0.0, "--max-boxes", 5,
         "--images", images, "--out", out, "--batch-size", 3, "--quiet")
    t = read_manifest(out).to_pandas()
    assert t.image_id.nunique() == 6 and t.error.isna().all() and (t.source == "mavl").all()
    per_image = t.groupby("image_id").x0.count()
    assert (per_image >= 1).all() and (per_image <= 5).all()
    assert validate_manifest(out) == []  # boxes scaled back to each image's own pixels, inside it
    # class-agnostic NMS at the IoU given: no two kept boxes of an image overlap more than that
    for _, g in t.groupby("image_id"):
        iou = box_iou(g[["x0", "y0", "x1", "y1"]].to_numpy(), g[["x0", "y0", "x1", "y1"]].to_numpy())
        assert (iou[~np.eye(len(g), dtype=bool)] <= 0.5 + 1e-4).all()
    assert manifest_metadata(out)["iou"] == 0.5
    # another input size than the model's (position embeddings interpolated), straight through the detector
    from odis.pipelines.detectors import DetectorConfig, build_detector

    det = build_detector(DetectorConfig("mavl", weights=str(weights), conf=0.0, iou=0.5, max_boxes=5, imgsz=96))
    ims = [load_image(p) for p in sorted(images.iterdir())[:2]]
    for im, (boxes, scores) in zip(ims, det(ims)):
        assert 1 <= len(boxes) <= 5 and (boxes[:, 2] <= im.width).all() and (boxes[:, 3] <= im.height).all()


def test_mavl_without_weights_is_a_clear_error(tmp_path, coco_tiny):
    res = runner.invoke(app, ["extract-boxes", "--detector", "mavl", "--images", str(coco_tiny / "val2017"),
                              "--out", str(tmp_path / "m.parquet"), "--weights", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_selective_search_on_real_images(ray_local, coco_tiny, tmp_path):
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 3)
    out = tmp_path / "ss.parquet"
    _cli("extract-boxes", "--detector", "selective-search", "--imgsz", 160, "--max-boxes", 20, "--min-area",
         0.01, "--images", images, "--out", out, "--quiet")
    t = read_manifest(out).to_pandas()
    assert t.image_id.nunique() == 3 and t.error.isna().all()
    assert (t.groupby("image_id").x0.count() == 20).all()
    assert ((t.x1 - t.x0) * (t.y1 - t.y0) >= 0.01 * t.width * t.height - 1e-3).all()
    assert validate_manifest(out) == []
    # reproducible: the same image gives the same proposals again, after another image or alone, also in a
    # process where other threads call C's rand() (OpenCV ranks its proposals with it)
    from odis.pipelines.detectors import DetectorConfig, SelectiveSearchDetector

    ims = [Image.open(f).convert("RGB") for f in sorted(images.iterdir())[:2]]
    det = SelectiveSearchDetector(DetectorConfig(name="selective-search", imgsz=160, max_boxes=20))
    (a0, _), (a1, _) = det(ims)
    (b1, _), = det(ims[1:])
    assert np.array_equal(a1, b1) and np.array_equal(det(ims[:1])[0][0], a0) and len(a0) == 20


# ---- the same command against a Ray cluster (two nodes on this machine) -------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` we started by killing its own process group (gcs_server, raylet, workers): never
    `ray stop`, which kills every Ray process on the machine, other users' included. No graceful drain (30 s) in
    a test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # gcs_server, raylet, workers: all in the group started for this node
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _alive_nodes(address: str, env: dict) -> int:
    r = subprocess.run(["ray", "status", "--address", address], env=env, capture_output=True, text=True, timeout=60)
    active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if " node_" in line)


def test_extract_boxes_on_a_two_node_ray_cluster(yolo320, coco_tiny, tmp_path):
    port, address = _free_port(), None
    address = f"127.0.0.1:{port}"
    # Ray 2.60 needs a token for `ray start` unless auth is off (for head, node and driver alike). A private
    # --temp-dir keeps other Ray users on this machine from attaching to this cluster by accident.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    temp = Path(subprocess.check_output(["mktemp", "-d", "/tmp/odisray.XXXX"], text=True).strip())
    start = dict(env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = []
    try:
        nodes.append(subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                       f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                       f"--temp-dir={temp}"], **start))
        deadline = time.time() + 90
        while _alive_nodes(address, env) < 1 and time.time() < deadline:
            time.sleep(1)
        nodes.append(subprocess.Popen(["ray", "start", "--block", f"--address={address}", "--num-cpus=1"], **start))
        while _alive_nodes(address, env) < 2 and time.time() < deadline:
            time.sleep(1)
        assert _alive_nodes(address, env) == 2, "the two-node test cluster did not come up"
        images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 8)
        out = tmp_path / "cluster.parquet"
        r = subprocess.run(ODIS + ["extract-boxes", "--detector", "yolo", "--weights", str(yolo320), "--imgsz", "320",
                                   "--images", str(images), "--out", str(out), "--ray-address", address,
                                   "--num-workers", "2", "--cpus-per-worker", "1", "--batch-size", "2", "--quiet"],
                           env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "8 images in the manifest" in r.stdout
        t = read_manifest(out).to_pandas()
        assert t.image_id.nunique() == 8 and t.error.isna().all() and t.x0.notna().sum() > 8
        assert validate_manifest(out) == []
    finally:
        for p in reversed(nodes):
            _stop(p)
        shutil.rmtree(temp, ignore_errors=True)


# ---- detector output post-processing (pure) -----------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from odis.pipelines.detectors import finalize  # noqa: E402

coord = st.floats(-50, 700, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(coord, coord, coord, coord, st.floats(0, 1)), max_size=40), st.integers(1, 640),
       st.integers(1, 480), st.floats(0, 0.5), st.integers(1, 10))
def test_finalize_keeps_best_boxes_inside_the_image(raw, w, h, min_area, max_boxes):
    arr = np.asarray([r[:4] for r in raw], np.float64).reshape(-1, 4)
    scores = np.asarray([r[4] for r in raw], np.float64)
    boxes, s = finalize(arr, scores, w, h, min_area, max_boxes)
    assert len(boxes) == len(s) <= max_boxes and boxes.dtype == np.float32
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    area = (boxes[:, 2].astype(float) - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (area >= min_area * w * h * (1 - 1e-5) - 1e-3).all()
    assert (np.diff(s) <= 0).all()  # best first
    # nothing better than the last kept box was dropped, unless it was too small or outside the image
    clipped = np.clip(arr, 0, [w, h, w, h])
    ok_area = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    eligible = (ok_area > 0) & (ok_area >= min_area * w * h)
    assert len(s) == min(max_boxes, int(eligible.sum()))


def test_one_machine_path_writes_the_ray_jobs_rows_without_ray(ray_local, yolo320, coco_tiny, tmp_path):
    """The default on one machine runs the detector in the command's process: Ray is never imported, and the
    manifest holds the rows the Ray job writes (batches of 3 over 20 images: the last one short)."""
    images = _link_images(coco_tiny / "val2017", tmp_path / "imgs", 20)
    common = ["--detector", "yolo", "--weights", yolo320, "--imgsz", 320, "--images", images, "--batch-size", 3,
              "--part-size", 7, "--quiet"]
    _cli("extract-boxes", *common, "--out", tmp_path / "ray.parquet")  # this process has Ray up: the Ray job
    script = ("import sys; from odis.cli import app\n"
              "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              "print('ray imported:', 'ray' in sys.modules)")
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-c", script, "extract-boxes", *map(str, common), "--out",
                        str(tmp_path / "local.parquet")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ray imported: False" in r.stdout and "20 processed" in r.stdout, r.stdout
    assert "Loading" not in r.stdout + r.stderr  # ultralytics' own lines stay off the console
    assert _rows(tmp_path / "local.parquet") == _rows(tmp_path / "ray.parquet")
    assert len(list((tmp_path / "local.parquet").glob("part-*.parquet"))) == 3  # 7 + 7 + 6 images


def test_gpu_share_per_detector(monkeypatch):
    """--num-gpus-per-worker: a fraction puts several detectors on a GPU; each gets its share of the CPUs beside
    its GPU as decode threads (one CPU per GPU detector starved the GPU). Ray's resource view is stubbed: the
    arithmetic is ours; the CLI refuses a share above one GPU before anything runs."""
    import ray

    from odis.pipelines.extract.job import _resources
    from odis.pipelines.extract.settings import ExtractConfig

    nodes = [{"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 16.0}}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 48.0, "GPU": 4.0})
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    det = DetectorConfig("selective-search", device="cuda")
    assert _resources(ExtractConfig(det, "i", "o")) == (4, {"num_gpus": 1.0, "num_cpus": 8})
    assert _resources(ExtractConfig(det, "i", "o", gpus_per_worker=0.5)) == (8, {"num_gpus": 0.5, "num_cpus": 4})
    assert _resources(ExtractConfig(det, "i", "o", gpus_per_worker=0.25, cpus_per_worker=1, num_workers=3)) == (
        3, {"num_gpus": 0.25, "num_cpus": 1})
    r = runner.invoke(app, [*_SS, "--num-gpus-per-worker", "2"])
    assert r.exit_code == 2 and "--num-gpus-per-worker 2: a detector runs on one GPU" in r.output, r.output


def test_quieting_ray_data_mutes_only_rays_console_handlers():
    """The extract job mutes Ray Data's console lines (they would break the progress bar), not a handler of the
    caller's that also listens there: pytest's own log capture sat on `ray.data` and went deaf once."""
    import logging

    from ray._private.log import PlainRayHandler

    from odis.pipelines.extract.run import _quiet_ray_data_console

    logger = logging.getLogger("ray.data")
    ours, rays = logging.Handler(logging.INFO), PlainRayHandler()
    rays.setLevel(logging.INFO)
    logger.addHandler(ours)
    logger.addHandler(rays)
    try:
        _quiet_ray_data_console()
        assert (ours.level, rays.level) == (logging.INFO, logging.CRITICAL)
    finally:
        logger.removeHandler(ours)
        logger.removeHandler(rays)
