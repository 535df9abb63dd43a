"""Ground-truth box importers: COCO JSON, ILSVRC (ImageNet) XML, YOLO txt labels, Tiny-ImageNet txt.

One module per format (coco, imagenet, yolo, tiny_imagenet; coco_json checks the COCO file), all emitting rows
through odis/importers/rows.py. Each importer returns an `Imported` (the manifest table, its metadata, and counts
of what was kept, dropped and why). Images listed by the annotations but absent on disk become `error` rows;
images without any box become no-box rows (the trainer then uses the whole image, as the paper does for IN1K
images without a box). Malformed annotation files raise `AnnotationError` naming the file and line (COCO: the
entry); annotations that cannot be attached to an image are counted, never dropped silently.

Boxes are half-open, 0 <= x0 < x1 <= width; each format module says how its pixel convention maps onto that.
All boxes are clipped to the image; boxes that are empty after clipping, or have NaN or infinite coordinates, are
dropped and counted (`dropped_empty`, `dropped_not_finite`).
"""
from __future__ import annotations

import os

from odis.importers.coco import import_coco
from odis.importers.coco_json import check_coco_section, coco_segmentation_problem, load_coco
from odis.importers.imagenet import import_imagenet, parse_voc_xml
from odis.importers.rows import MAX_SIDE, AnnotationError, Imported
from odis.importers.tiny_imagenet import import_tiny_imagenet
from odis.importers.yolo import import_yolo, parse_yolo_line

FORMATS = ("coco", "imagenet", "yolo", "tiny-imagenet")

__all__ = ["FORMATS", "MAX_SIDE", "AnnotationError", "Imported", "check_coco_section", "coco_segmentation_problem",
           "import_boxes", "import_coco", "import_imagenet", "import_tiny_imagenet", "import_yolo", "load_coco",
           "parse_voc_xml", "parse_yolo_line"]


def import_boxes(fmt: str, images: str | os.PathLike, annotations: str | os.PathLike | None = None,
                 from_segmentation: bool = False, keep_crowd: bool = False) -> Imported:
    """Dispatch on `fmt` (one of FORMATS)."""
    if fmt == "coco":
        if annotations is None:
            raise AnnotationError("--format coco needs --annotations instances_*.json")
        return import_coco(images, annotations, from_segmentation=from_segmentation, keep_crowd=keep_crowd)
    if fmt == "imagenet":
        if annotations is None:
            raise AnnotationError("--format imagenet needs --annotations (the folder of ILSVRC XML files)")
        return import_imagenet(images, annotations)
    if fmt == "yolo":
        return import_yolo(images, annotations)
    if fmt == "tiny-imagenet":
        return import_tiny_imagenet(images)
    raise AnnotationError(f"unknown format {fmt!r}, expected one of {FORMATS}")
