"""The streaming training loader on real shards (Tiny-ImageNet subset, coco_tiny) written with plain webdataset."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import webdataset as wds

from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest
from odis.trainer.config import Config
from odis.samples import BoxTable
from odis.augment import augment_batch
from odis.trainer.data import make_train_loader
from odis.trainer.stream import TrainStream

N_CLASSES = 4
PER_CLASS = 30  # 120 Tiny-ImageNet images


def write_shards(out: Path, samples: list[dict], per_shard: int, classes: list[str]) -> Path:
    """Plain webdataset ShardWriter + an odis index.json (counts, sha256, classes)."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    shards = []
    for p in sorted(out.glob("train-*.tar")):
        import tarfile

        with tarfile.open(p) as t:
            count = len({m.name.split(".")[0] for m in t if m.isfile()})
        shards.append({"name": p.name, "count": count, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                       "bytes": p.stat().st_size})
    index = {"format": "odis-shards", "version": 1, "prefix": "train", "shards": shards,
             "num_samples": sum(s["count"] for s in shards), "classes": classes}
    (out / "index.json").write_text(json.dumps(index))
    return out


def meta(key, label, w, h, boxes):
    return json.dumps({"image_id": key, "label": label, "width": w, "height": h, "boxes": boxes,
                       "scores": [1.0] * len(boxes)}).encode()


