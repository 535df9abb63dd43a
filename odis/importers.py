"""Ground-truth box importers: COCO JSON, ILSVRC (ImageNet) XML, YOLO txt labels, Tiny-ImageNet txt.

Each importer returns an `Imported` (the manifest table, its metadata, and counts of what was kept, dropped and
why). Images listed by the annotations but absent on disk become `error` rows; images without any box become
no-box rows (the trainer then uses the whole image, as the paper does for IN1K images without a box).
Malformed annotation files raise `AnnotationError` naming the file and line (COCO: the entry); annotations that
cannot be attached to an image are counted, never dropped silently.

Pixel conventions (boxes are half-open, 0 <= x0 < x1 <= width):
- COCO `bbox` [x, y, w, h] is already continuous: (x, y, x + w, y + h).
- ILSVRC/PASCAL-VOC XML are 1-based inclusive pixel indices: (xmin - 1, ymin - 1, xmax, ymax).
- Tiny-ImageNet are 0-based inclusive: (x0, y0, x1 + 1, y1 + 1).
All boxes are clipped to the image; boxes that are empty after clipping, or have NaN or infinite coordinates, are
dropped and counted (`dropped_empty`, `dropped_not_finite`).
"""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from odis.boxes import account_boxes
from odis.imageio import ImageDecodeError, image_size, list_images
from odis.manifest import (
    add_row,
    empty_columns,
    image_id_list,
    make_metadata,
    table_from_columns,
)
from odis.names import UnsafeName, plain_relpath

FORMATS = ("coco", "imagenet", "yolo", "tiny-imagenet")
MAX_SIDE = 2**31 - 1  # the manifest stores width and height as int32


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file (and line or key)."""


@dataclass
class Imported:
    table: pa.Table
    metadata: dict
    counts: Counter = field(default_factory=Counter)


def _kept_box(box, width: int, height: int, counts: Counter):
    """The box clipped to the image, or None: odis.boxes.account_boxes, its counts added to `counts` (`clipped`,
    `dropped_not_finite`, `dropped_empty`; `used` is the rows written)."""
    b, used, _, n = account_boxes([box], width, height)
    counts.update({k: v for k, v in n.items() if v and k != "used"})
    return b[0] if used[0] else None


def _image_ids(rels: list[str], scheme: str) -> list[str]:
    """The ids of the files, as `odis shard` and `extract-boxes` key them; a file name that has no id (or is not
    UTF-8, so that no manifest can hold it) or two files with one id stop the import naming the files."""
    try:
        for r in rels:
            r.encode("utf-8")
        return image_id_list(rels, scheme)
    except UnicodeEncodeError as e:
        raise AnnotationError(f"{r}: {e}") from None
    except ValueError as e:
        raise AnnotationError(str(e)) from None


def _read_text(path: Path) -> str:
    """A text annotation file; one that is not UTF-8 stops the import naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from None


def _size_or_error(path: Path, rel: str):
    """(width, height, None) from the header, or (0, 0, error message)."""
    try:
        w, h = image_size(path, name=rel)
        return w, h, None
    except ImageDecodeError as e:
        return 0, 0, str(e)


