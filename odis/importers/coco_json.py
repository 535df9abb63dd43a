"""COCO instances JSON read and checked entry by entry up front, so that a malformed file stops with the file and
the entry named (CLI: one `error:` line) instead of a traceback from deep inside the import or pycocotools. The
box importer (odis/importers/coco.py) and the segmentation evaluation (odis/eval/segdata.py) both read it here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from odis.importers.rows import MAX_SIDE, AnnotationError
from odis.names import UnsafeName, plain_relpath


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false load as bool, a subclass of int


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def coco_where(section: str, k: int, entry) -> str:
    """`annotations[index 17, id=123]`: the index finds the entry even when its id is missing or repeated."""
    ident = f", id={entry.get('id')}" if isinstance(entry, dict) and "id" in entry else ""
    return f"{section}[index {k}{ident}]"


def _coco_image_problem(img) -> str | None:
    """What is wrong with one `images` entry, or None. Every image becomes rows, so every key is needed."""
    if not isinstance(img, dict):
        return f"expected an object, got {img!r}"
    missing = [key for key in ("id", "file_name", "width", "height") if key not in img]
    if missing:
        return f"missing key(s) {', '.join(map(repr, missing))}"
    if not _is_int(img["id"]):
        return f"id must be an integer, got {img['id']!r}"
    if not isinstance(img["file_name"], str) or not img["file_name"]:
        return f"file_name must be a non-empty string, got {img['file_name']!r}"
    try:  # a name from a file others made: a path under --images, never outside it
        plain_relpath(img["file_name"], "file_name")
    except UnsafeName as e:
        return str(e)
    for key in ("width", "height"):  # 640.0 is accepted: some converters write sizes as floats
        if not (_is_number(img[key]) and 0 < img[key] <= MAX_SIDE and float(img[key]).is_integer()):
            return f"{key} must be a positive integer up to {MAX_SIDE}, got {img[key]!r}"
    return None


def _coco_annotation_problem(ann, from_segmentation: bool, sizes: dict[int, tuple[int, int]]) -> str | None:
    """What is wrong with one `annotations` entry, or None. `bbox` is checked whenever present (and required
    unless the boxes come from the masks); with `from_segmentation` the mask is checked against its image."""
    if not isinstance(ann, dict):
        return f"expected an object, got {ann!r}"
    required = ("image_id", "category_id") + (() if from_segmentation else ("bbox",))
    missing = [key for key in required if key not in ann]
    if missing:
        return f"missing key(s) {', '.join(map(repr, missing))}"
    for key in ("image_id", "category_id"):
        if not _is_int(ann[key]):
            return f"{key} must be an integer, got {ann[key]!r}"
    bbox = ann.get("bbox", [0, 0, 0, 0])
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        return f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}"
    if from_segmentation and ann.get("segmentation") and ann["image_id"] in sizes:
        return coco_segmentation_problem(ann["segmentation"], *sizes[ann["image_id"]])
    return None


def coco_segmentation_problem(segm, width: int, height: int) -> str | None:
    """What is wrong with a COCO `segmentation` of a width x height image, or None. pycocotools trusts its input:
    a NaN or far-out polygon point makes it rasterise gigabytes, and RLE runs that do not add up to the image
    make it write past its buffer, so both are checked before it sees them."""
    if isinstance(segm, list):
        for k, poly in enumerate(segm):
            problem = _polygon_problem(poly, width, height)
            if problem:
                return f"segmentation polygon {k}: {problem}"
        return None
    if isinstance(segm, dict):
        problem = _rle_problem(segm, width, height)
        return f"segmentation RLE: {problem}" if problem else None
    return f"segmentation is not a polygon list or RLE, got {_short(segm)}"


def _short(v) -> str:
    """repr(v), cut to a line: a wrong segmentation can be thousands of numbers."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _polygon_problem(poly, width: int, height: int) -> str | None:
    if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
        return (f"expected [x1, y1, x2, y2, x3, y3, ...] (an even number, at least 6, of coordinates), "
                f"got {_short(poly)}")
    bad = [v for v in poly if not _is_number(v)]
    if bad:
        return f"{bad[0]!r} is not a finite number"
    # Sloppy annotations may stray past the border (pycocotools clips them); a point more than an image away is
    # no outline of this image, and far-out ones make pycocotools rasterise gigabytes
    for x, y in zip(poly[0::2], poly[1::2]):
        if not (-width <= x <= 2 * width and -height <= y <= 2 * height):
            return f"point ({x}, {y}) is outside the {width}x{height} image by more than its size"
    return None