@pytest.fixture(scope="module")
def tin_shards(tiny_imagenet, tmp_path_factory) -> Path:
    """120 Tiny-ImageNet images with their GT boxes (+2 bad samples: a corrupt JPEG and broken json)."""
    root = tiny_imagenet / "train"
    wnids = sorted(p.name for p in root.iterdir())[:N_CLASSES]
    samples = []
    for label, wnid in enumerate(wnids):
        lines = (root / wnid / f"{wnid}_boxes.txt").read_text().split("\n")
        boxes = {l.split()[0]: [float(v) for v in l.split()[1:5]] for l in lines if l.strip()}
        for name in sorted(boxes)[:PER_CLASS]:
            x0, y0, x1, y1 = boxes[name]
            key = name.split(".")[0]
            data = (root / wnid / "images" / name).read_bytes()
            samples.append({"__key__": key, "jpg": data,
                            "json": meta(key, label, 64, 64, [[x0, y0, min(x1 + 1, 64), min(y1 + 1, 64)]])})
    good = samples[0]["jpg"]
    bad = [("corrupt_jpeg", b"\xff\xd8\xff\xe0 not really a jpeg", meta("corrupt_jpeg", 0, 64, 64, [])),
           ("truncated_jpeg", good[: len(good) // 2], meta("truncated_jpeg", 0, 64, 64, [])),
           ("empty_image", b"", meta("empty_image", 0, 64, 64, [])),
           ("bad_json", good, b"{not json"),
           ("json_list", good, b"[1, 2]"),
           ("bad_boxes", good, meta("bad_boxes", 0, 64, 64, [[1, 2, 3]])),
           ("wrong_size", good, meta("wrong_size", 0, 64, 200, [])),
           ("no_json", good, None)]
    for i, (key, img, js) in enumerate(bad * 2):  # 16 bad samples among 120 good ones
        s = {"__key__": f"{key}_{i}", "jpg": img}
        if js is not None:
            s["json"] = js
        samples.insert(7 * i + 3, s)
    return write_shards(tmp_path_factory.mktemp("tin") / "shards", samples, 25, wnids)


@pytest.fixture(scope="module")
def coco_shards(coco_tiny, tmp_path_factory):
    """coco_tiny -> shards with GT boxes in the json; and a manifest covering half of them + 15 foreign ids."""
    from pycocotools.coco import COCO

    samples, rows = [], empty_columns()
    for split in ("train2017", "val2017"):
        coco = COCO(str(coco_tiny / "annotations" / f"instances_{split}.json"))
        for img_id in sorted(coco.getImgIds()):
            info = coco.loadImgs(img_id)[0]
            f = coco_tiny / split / info["file_name"]
            if not f.is_file():
                continue
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
            boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                     for a in anns if a["bbox"][2] > 1 and a["bbox"][3] > 1]
            key = f"{img_id:012d}"
            samples.append({"__key__": key, "jpg": f.read_bytes(),
                            "json": meta(key, None, info["width"], info["height"], boxes)})
    half = samples[::2]
    for i, s in enumerate(half):
        m = json.loads(s["json"])
        if i % 5 == 0:  # listed, no box: the whole image
            add_row(rows, m["image_id"], "x.jpg", m["width"], m["height"], "yolo", None, 0.0)
        else:  # one centred box, at half the stored resolution (the manifest's own pixel grid)
            w, h = m["width"] // 2, m["height"] // 2
            add_row(rows, m["image_id"], "x.jpg", w, h, "yolo", (w / 4, h / 4, 3 * w / 4, 3 * h / 4), 0.9)
            add_row(rows, m["image_id"], "x.jpg", w, h, "yolo", (0, 0, w / 8, h / 8), 0.5)
    for i in range(15):
        add_row(rows, f"elsewhere_{i}", "y.jpg", 100, 100, "yolo", (10, 10, 50, 50), 0.8)
    add_row(rows, "unreadable_one", "z.jpg", 0, 0, "yolo", None, 0.0, error="cannot decode")
    manifest = tmp_path_factory.mktemp("man") / "boxes.parquet"
    write_manifest(table_from_columns(rows), manifest, make_metadata("yolo", None, "coco"))
    shards = write_shards(tmp_path_factory.mktemp("coco") / "shards", samples, 40, [])
    return shards, manifest, samples


def tiny_cfg(shards, method="odis", workers=2, batch=8, **data) -> Config:
    cfg = Config(method=method, seed=7, device="cpu")
    d = cfg.data
    d.shards, d.global_size, d.local_size, d.n_local = str(shards), 64, 32, 2
    d.batch_size, d.num_workers, d.shuffle_buffer = batch, workers, 16
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same(a, b):
    assert a["key"] == b["key"]
    for k in ("global", "local", "obj_mask", "obj_valid", "mim_mask", "label", "fallbacks"):
        assert torch.equal(a[k], b[k]), k


def test_batch_layout(tin_shards):
    loader = make_train_loader(tiny_cfg(tin_shards, workers=0), patch_size=8)
    assert loader.epoch_samples == N_CLASSES * PER_CLASS + 16  # from index.json
    assert loader.steps_per_epoch == (N_CLASSES * PER_CLASS + 16) // 8
    b = take(loader, 1)[0]
    B = 8
    assert b["global"].shape == (2, B, 3, 64, 64) and b["global"].dtype == torch.uint8
    assert b["local"].shape == (2, B, 3, 32, 32) and b["local"].dtype == torch.uint8
    assert b["obj_mask"].shape == (2, B, 8, 8) and b["obj_mask"].dtype == torch.bool
    assert b["mim_mask"].shape == (2, B, 8, 8) and b["mim_mask"].dtype == torch.bool
    assert b["obj_valid"].shape == (2, B) and b["obj_valid"].dtype == torch.bool
    assert b["label"].dtype == torch.int64 and ((b["label"] >= 0) & (b["label"] < N_CLASSES)).all()
    assert b["fallbacks"].shape == (B,) and b["fallbacks"].dtype == torch.int64
    assert b["has_box"].dtype == torch.bool and b["has_box"].all()  # every Tiny-ImageNet image has its GT box
    assert len(b["key"]) == B and all(isinstance(k, str) for k in b["key"])
    # every valid global view has its object on the grid; invalid ones (fallbacks) have an empty OBJ mask
    assert (b["obj_mask"].flatten(2).any(-1) == b["obj_valid"]).all()
    glob, loc = augment_batch(b, "cpu", torch.Generator().manual_seed(0))
    assert glob.shape == (2 * B, 3, 64, 64) and loc.shape == (2 * B, 3, 32, 32) and glob.dtype == torch.float32
    assert torch.isfinite(glob).all() and -3 < glob.min() < 0 < glob.max() < 3


@pytest.mark.parametrize("method", ["ibot", "dino"])
def test_baseline_methods(tin_shards, method):
    b = take(make_train_loader(tiny_cfg(tin_shards, method, workers=0, n_local=0), patch_size=16), 1)[0]
    assert b["local"].shape == (0, 8, 3, 32, 32) and b["obj_mask"].shape == (2, 8, 4, 4)
    assert b["obj_mask"].all() and b["obj_valid"].all()
    assert b["mim_mask"].any() if method == "ibot" else not b["mim_mask"].any()
    glob, loc = augment_batch(b, "cpu", torch.Generator())
    assert loc.shape == (0, 3, 32, 32)


def test_determinism_and_exact_resume(tin_shards):
    """Same seed -> same batches (2 workers); start_step=k gives the uninterrupted stream minus k batches, with and
    without the saved data state, also across the bad samples in the shards; ranks see different samples."""
    cfg = tiny_cfg(tin_shards, workers=2)
    ref_loader = make_train_loader(cfg, 8)
    ref = take(ref_loader, 9)
    again = take(make_train_loader(cfg, 8), 9)
    for a, b in zip(ref, again):
        same(a, b)
    k = 5
    first = make_train_loader(cfg, 8)
    take(first, k)
    state = first.state_dict()
    # bad samples were dropped before step k: only the saved state knows how many raw samples each worker used
    assert state["positions"] != make_train_loader(cfg, 8, start_step=k).state_dict()["positions"]  # clean-data
    resumed = make_train_loader(cfg, 8, start_step=k, state=state)
    for a, b in zip(ref[k:], take(resumed, len(ref) - k)):
        same(a, b)
    # without the state the resumed stream is still deterministic and continues each worker's stream, shifted
    # by the bad samples it cannot know about; on clean data it is exact (test_exact_resume_without_state)
    guess = take(make_train_loader(cfg, 8, start_step=k), 2)
    assert guess[0]["key"] != ref[k]["key"] or guess[1]["key"] != ref[k + 1]["key"]
    other_rank = take(make_train_loader(cfg, 8, rank=1, world_size=2), 4)
    keys0 = [k for b in ref[:4] for k in b["key"]]
    keys1 = [k for b in other_rank for k in b["key"]]
    assert keys0 != keys1
    assert ref_loader.stats["samples"] == 9 * 8
    other_seed = take(make_train_loader(_seeded(cfg, 8), 8), 1)
    assert other_seed[0]["key"] != ref[0]["key"]


def _seeded(cfg, seed):
    import copy

    c = copy.deepcopy(cfg)
    c.seed = seed
    return c


def test_bad_samples_are_counted_not_fatal(tin_shards):
    """Corrupt, truncated and empty images, broken or missing json, bad boxes, a wrong size: counted, no crash."""
    loader = make_train_loader(tiny_cfg(tin_shards, workers=2, batch=16), 8)
    for _ in take(loader, 30):
        pass
    assert loader.stats["bad_samples"] >= 16
    assert loader.stats["samples"] == 30 * 16


@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=8).filter(lambda c: sum(c) > 0),
       batch=st.integers(1, 5), workers=st.integers(1, 4), world=st.integers(1, 3), seed=st.integers(0, 5))
