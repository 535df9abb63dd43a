"""Synthetic datasets on disk: scenes of odis/synth.py rendered into an image folder and COCO JSON (`odis synth`).

Target classes cycle through the classes (balanced); scene i of a split always gets the same random stream
(odis.synth.scene_rng), so a dataset is the same whatever the order it is written in.

Output of `write_dataset` (what `odis synth` writes):

    OUT/train/<class>/<id:012d>.png     image folder; parent folder = image label (`odis shard --labels folder`)
    OUT/val/<class>/<id:012d>.png
    OUT/annotations/instances_train.json   COCO: images (file_name relative to OUT/<split>), annotations
    OUT/annotations/instances_val.json     (bbox [x,y,w,h], area, iscrowd 0, category_id, RLE segmentation, target)
    OUT/synth.json                         settings, classes, per-split counts (written last: the run is complete)

Image ids are ints, unique across splits (train 1..N, val N+1..N+M), file names as COCO's (12 digits).
Category ids are 0-based class indices in sorted class-name order, so they equal the folder labels' indices.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from odis.synth import (MnistSource, PhotoBackgrounds, Scene, ShapeSource, SynthConfig, list_photos, load_mnist,
                        render_scene, scene_rng)


@dataclass
class SplitStats:
    next_ann_id: int = 1     # annotation ids run on across splits, like image ids
    images: int = 0
    objects: int = 0
    dropped: int = 0
    objects_per_image: dict = field(default_factory=dict)


def _coco_annotations(scene: Scene, image_id: int, next_ann: int) -> list[dict]:
    from pycocotools import mask as mask_utils

    anns = []
    for j, (box, label, m) in enumerate(zip(scene.boxes, scene.labels, scene.masks)):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0, x1, y1 = (float(v) for v in box)
        anns.append({"id": next_ann + j, "image_id": image_id, "category_id": int(label),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()), "iscrowd": 0,
                     "segmentation": rle, "target": int(j == 0)})
    return anns


def write_split(out: Path, split: str, count: int, first_id: int, cfg: SynthConfig, source,
                fmt: str = "png", progress: bool = True, first_ann_id: int = 1,
                photos: PhotoBackgrounds | None = None) -> SplitStats:
    """Render `count` scenes into OUT/<split>/<class>/<id>.<fmt> and OUT/annotations/instances_<split>.json
    (backgrounds cropped from `photos`, the split's pool, if given)."""
    from tqdm import tqdm

    img_dir = out / split
    for name in source.classes:
        (img_dir / name).mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    images, anns, stats = [], [], SplitStats(next_ann_id=first_ann_id)
    k = len(source.classes)
    for i in tqdm(range(count), desc=f"synth {split}", unit="img", disable=not progress):
        scene = render_scene(cfg, source, i % k, scene_rng(cfg.seed, split, i), photos)
        image_id = first_id + i
        file_name = f"{source.classes[scene.label]}/{image_id:012d}.{fmt}"
        ok, buf = cv2.imencode("." + fmt, np.ascontiguousarray(scene.image[..., ::-1]), params)
        if not ok:
            raise RuntimeError(f"could not encode {file_name}")
        (img_dir / file_name).write_bytes(buf.tobytes())
        images.append({"id": image_id, "file_name": file_name, "width": cfg.size, "height": cfg.size,
                       "label": scene.label})
        anns += _coco_annotations(scene, image_id, stats.next_ann_id)
        stats.next_ann_id += len(scene.labels)
        n = len(scene.labels)
        stats.images += 1
        stats.objects += n
        stats.dropped += scene.dropped
        stats.objects_per_image[n] = stats.objects_per_image.get(n, 0) + 1
    categories = [{"id": c, "name": name, "supercategory": source.kind} for c, name in enumerate(source.classes)]
    coco = {"info": {"description": f"odis synth {split}", "settings": _settings(cfg, source, fmt)},
            "licenses": [], "images": images, "annotations": anns, "categories": categories}
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    stats.objects_per_image = dict(sorted(stats.objects_per_image.items()))
    return stats


def _settings(cfg: SynthConfig, source, fmt: str) -> dict:
    return {**asdict(cfg), "objects_source": source.kind, "format": fmt, "classes": list(source.classes)}


def write_dataset(out: str | Path, cfg: SynthConfig, train: int, val: int, mnist: str | Path | None = None,
                  fmt: str = "png", overwrite: bool = False, progress: bool = True) -> dict:
    """Write a train and a val split (layout in the module docstring); return the summary also saved as synth.json."""
    cfg.validate()
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be png or jpg, got {fmt!r}")
    if train < 0 or val < 0:
        raise ValueError("train and val counts must be >= 0")
    photos = list_photos(cfg.backgrounds) if cfg.backgrounds is not None else None  # listed once, before any removal
    out = Path(out)
    ours = [out / "train", out / "val", out / "annotations", out / "synth.json"]
    if any(p.exists() for p in ours):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a synth dataset; pass --overwrite to replace it")
        for p in ours:  # remove only what synth writes, never anything else in OUT
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_mnist(mnist) if mnist is not None else None
    summary = {"settings": None, "splits": {}}
    first_id, first_ann = 1, 1
    for split, count in (("train", train), ("val", val)):
        source = MnistSource(*digits, split, cfg.seed) if digits is not None else ShapeSource()
        summary["settings"] = _settings(cfg, source, fmt)
        pool = PhotoBackgrounds(cfg.backgrounds, split, cfg.seed, photos) if photos is not None else None
        stats = write_split(out, split, count, first_id, cfg, source, fmt, progress, first_ann, pool)
        summary["splits"][split] = {k: v for k, v in asdict(stats).items() if k != "next_ann_id"}
        first_id, first_ann = first_id + count, stats.next_ann_id
    (out / "synth.json").write_text(json.dumps(summary, indent=2))
    return summary
