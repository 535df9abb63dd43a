"""COCO instances JSON -> box manifest: boxes from `bbox`, or from the masks through pycocotools.

COCO `bbox` [x, y, w, h] is already continuous: the box is (x, y, x + w, y + h).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from odis.image_ids import coco_image_id
from odis.importers.coco_json import coco_where, load_coco
from odis.importers.rows import AnnotationError, Imported, Rows


def _mask_bbox(segm, height: int, width: int) -> list[float]:
    """[x, y, w, h] of a COCO segmentation, as pycocotools' COCO.annToRLE + toBbox: polygons merged into one
    mask, uncompressed RLE encoded, compressed RLE as is."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.toBbox(rle).tolist()


def _check_split(root: Path, ann_path: Path, imgs: dict[int, dict]) -> None:
    """Not one listed file under `root` is almost surely the JSON of another split: stop, naming both."""
    if imgs and not any((root / img["file_name"]).is_file() for img in imgs.values()):
        example = imgs[min(imgs)]["file_name"]
        raise AnnotationError(f"none of the {len(imgs)} images listed in --annotations {ann_path} is under --images "
                              f"{root} (e.g. {example}): do they belong together (the same split)?")


def _by_image(annotations: list[dict], imgs: dict[int, dict], rows: Rows) -> dict[int, list[tuple[int, dict]]]:
    """image id -> [(index in annotations, annotation)]; annotations of no listed image are counted."""
    by_image: dict[int, list[tuple[int, dict]]] = {}
    for k, ann in enumerate(annotations):
        if ann["image_id"] not in imgs:  # no image to attach it to: counted, never silently lost
            rows.counts["dropped_image_id_not_in_images"] += 1
            continue
        by_image.setdefault(ann["image_id"], []).append((k, ann))
    return by_image


def _boxes(anns: list[tuple[int, dict]], w: int, h: int, ann_path: Path, from_segmentation: bool,
           keep_crowd: bool, rows: Rows) -> Iterator[tuple[tuple, int]]:
    """(box, category_id) of each annotation of one image; crowd and mask-less ones are counted and skipped."""
    for k, ann in anns:
        if ann.get("iscrowd", 0) and not keep_crowd:
            rows.counts["dropped_crowd"] += 1
            continue
        if from_segmentation:
            if not ann.get("segmentation"):
                rows.counts["dropped_no_segmentation"] += 1
                continue
            try:
                x, y, bw, bh = _mask_bbox(ann["segmentation"], h, w)
            except Exception as e:  # pycocotools raises bare Exception/TypeError/KeyError on malformed masks
                raise AnnotationError(f"{ann_path}: {coco_where('annotations', k, ann)}: segmentation "
                                      f"is not a polygon list or RLE ({type(e).__name__}: {e})") from None
        else:
            x, y, bw, bh = ann["bbox"]
        yield (x, y, x + bw, y + bh), ann["category_id"]


def import_coco(images: str | os.PathLike, annotations: str | os.PathLike, from_segmentation: bool = False,
                keep_crowd: bool = False, check_files: bool = True) -> Imported:
    """COCO instances JSON. Boxes from `bbox`, or from the masks with `from_segmentation` through pycocotools
    (the paper converts COCO masks to boxes); crowd annotations dropped unless `keep_crowd`; category ids kept.
    Annotations whose image_id is not in `images` are counted (`dropped_image_id_not_in_images`).
    A listed file missing under `images` is an error row; when not one listed file is there, the import stops
    (almost surely the JSON of another split). Ids: the 12-digit COCO image id (what image_id_for's "coco" scheme
    reads from the file names, `000000000139.jpg` and `COCO_train2014_000000000139.jpg` alike)."""
    ann_path, root = Path(annotations), Path(images)
    if not ann_path.is_file():
        raise AnnotationError(f"{ann_path}: annotation file not found")
    data = load_coco(ann_path, from_segmentation)
    imgs = {img["id"]: img for img in data["images"]}
    if check_files:
        _check_split(root, ann_path, imgs)
    rows = Rows("coco-gt")
    by_image = _by_image(data["annotations"], imgs, rows)
    for img_id in sorted(imgs):
        info = imgs[img_id]
        rel, w, h = info["file_name"], int(info["width"]), int(info["height"])
        iid = coco_image_id(img_id)
        if check_files and not (root / rel).is_file():
            rows.error(iid, rel, f"{rel}: file not found under {root}", missing=True, width=w, height=h)
            continue
        rows.image(iid, rel, w, h, _boxes(by_image.get(img_id, []), w, h, ann_path, from_segmentation,
                                          keep_crowd, rows))
    return rows.imported(root, "coco", annotations=str(ann_path.resolve()), from_segmentation=from_segmentation,
                         keep_crowd=keep_crowd, categories={c["id"]: c["name"] for c in data["categories"]})