@settings(max_examples=300, deadline=None)
def test_an_epoch_plan_shows_each_sample_at_most_once(counts, batch, workers, world, seed):
    """Every pass gives each (rank, worker) stream a range as long as the samples it uses in that epoch, the ranges
    disjoint (when the epoch fits the shards), and the computed position of any step agrees with the quotas."""
    from odis.trainer.stream import PassPlan, batches_before

    total = sum(counts)
    spe = max(1, total // (batch * world))
    plan = PassPlan(np.array(counts), seed, batch, workers, world, spe)
    for p in range(3):
        taken = []
        for rank in range(world):
            for w in range(workers):
                pieces = list(plan.pieces(rank, w, p, 0))
                assert sum(e - f for _, f, e, _ in pieces) == plan.quota(w, p)
                assert all(0 <= f < e <= counts[sh] for sh, f, e, _ in pieces)
                taken += [(sh, n) for sh, f, e, _ in pieces for n in range(f, e)]
        assert len(taken) == world * spe * batch  # the epoch's images
        if len(taken) <= total:
            assert len(set(taken)) == len(taken)
    for w in range(workers):
        for step in (0, 1, spe - 1, spe, 2 * spe + 1):
            used = batches_before(step, w, workers) * batch
            p, c, i = plan.position(w, step, chunk=3)
            assert used == sum(plan.quota(w, e) for e in range(p)) + 3 * c + i and 3 * c + i < max(1, plan.quota(w, p))


def _stream(chunk):
    from odis.trainer.stream import StreamSpec

    return TrainStream(StreamSpec(["a.tar"], None, None, seed=5, rank=0, batch_size=1, shuffle_buffer=chunk))


@given(size=st.integers(1, 6), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), cut=st.integers(0, 30),
       holes=st.sets(st.integers(0, 40)), errors=st.sets(st.integers(0, 40)))