def _rle_problem(rle: dict, width: int, height: int) -> str | None:
    missing = [key for key in ("counts", "size") if key not in rle]
    if missing:
        return f"missing key(s) {', '.join(map(repr, missing))}"
    if rle["size"] != [height, width]:
        return f"size {_short(rle['size'])} is not the image's [height, width] [{height}, {width}]"
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
        if counts is None:
            return f"counts {_short(rle['counts'])} is not a compressed COCO RLE string"
    elif not (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)):
        return f"counts must be a list of non-negative integers or a compressed string, got {_short(counts)}"
    if sum(counts) != width * height:
        return f"the runs cover {sum(counts)} pixels, the image has {width}x{height} = {width * height}"
    return None


def _rle_string_counts(text: str) -> list[int] | None:
    """The runs of a compressed COCO RLE string as pycocotools decodes them (rleFrString: 5 bits a character,
    runs after the second stored as differences, kept as uint32), or None when the string is not one."""
    counts, x, k = [], 0, 0
    for ch in text:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            return None
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:  # more characters of this run follow
            continue
        if c & 0x10:  # negative: sign-extend
            x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x & 0xFFFFFFFF)
        x, k = 0, 0
    return counts if k == 0 else None


def _coco_category_problem(cat) -> str | None:
    """What is wrong with one `categories` entry, or None (id -> name goes into the manifest metadata)."""
    if isinstance(cat, dict) and _is_int(cat.get("id")) and "name" in cat:
        return None
    return f"expected an object with an integer 'id' and a 'name', got {cat!r}"


def _read_coco_json(ann_path: Path) -> dict:
    """The top level of an instances JSON: an object with an `images` list and optional `annotations` and
    `categories` lists (an image-info file such as COCO test-dev has no annotations)."""
    try:
        with open(ann_path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise AnnotationError(f"{ann_path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{ann_path}: not a COCO instances file (expected an object with an 'images' list)")
    for key in ("annotations", "categories"):
        data.setdefault(key, [])
        if not isinstance(data[key], list):
            raise AnnotationError(f"{ann_path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def load_coco(ann_path: Path, from_segmentation: bool = False) -> dict:
    """The instances JSON, checked entry by entry up front so that a malformed file stops with the file and the
    entry named (CLI: one `error:` line) instead of a traceback from deep inside the import (or pycocotools).
    With `from_segmentation` the masks are checked too (and `bbox` is optional)."""
    data = _read_coco_json(ann_path)
    check_coco_section(ann_path, data, "images", _coco_image_problem)
    check_coco_section(ann_path, data, "categories", _coco_category_problem)
    first: dict[int, int] = {}
    for k, img in enumerate(data["images"]):
        if img["id"] in first:  # one of the two would silently replace the other
            raise AnnotationError(f"{ann_path}: {coco_where('images', k, img)}: duplicate id "
                                  f"(also images[index {first[img['id']]}])")
        first[img["id"]] = k
    sizes = {img["id"]: (int(img["width"]), int(img["height"])) for img in data["images"]}
    check_coco_section(ann_path, data, "annotations",
                       lambda ann: _coco_annotation_problem(ann, from_segmentation, sizes))
    return data


def check_coco_section(ann_path: Path, data: dict, section: str, problem_of) -> None:
    """AnnotationError naming the file and the first entry of `section` for which `problem_of` says what is wrong."""
    for k, entry in enumerate(data[section]):
        problem = problem_of(entry)
        if problem:
            raise AnnotationError(f"{ann_path}: {coco_where(section, k, entry)}: {problem}")
