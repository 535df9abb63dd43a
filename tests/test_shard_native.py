"""The C part of `odis shard` (pipelines/shard/_fastpack.c) writes exactly what the Python code writes.

Every other shard test runs with it (it is built by `pip install -e .`); these run the same inputs with
ODIS_SHARD_NATIVE=0 too and compare bytes, on folders made of the cases where the C path must hand over to Python.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from odis.importers import import_coco
from odis.manifest import write_manifest
from odis.pipelines.shard import ShardSettings, build_plan, run_shard, write_shard
from odis.pipelines.shard.native import NATIVE_ENV, native
from odis.pipelines.shard.scan import _entries_python
from test_shard import TIN_CLASSES, _odd_folder, tin_root  # noqa: F401 (tin_root: a fixture)


def test_native_module_is_built():
    """`make test` installs with a C compiler at hand: the fast path must be there, or the figures in
    BENCHMARKS.md are not what users get."""
    assert native("pack") is not None and native("list_folder") is not None


def _both(monkeypatch, fn):
    """fn() with the C path, then with the Python path alone."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    fast = fn("c")
    monkeypatch.setenv(NATIVE_ENV, "0")
    return fast, fn("py")


def _shards(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _what_matters(index: dict) -> dict:
    return {k: index[k] for k in ("shards", "skipped", "warnings", "num_samples", "classes")}


@pytest.fixture(scope="module")
def mixed_root(coco_tiny, tiny_imagenet, tmp_path_factory) -> Path:
    """Plain JPEGs (Tiny-ImageNet) mixed with everything the C path hands over: EXIF/XMP JPEGs and large photos
    (coco), PNG and BMP, truncated and non-image files, non-ASCII names, a name too long for a plain tar header,
    an empty file."""
    root = tmp_path_factory.mktemp("mixed") / "train"
    _odd_folder(root, coco_tiny)
    for c in TIN_CLASSES[:2]:
        shutil.copytree(tiny_imagenet / "train" / c / "images", root / c)
    (root / "coco").mkdir()
    for p in sorted((coco_tiny / "train2017").glob("*.jpg"))[:12]:
        shutil.copy(p, root / "coco" / p.name)
    plain = next((root / TIN_CLASSES[0]).iterdir())
    shutil.copy(plain, root / TIN_CLASSES[0] / ("long " * 25 + ".jpg"))
    (root / TIN_CLASSES[0] / "empty.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize("options", [
    dict(labels="folder", max_samples=60),
    dict(labels="folder", resize_short=256, seed=3),   # coco resized, Tiny-ImageNet (64 px) copied
    dict(labels="none", max_pixels=5000, max_size=200_000),  # 64x64 passes the cap, the photos do not
], ids=["folder", "resize", "max-pixels"])
def test_same_shards_with_and_without_c(mixed_root, tmp_path, monkeypatch, options):
    def run(tag):
        out = tmp_path / tag
        index = run_shard(ShardSettings(images=str(mixed_root), out=str(out), prefix="s", **options))
        return _what_matters(index), _shards(out)

    (fast_index, fast), (py_index, py) = _both(monkeypatch, run)
    assert fast_index == py_index
    assert fast.keys() == py.keys() and all(fast[k] == py[k] for k in fast)
    assert fast_index["skipped"] and fast_index["num_samples"] > 100  # the folder did exercise both paths


def test_same_shards_with_a_manifest(coco_tiny, tiny_imagenet, tmp_path, monkeypatch):
    """Samples with boxes take the Python path, those without (no row, or rows without a box) the C path."""
    root = tmp_path / "train2017"
    shutil.copytree(coco_tiny / "train2017", root)
    for p in sorted((tiny_imagenet / "train" / TIN_CLASSES[0] / "images").iterdir())[:40]:
        shutil.copy(p, root / p.name.replace("n01443537_", "8000000"))  # ids above COCO's: no clash
    imp = import_coco(coco_tiny / "train2017", coco_tiny / "annotations" / "instances_train2017.json")
    manifest = write_manifest(imp.table, tmp_path / "coco.parquet", imp.metadata)

    def run(tag):
        out = tmp_path / tag
        index = run_shard(ShardSettings(images=str(root), out=str(out), prefix="s", manifest=str(manifest)))
        return _what_matters(index), _shards(out)

    (fast_index, fast), (py_index, py) = _both(monkeypatch, run)
    assert fast_index == py_index and fast == py


def test_same_shards_with_small_boxed_images(tiny_imagenet, tin_root, tmp_path, monkeypatch):
    """Tiny-ImageNet with its GT boxes: the C path writes boxes that lie inside their image; one box to clip, one
    row of another image size and an image with two boxes are in the set too."""
    import pandas as pd
    import pyarrow as pa

    from odis.importers import import_tiny_imagenet
    from odis.manifest import SCHEMA

    imp = import_tiny_imagenet(tiny_imagenet)
    df = imp.table.to_pandas()
    ids = sorted(p.stem for p in (tin_root / TIN_CLASSES[0] / "images").iterdir())
    df.loc[df.image_id == ids[0], "x1"] = 70.5                  # outside the 64-px image: clipped, said
    df.loc[df.image_id == ids[1], "width"] = 100                # the manifest saw another size: boxes left out
    extra = df[df.image_id == ids[2]].assign(x0=1.25, score=0.5)  # a second box
    df = pa.Table.from_pandas(pd.concat([df, extra], ignore_index=True), schema=SCHEMA, preserve_index=False)
    manifest = write_manifest(df, tmp_path / "tin.parquet", imp.metadata)

    def run(tag):
        out = tmp_path / tag
        index = run_shard(ShardSettings(images=str(tin_root), out=str(out), prefix="s", labels="folder",
                                        manifest=str(manifest), max_samples=70))
        return _what_matters(index), _shards(out)

    (fast_index, fast), (py_index, py) = _both(monkeypatch, run)
    assert fast_index == py_index and fast == py
    assert {w["path"].rsplit("/", 1)[-1].split(".")[0] for w in fast_index["warnings"]} >= {ids[0], ids[1]}