@settings(max_examples=200, deadline=None)
def test_chunks_permute_within_a_pass_and_resume_anywhere(size, lengths, cut, holes, errors):
    """Pass p (lengths[p] planned samples, some missing, some unreadable-tar markers) comes out whole before p+1,
    permuted in chunks of `size`; a restart from any emitted (pass, chunk, index) continues the same sequence and
    counts each unreadable tar once over the two runs."""
    def raw(p0=0, q0=0):
        for p in itertools.count(p0):
            for q in range(q0 if p == p0 else 0, lengths[p % len(lengths)]):
                if (p * 10 + q) in errors:
                    yield p, q, ValueError(f"tar before {p}/{q}")
                if (p * 10 + q) not in holes:
                    yield p, q, (p, q)

    def run(p, c, i, n):
        counter = {"bad": 0, "warned": 0, "in_a_row": 0}
        out = []
        for item in _stream(size)._chunks(raw(p, c * size), p, c, i, 0, counter):
            out.append((*item, counter["bad"]))
            if len(out) == n:
                return out
        return out

    total = sum(lengths)
    ref = run(0, 0, 0, total + 20)
    first = [o[3] for o in ref if o[3][0] < len(lengths)]
    assert sorted(first) == sorted((p, q) for p, n in enumerate(lengths) for q in range(n)
                                   if p * 10 + q not in holes)
    assert [s[0] for s in first] == sorted(s[0] for s in first)  # passes never mix
    if size == 1:
        assert first == sorted(first)
    m = min(cut, len(ref) - 3)
    p, c, i, _, bad = ref[m]
    again = run(p, c, i + 1, 2)
    assert [a[:4] for a in again] == [r[:4] for r in ref[m + 1:m + 3]]
    assert [a[4] + bad for a in again] == [r[4] for r in ref[m + 1:m + 3]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores: on purpose
def test_an_epoch_shows_every_image_once(tin_shards, tmp_path):
    """2 ranks x 3 workers over 5 uneven shards: every epoch holds each image exactly once."""
    samples = []
    for p in sorted(tin_shards.glob("*.tar")):
        for s in wds.WebDataset(str(p), shardshuffle=False, empty_check=False):
            if not s["__key__"].startswith(("corrupt", "truncated", "empty", "bad", "json", "wrong", "no_json")):
                samples.append({"__key__": s["__key__"], "jpg": s["jpg"], "json": s["json"]})
    assert len(samples) == 120
    shards = write_shards(tmp_path / "uneven", samples, 25, [])  # 25, 25, 25, 25, 20
    cfg = tiny_cfg(shards, workers=3, batch=4, n_local=0)
    epochs = [[], []]
    for rank in (0, 1):
        loader = make_train_loader(cfg, 8, rank, world_size=2)
        assert loader.steps_per_epoch == 15  # 3 workers make 5 batches each, then 6/5/4 (the steps rotate)
        batches = take(loader, 2 * loader.steps_per_epoch)
        for e in (0, 1):
            epochs[e] += [k for b in batches[15 * e:15 * (e + 1)] for k in b["key"]]
    for keys in epochs:
        assert sorted(keys) == sorted(s["__key__"] for s in samples)
    assert epochs[0] != epochs[1]  # another order


def test_resume_reads_only_its_chunk(tin_shards, monkeypatch):
    """A resumed worker seeks to its chunk: it reads the chunk, the next one (read ahead) and nothing before."""
    from webdataset import tariterators

    read = [0]
    real = tariterators.group_by_keys

    def counting(*a, **kw):
        for s in real(*a, **kw):
            read[0] += 1
            yield s

    cfg = tiny_cfg(tin_shards, workers=0)
    ref = take(make_train_loader(cfg, 8), 40)  # 320+ samples: more than two passes over the 136
    k = 38
    first = make_train_loader(cfg, 8)
    take(first, k)
    monkeypatch.setattr(tariterators, "group_by_keys", counting)
    resumed = take(make_train_loader(cfg, 8, start_step=k, state=first.state_dict()), 2)
    for a, b in zip(ref[k:], resumed):
        same(a, b)
    assert read[0] <= 3 * 16 + 2  # the chunk, the chunk read ahead, one more ahead + its peek: not the 300 used


def test_exact_resume_without_state(coco_shards):
    """Clean shards: start_step=k alone reproduces the tail (each batch used exactly batch_size raw samples), also
    in a later pass: the position is computed, nothing is read up to it."""
    cfg = tiny_cfg(coco_shards[0], workers=2, batch=4, n_local=0, global_size=32)
    loader = make_train_loader(cfg, 16)
    ref = take(loader, loader.steps_per_epoch + 4)
    for k in (3, loader.steps_per_epoch + 1):
        for a, b in zip(ref[k:], take(make_train_loader(cfg, 16, start_step=k), 3)):
            same(a, b)


def test_manifest_sharing_no_id_with_the_shards_is_refused(coco_shards, tmp_path):
    """A manifest keyed by another id scheme (paths vs COCO ids) would silently train on the shards' own boxes."""
    shards, _, samples = coco_shards
    rows = empty_columns()
    add_row(rows, "train2017_000000000139_jpg-0123456789", "x.jpg", 640, 426, "yolo", (1, 1, 50, 50), 0.9)
    manifest = tmp_path / "by-path.parquet"
    write_manifest(table_from_columns(rows), manifest, make_metadata("yolo", None, "path"))
    with pytest.raises(ValueError, match=r"none of the shards' image ids is in this manifest.*id scheme path.*"
                                         r"'train2017_000000000139_jpg-0123456789'.*--id-scheme"):
        make_train_loader(tiny_cfg(shards, boxes=str(manifest)), 16)


def test_manifest_join_partial_overlap(coco_shards):
    shards, manifest, samples = coco_shards
    table = BoxTable.from_manifest(manifest)
    n_half = len(samples[::2])
    assert len(table) == n_half + 15 + 1
    assert table.stats["manifest_error_rows"] == 1
    n_boxed = sum(1 for i in range(n_half) if i % 5)
    assert table.stats["manifest_boxes"] == 2 * n_boxed + 15
    assert table.nbytes / table.stats["manifest_boxes"] <= 100  # compact: arrays, not Python objects per image
    # a boxed image: the manifest's box, scaled from its half-resolution grid to the stored image
    m = json.loads(samples[::2][1]["json"])
    b = table.lookup(m["image_id"], m["width"], m["height"])
    sx, sy = m["width"] / (m["width"] // 2), m["height"] / (m["height"] // 2)
    w, h = m["width"] // 2, m["height"] // 2
    np.testing.assert_allclose(b[0], [w / 4 * sx, h / 4 * sy, 3 * w / 4 * sx, 3 * h / 4 * sy], rtol=1e-5)
    assert table.lookup(json.loads(samples[::2][0]["json"])["image_id"], 640, 480).shape == (0, 4)  # no box
    assert table.lookup(json.loads(samples[1]["json"])["image_id"], 640, 480) is None  # not listed: no box

    cfg = tiny_cfg(shards, workers=2, boxes=str(manifest), global_size=96, local_size=32, n_local=1)
    loader = make_train_loader(cfg, 16)
    r = loader.box_report
    assert r["shard_images"] == len(samples)
    assert r["shard_images_with_manifest_boxes"] == n_boxed
    assert r["shard_images_in_manifest_without_box"] == n_half - n_boxed
    assert r["shard_images_not_in_manifest"] == len(samples) - n_half
    assert r["manifest_ids_not_in_shards"] == 16
    batches = take(loader, 3)
    assert all(b["global"].shape == (2, 8, 3, 96, 96) for b in batches)
    assert loader.stats["bad_samples"] == 0
    # images listed without a box (every 5th of the manifest's) train on the whole image
    no_box = {json.loads(s["json"])["image_id"] for i, s in enumerate(samples[::2]) if i % 5 == 0}
    seen = [(key in no_box, has) for b in batches for key, has in zip(b["key"], b["has_box"].tolist())]
    assert any(listed for listed, _ in seen)  # the seed draws some
    assert all(not has for listed, has in seen if listed)
    assert loader.stats["whole_image_box"] == sum(int((~b["has_box"]).sum()) for b in batches)


def test_boxes_come_from_the_manifest_first(coco_shards):
    """Per sample: a listed id uses the manifest's boxes (scaled); an unlisted one has no box, whatever its json
    holds (a given manifest is the only box source: odis.samples)."""
    shards, manifest, samples = coco_shards
    from odis.views import ViewMaker

    captured = []

    class Spy(ViewMaker):
        def __call__(self, image, boxes, rng, out=None):
            captured.append((image.shape, np.array(boxes)))
            return super().__call__(image, boxes, rng, out)

    from odis.trainer.stream import StreamSpec

    spec = StreamSpec([], Spy(global_size=64, local_size=32, n_local=0, patch_size=16), BoxTable.from_manifest(manifest),
                      0, 0, 1, 1)
    stream = TrainStream(spec)
    listed, unlisted = samples[2], samples[1]
    for s in (listed, unlisted):
        raw = {"__key__": s["__key__"], "jpg": s["jpg"], "json": s["json"]}
        stream.process(raw, np.random.default_rng(0))
    (shape_l, boxes_l), (shape_u, boxes_u) = captured
    m = json.loads(listed["json"])
    w, h = m["width"] // 2, m["height"] // 2
    sx, sy = shape_l[1] / w, shape_l[0] / h
    np.testing.assert_allclose(boxes_l[0], [w / 4 * sx, h / 4 * sy, 3 * w / 4 * sx, 3 * h / 4 * sy], rtol=1e-4)
    assert len(json.loads(unlisted["json"])["boxes"]) and boxes_u.shape == (0, 4)


def _jpeg(arr, **kw) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_decode_paths_agree(coco_tiny):
    """cv2 (plain JPEG) and PIL (everything else) give the same upright RGB pixels; bombs are refused first. The
    trainer and the evaluators decode with the project's one decoder (odis.imageio.decode_rgb, through odis.samples)."""
    import io

    from PIL import Image, ImageOps

    import odis.samples as S  # what the trainer and the evaluators read samples with
    from odis.imageio import ImageDecodeError, decode_rgb

    assert S.decode_rgb is decode_rgb
    data = next((coco_tiny / "val2017").glob("*.jpg")).read_bytes()
    fast, size = decode_rgb(data, name="a.jpg")
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert size == (ref.shape[1], ref.shape[0]) and (fast == ref).all()
    # EXIF orientation 6 (rotate 90): both paths return the displayed image and its displayed size
    arr = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg(arr, exif=exif.tobytes())
    a, sa = decode_rgb(rotated, name="r.jpg")
    b = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(rotated))).convert("RGB"))
    assert a.shape == (60, 40, 3) and sa == (40, 60) and (a == b).all()
    # PNG with alpha and a paletted PNG -> RGB
    for mode in ("RGBA", "P"):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, "PNG")
        out, s = decode_rgb(buf.getvalue(), name=f"x_{mode}.png")
        assert out.shape == (40, 60, 3) and out.dtype == np.uint8 and s == (60, 40)
    # draft: a large JPEG decodes at reduced scale when every crop stays shrunk; its stored size is reported
    from odis.views import ViewMaker

    big = _jpeg(np.zeros((1600, 2400, 3), np.uint8))
    vm = ViewMaker(global_size=64, local_size=32, n_local=2, patch_size=8)
    small, s = decode_rgb(big, name="big.jpg", max_reduction=vm.max_reduction)
    assert s == (2400, 1600) and small.shape[1] < 2400 and small.shape[1] / small.shape[0] == 1.5
    assert vm.max_reduction(2400, 1600) >= 2400 / small.shape[1]
    with pytest.raises(ImageDecodeError, match="bomb.jpg: refused, 2400x1600"):
        decode_rgb(big, max_pixels=1000, name="bomb.jpg")