# ---- COCO ----------------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false load as bool, a subclass of int


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _coco_where(section: str, k: int, entry) -> str:
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
            raise AnnotationError(f"{ann_path}: {_coco_where('images', k, img)}: duplicate id "
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
            raise AnnotationError(f"{ann_path}: {_coco_where(section, k, entry)}: {problem}")


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
    cols, counts = empty_columns(), Counter()
    imgs = {img["id"]: img for img in data["images"]}
    if check_files and imgs and not any((root / img["file_name"]).is_file() for img in imgs.values()):
        example = imgs[min(imgs)]["file_name"]
        raise AnnotationError(f"none of the {len(imgs)} images listed in --annotations {ann_path} is under --images "
                              f"{root} (e.g. {example}): do they belong together (the same split)?")
    by_image: dict[int, list[tuple[int, dict]]] = {}  # image id -> [(index in annotations, annotation)]
    for k, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in imgs:  # no image to attach it to: counted, never silently lost
            counts["dropped_image_id_not_in_images"] += 1
            continue
        by_image.setdefault(ann["image_id"], []).append((k, ann))
    for img_id in sorted(imgs):
        info = imgs[img_id]
        rel, w, h = info["file_name"], int(info["width"]), int(info["height"])
        iid = f"{img_id:012d}"
        if check_files and not (root / rel).is_file():
            add_row(cols, iid, rel, w, h, "coco-gt", error=f"{rel}: file not found under {root}")
            counts["missing_files"] += 1
            continue
        n = 0
        for k, ann in by_image.get(img_id, []):
            if ann.get("iscrowd", 0) and not keep_crowd:
                counts["dropped_crowd"] += 1
                continue
            if from_segmentation:
                if not ann.get("segmentation"):
                    counts["dropped_no_segmentation"] += 1
                    continue
                try:
                    x, y, bw, bh = _mask_bbox(ann["segmentation"], h, w)
                except Exception as e:  # pycocotools raises bare Exception/TypeError/KeyError on malformed masks
                    raise AnnotationError(f"{ann_path}: {_coco_where('annotations', k, ann)}: segmentation "
                                          f"is not a polygon list or RLE ({type(e).__name__}: {e})") from None
            else:
                x, y, bw, bh = ann["bbox"]
            box = _kept_box((x, y, x + bw, y + bh), w, h, counts)
            if box is None:
                continue
            add_row(cols, iid, rel, w, h, "coco-gt", box, 1.0, ann["category_id"])
            n += 1
        if n == 0:
            add_row(cols, iid, rel, w, h, "coco-gt")
            counts["no_box_images"] += 1
        counts["boxes"] += n
        counts["images"] += 1
    meta = make_metadata("coco-gt", root, "coco", annotations=str(ann_path.resolve()),
                         from_segmentation=from_segmentation, keep_crowd=keep_crowd,
                         categories={c["id"]: c["name"] for c in data["categories"]})
    return Imported(table_from_columns(cols), meta, counts)


# ---- ILSVRC / ImageNet-1k ------------------------------------------------------------------------------------

def _xml_index(annotations: Path) -> dict[str, Path]:
    """stem -> XML path for every XML under the annotations folder (any of the official layouts)."""
    index: dict[str, Path] = {}
    for dirpath, _, files in os.walk(annotations):
        for f in files:
            if f.endswith(".xml"):
                stem = f[:-4]
                if stem in index:
                    raise AnnotationError(f"{Path(dirpath) / f}: duplicate annotation for {stem} "
                                          f"(also {index[stem]})")
                index[stem] = Path(dirpath) / f
    return index


def parse_voc_xml(xml_path: Path) -> tuple[int, int, list[tuple[str, tuple[float, float, float, float]]]]:
    """(width, height, [(name, (x0, y0, x1, y1)), ...]) from one PASCAL-VOC/ILSVRC XML file."""
    try:
        root = ET.parse(xml_path).getroot()  # stdlib parser: no external entities are fetched
    except ET.ParseError as e:
        raise AnnotationError(f"{xml_path}: not valid XML ({e})") from None

    def num(node, key, where):
        text = node.findtext(key)
        try:
            return float(text)
        except (TypeError, ValueError):
            raise AnnotationError(f"{xml_path}: {where}/{key}: expected a number, got {text!r}") from None

    size = root.find("size")
    if size is None:
        raise AnnotationError(f"{xml_path}: missing <size>")
    w, h = (_side(xml_path, num(size, key, "size"), key) for key in ("width", "height"))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        bb = obj.find("bndbox")
        if bb is None:
            raise AnnotationError(f"{xml_path}: object[{k}]: missing <bndbox>")
        where = f"object[{k}]/bndbox"
        box = (num(bb, "xmin", where) - 1, num(bb, "ymin", where) - 1, num(bb, "xmax", where), num(bb, "ymax", where))
        objects.append(((obj.findtext("name") or "").strip(), box))
    return w, h, objects


def _side(xml_path: Path, value: float, key: str) -> int:
    """An image side from the XML: boxes are clipped to it and the manifest stores it as int32."""
    if not (math.isfinite(value) and value.is_integer() and 0 < value <= MAX_SIDE):
        raise AnnotationError(f"{xml_path}: size/{key}: expected a positive integer up to {MAX_SIDE}, got {value:g}")
    return int(value)


def import_imagenet(images: str | os.PathLike, annotations: str | os.PathLike) -> Imported:
    """ILSVRC layout: images `train/<wnid>/<wnid>_<n>.JPEG`, `val/*.JPEG` under `images`; one VOC XML per
    annotated image anywhere under `annotations` (matched by file stem). Several objects -> several rows; an
    image without XML -> one no-box row. Category = index of the wnid in the sorted class list (ImageFolder
    order; the list is `odis.classes`); train images take the wnid of their folder. Ids: the file stem."""
    root, ann_root = Path(images), Path(annotations)
    if not ann_root.is_dir():
        raise AnnotationError(f"{ann_root}: annotations folder not found")
    xmls = _xml_index(ann_root)
    rels, _ = list_images(root)
    parsed = {stem: parse_voc_xml(p) for stem, p in xmls.items()}
    wnids = {r.split("/")[-2] for r in rels if r.startswith("train/") and r.count("/") >= 2}
    wnids |= {name for _, _, objs in parsed.values() for name, _ in objs if name}
    classes = sorted(wnids)
    cls_index = {w: i for i, w in enumerate(classes)}
    cols, counts = empty_columns(), Counter()
    for rel, iid in zip(rels, _image_ids(rels, "stem")):
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        folder_wnid = rel.split("/")[-2] if rel.startswith("train/") and rel.count("/") >= 2 else None
        if stem not in parsed:
            w, h, err = _size_or_error(root / rel, rel)
            add_row(cols, iid, rel, w, h, "imagenet-gt", error=err)
            counts["error_images" if err else "no_box_images"] += 1
            counts["images"] += 1
            continue
        w, h, objects = parsed[stem]
        n = 0
        for name, box in objects:
            b = _kept_box(box, w, h, counts)
            if b is None:
                continue
            wnid = folder_wnid or name
            add_row(cols, iid, rel, w, h, "imagenet-gt", b, 1.0, cls_index.get(wnid))
            n += 1
        if n == 0:
            add_row(cols, iid, rel, w, h, "imagenet-gt")
            counts["no_box_images"] += 1
        counts["boxes"] += n
        counts["images"] += 1
    counts["unused_xml"] = len(set(parsed) - {r.rsplit("/", 1)[-1].rsplit(".", 1)[0] for r in rels})
    meta = make_metadata("imagenet-gt", root, "stem", annotations=str(ann_root.resolve()), classes=classes)
    return Imported(table_from_columns(cols), meta, counts)


# ---- YOLO txt labels -----------------------------------------------------------------------------------------

def _yolo_label_path(root: Path, rel: str, labels: Path | None) -> Path:
    if labels is not None:
        return (labels / rel).with_suffix(".txt")
    full = (root / rel).as_posix()
    # ultralytics' rule: the last /images/ in the path becomes /labels/
    if "/images/" in full:
        head, tail = full.rsplit("/images/", 1)
        return Path(f"{head}/labels/{tail}").with_suffix(".txt")
    return Path(full).with_suffix(".txt")


def parse_yolo_line(line: str, where: str) -> tuple[int, tuple[float, float, float, float]]:
    """(class, normalised x0, y0, x1, y1) from `class cx cy w h` or a polygon line `class x1 y1 x2 y2 ...`."""
    parts = line.split()
    try:
        cls, vals = int(float(parts[0])), [float(v) for v in parts[1:]]
    except (ValueError, IndexError, OverflowError):  # OverflowError: a class of inf
        raise AnnotationError(f"{where}: expected 'class cx cy w h', got {line.strip()!r}") from None
    if len(vals) == 4:
        cx, cy, bw, bh = vals
        return cls, (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    if len(vals) >= 6 and len(vals) % 2 == 0:
        xs, ys = vals[0::2], vals[1::2]
        return cls, (min(xs), min(ys), max(xs), max(ys))
    raise AnnotationError(f"{where}: expected 4 numbers (box) or an even number >= 6 (polygon), got {len(vals)}")


def import_yolo(images: str | os.PathLike, labels: str | os.PathLike | None = None) -> Imported:
    """YOLO txt labels (`class cx cy w h`, normalised to the image). The label of `images/.../x.jpg` is
    `labels/.../x.txt` (ultralytics' rule), or `LABELS/<relpath>.txt` when `labels` is given. An image without
    a label file is a no-box image. Ids: the "path" scheme of `image_id_for`."""
    root = Path(images)
    lab = Path(labels) if labels else None
    if lab is not None and not lab.is_dir():
        raise AnnotationError(f"{lab}: labels folder not found")
    rels, _ = list_images(root)
    cols, counts = empty_columns(), Counter()
    for rel, iid in zip(rels, _image_ids(rels, "path")):
        w, h, err = _size_or_error(root / rel, rel)
        counts["images"] += 1
        if err:
            add_row(cols, iid, rel, 0, 0, "yolo-labels", error=err)
            counts["error_images"] += 1
            continue
        txt = _yolo_label_path(root, rel, lab)
        lines = _read_text(txt).splitlines() if txt.is_file() else []
        n = 0
        for k, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            cls, (x0, y0, x1, y1) = parse_yolo_line(line, f"{txt}:{k}")
            b = _kept_box((x0 * w, y0 * h, x1 * w, y1 * h), w, h, counts)
            if b is None:
                continue
            add_row(cols, iid, rel, w, h, "yolo-labels", b, 1.0, cls)
            n += 1
        if n == 0:
            add_row(cols, iid, rel, w, h, "yolo-labels")
            counts["no_box_images"] += 1
            counts["missing_label_files"] += 0 if txt.is_file() else 1
        counts["boxes"] += n
    meta = make_metadata("yolo-labels", root, "path", annotations=None if lab is None else str(lab.resolve()))
    return Imported(table_from_columns(cols), meta, counts)


# ---- Tiny-ImageNet -------------------------------------------------------------------------------------------

def _read_tsv(path: Path, ncols: int) -> list[tuple[str, list[str]]]:
    """(`file:line`, fields) of each non-blank line."""
    rows = []
    for k, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != ncols:
            raise AnnotationError(f"{path}:{k}: expected {ncols} fields, got {len(parts)}: {line!r}")
        rows.append((f"{path}:{k}", parts))
    return rows


def _tiny_box(fields: list[str], where: str) -> tuple[float, float, float, float]:
    """A 0-based inclusive box as (x0, y0, x1 + 1, y1 + 1), continuous pixels."""
    try:
        x0, y0, x1, y1 = (float(v) for v in fields)
    except ValueError:
        raise AnnotationError(f"{where}: expected 4 numbers, got {fields}") from None
    return x0, y0, x1 + 1, y1 + 1


def _tiny_boxes(root: Path, classes: list[str], wnids_file: Path) -> dict[str, tuple[str, tuple]]:
    """relpath -> (wnid, box) from `train/<wnid>/<wnid>_boxes.txt` and `val/val_annotations.txt`."""
    boxes: dict[str, tuple[str, tuple]] = {}
    for wnid in classes:
        f = root / "train" / wnid / f"{wnid}_boxes.txt"
        if f.is_file():
            for where, (fname, *b) in _read_tsv(f, 5):
                boxes[f"train/{wnid}/images/{fname}"] = (wnid, _tiny_box(b, where))
    val = root / "val" / "val_annotations.txt"
    if val.is_file():
        known = set(classes)
        for where, (fname, wnid, *b) in _read_tsv(val, 6):
            if wnid not in known:
                raise AnnotationError(f"{where}: class {wnid!r} not in {wnids_file}")
            boxes[f"val/images/{fname}"] = (wnid, _tiny_box(b, where))
    return boxes


def import_tiny_imagenet(images: str | os.PathLike) -> Imported:
    """Tiny-ImageNet-200: `train/<wnid>/images/*.JPEG` with `train/<wnid>/<wnid>_boxes.txt`, and `val/images`
    with `val/val_annotations.txt` (0-based inclusive boxes). Category = index in sorted(wnids.txt), listed in
    `odis.classes`. Ids: the file stem (`n01443537_0`, `val_0`). A box line naming a file that is not an image
    under the root becomes an error row."""
    root = Path(images)
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise AnnotationError(f"{wnids_file}: not found (is {root} a tiny-imagenet-200 folder?)")
    classes = sorted(_read_text(wnids_file).split())
    cls_index = {w: i for i, w in enumerate(classes)}
    boxes = _tiny_boxes(root, classes, wnids_file)
    rels = [r for r in list_images(root)[0] if r.split("/")[0] in ("train", "val", "test")]
    missing = sorted(set(boxes) - set(rels))
    ids = _image_ids(rels + missing, "stem")
    cols, counts = empty_columns(), Counter()
    for rel, iid in zip(rels, ids):
        w, h, err = _size_or_error(root / rel, rel)
        counts["images"] += 1
        if err:
            add_row(cols, iid, rel, 0, 0, "tiny-imagenet-gt", error=err)
            counts["error_images"] += 1
            continue
        wnid, box = boxes.get(rel, (rel.split("/")[1] if rel.startswith("train/") else None, None))
        box = None if box is None else _kept_box(box, w, h, counts)
        cat = cls_index.get(wnid) if wnid else None
        if box is None:
            counts["no_box_images"] += 1
        else:
            counts["boxes"] += 1
        add_row(cols, iid, rel, w, h, "tiny-imagenet-gt", box, 1.0, cat)
    for rel, iid in zip(missing, ids[len(rels):]):
        what = "not an image file" if (root / rel).exists() else "file not found"
        add_row(cols, iid, rel, 0, 0, "tiny-imagenet-gt", error=f"{rel}: {what} under {root} (named by its box line)")
        counts["missing_files"] += 1
    meta = make_metadata("tiny-imagenet-gt", root, "stem", classes=classes)
    return Imported(table_from_columns(cols), meta, counts)


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