def test_file_changed_after_planning(tin_root, tmp_path, monkeypatch):
    """A file that grew or shrank since the plan is read whole by the Python path, in both modes."""
    s = ShardSettings(images=str(tin_root), out=str(tmp_path / "out"), prefix="s")
    plan = build_plan(s)
    items = plan.shards[0][:50]
    grown, shrunk = tin_root / items[10].relpath, tin_root / items[20].relpath
    grown_bytes, shrunk_bytes = grown.read_bytes(), shrunk.read_bytes()
    try:
        grown.write_bytes(grown_bytes + b"\0" * 100)  # trailing bytes after the end marker: still readable
        shrunk.write_bytes(shrunk_bytes[:-200])       # truncated: left out

        def run(tag):
            (tmp_path / "out" / ".odis-shard").mkdir(parents=True, exist_ok=True)
            rec = write_shard(s, 0, items)
            return rec, (tmp_path / "out" / rec["name"]).read_bytes()

        (fast_rec, fast), (py_rec, py) = _both(monkeypatch, run)
    finally:
        grown.write_bytes(grown_bytes)
        shrunk.write_bytes(shrunk_bytes)
    assert fast_rec == py_rec and fast == py
    assert fast_rec["count"] == 49 and [x["path"] for x in fast_rec["skipped"]] == [items[20].relpath]


def test_list_folder_equals_scandir(tmp_path):
    """The C folder listing gives scan.py's Python tuples, odd entries included."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"x" * 123)
    (d / ".hidden.jpg").write_bytes(b"x")
    (d / "ñ 1.JPEG").write_bytes(b"")
    (d / "link").symlink_to(d / "sub", target_is_directory=True)
    (d / "file-link.jpg").symlink_to(d / "a.jpg")
    (d / "broken.jpg").symlink_to(tmp_path / "missing")
    os.mkfifo(d / "pipe.jpg")
    with open(os.path.join(os.fsencode(d), b"not-utf8-\xff.jpg"), "wb") as f:  # a name only surrogates can hold
        f.write(b"abc")
    fast = native("list_folder")
    assert sorted(fast(str(d))) == sorted(_entries_python(str(d)))
    assert ("broken.jpg", 2, "No such file or directory") in fast(str(d))
    with pytest.raises(FileNotFoundError):
        fast(str(tmp_path / "nowhere"))
    with pytest.raises(NotADirectoryError):
        fast(str(d / "a.jpg"))


def test_pack_hands_over_at_the_first_item_it_cannot_write(tin_root):
    """pack stops before a sample with a bool label, boxes it would not write as they are, a missing file or a
    file of another size than planned, and packs the plain ones before."""
    from odis.pipelines.shard.tar import USTAR_TEMPLATE

    s = ShardSettings(images=str(tin_root), out="unused")
    items = build_plan(s).shards[0][:6]
    root = os.open(tin_root, os.O_RDONLY | os.O_DIRECTORY)
    pack = native("pack")
    try:
        int_box = items[3]._replace(boxes=((0, 0, 1, 1),), scores=(1.0,), manifest_wh=(64, 64))  # json: 0, not 0.0
        for bad in (int_box, items[3]._replace(label=True),
                    items[3]._replace(relpath="missing.jpg"), items[3]._replace(size=items[3].size - 1)):
            nxt, data, nbytes, read = pack(root, items[:3] + [bad] + items[4:], 0, 6, USTAR_TEMPLATE, 10**9, 0)
            assert nxt == 3 and nbytes == sum(it.size for it in items[:3]) and len(data) % 512 == 0
            assert read is None  # not read, or not read as planned: Python reads it itself
        assert pack(root, items, 0, 6, USTAR_TEMPLATE, 10**9, 0)[0] == 6
        inside = items[0]._replace(boxes=((0.0, 2.5, 64.0, 40.0), (1.0, 1.0, 2.0, 2.0)), scores=(0.9, None),
                                   manifest_wh=(64, 64))
        for handed_over in (inside._replace(manifest_wh=(64, 65)), inside._replace(boxes=((-0.5, 0.0, 1.0, 1.0),)),
                            inside._replace(scores=(1, 0.5))):  # another size, to clip, an int score
            assert pack(root, [inside, handed_over], 0, 2, USTAR_TEMPLATE, 10**9, 0)[0] == 1
        data = pack(root, [inside], 0, 1, USTAR_TEMPLATE, 10**9, 0)[1]
        assert b'"boxes": [[0.0, 2.5, 64.0, 40.0], [1.0, 1.0, 2.0, 2.0]]' in data and b'"scores": [0.9, null]' in data
        # read whole but not for the C path (64 px > --resize-short 63): its bytes come back, not read twice
        nxt, data, nbytes, read = pack(root, items, 0, 6, USTAR_TEMPLATE, 10**9, 63)
        assert (nxt, data, nbytes) == (0, b"", 0) and read == (tin_root / items[0].relpath).read_bytes()
    finally:
        os.close(root)
    assert Image.open(tin_root / items[0].relpath).size == (64, 64)