def test_shards_without_index_count_their_keys(tin_shards, tmp_path):
    for p in tin_shards.glob("*.tar"):
        (tmp_path / p.name).symlink_to(p)
    loader = make_train_loader(tiny_cfg(tmp_path, workers=0), 8)
    assert loader.epoch_samples == N_CLASSES * PER_CLASS + 16
    assert take(loader, 1)[0]["global"].shape[:2] == (2, 8)


def test_unreadable_tars_stop_with_a_clear_error(tmp_path):
    """Shards that are not tars at all (empty files): the endless stream stops instead of retrying forever."""
    (tmp_path / "x-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="not one readable sample in 1 shard.*x-000000.tar"):
        make_train_loader(tiny_cfg(str(tmp_path / "x-{000000..000000}.tar"), workers=0, epoch_samples=40), 8)
    # an index that counts samples the tars do not hold: the readers find nothing and say so
    shards = write_shards(tmp_path / "s", [{"__key__": "k0", "jpg": b"x", "json": b"{}"}], 1, [])
    (shards / "train-000000.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="not one sample in any of the 1 shard.*train-000000.tar"):
        take(make_train_loader(tiny_cfg(shards, workers=0), 8), 1)


def test_unusable_shards_stop_with_a_clear_error(tmp_path):
    """Shards whose every sample is unusable: the worker stops naming the reason instead of spinning forever."""
    samples = [{"__key__": f"k{i}", "txt": b"not an image", "json": meta(f"k{i}", 0, 8, 8, [])} for i in range(20)]
    shards = write_shards(tmp_path / "bad", samples, 20, [])
    loader = make_train_loader(tiny_cfg(shards, workers=0), 8)
    with pytest.raises(RuntimeError, match="unusable samples in a row.*no image"):
        take(loader, 1)


def test_remote_shards_take_their_counts_from_a_remote_index(tin_shards, caplog):
    """An http(s) index.json gives the plan its shard sizes; remote shards without one need data.epoch_samples
    and are assumed equal (with a warning)."""
    import http.server
    import threading
    from functools import partial

    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tin_shards))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        index = json.loads((tin_shards / "index.json").read_text())
        loader = make_train_loader(tiny_cfg(f"{base}/index.json", workers=0), 8)
        assert list(loader.spec.plan.counts) == [sh["count"] for sh in index["shards"]]
        assert take(loader, 1)[0]["global"].shape[:2] == (2, 8)
        pattern = f"{base}/train-{{000000..{len(index['shards']) - 1:06d}}}.tar"
        with pytest.raises(ValueError, match="set data.epoch_samples"):
            make_train_loader(tiny_cfg(pattern, workers=0), 8)
        loader = make_train_loader(tiny_cfg(pattern, workers=0, epoch_samples=120), 8)
        assert "assumes 20 samples in each" in caplog.text
        assert take(loader, 1)[0]["global"].shape[:2] == (2, 8)
    finally:
        srv.shutdown()


def test_members_webdataset_leaves_out_are_not_samples(tin_shards, tmp_path):
    """macOS AppleDouble companions (`._k.jpg`, written by bsdtar for files with extended attributes) and
    `__meta__` files are no samples for webdataset: the counts, the epoch and the seeks must agree with it."""
    import io
    import tarfile

    good = [s for s in wds.WebDataset(str(sorted(tin_shards.glob("*.tar"))[0]), shardshuffle=False)
            if s["__key__"].startswith("n")][:10]
    path = tmp_path / "mac-000000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("__meta__/notes.json", b"{}")
        for s in good:
            add(f"._{s['__key__']}.jpg", b"\0\5\26\7 AppleDouble")
            add(f"{s['__key__']}.jpg", s["jpg"])
            add(f"{s['__key__']}.json", s["json"])
    cfg = tiny_cfg(path, workers=0, batch=5, shuffle_buffer=4)
    loader = make_train_loader(cfg, 8)
    assert list(loader.spec.plan.counts) == [10] and loader.steps_per_epoch == 2
    batches = take(loader, 3)
    assert sorted(k for b in batches[:2] for k in b["key"]) == sorted(s["__key__"] for s in good)
    first = make_train_loader(cfg, 8)
    take(first, 1)
    same(batches[1], take(make_train_loader(cfg, 8, start_step=1, state=first.state_dict()), 1)[0])
