"""ILSVRC (ImageNet-1k) images with PASCAL-VOC XML boxes -> box manifest.

VOC XML boxes are 1-based inclusive pixel indices: the box is (xmin - 1, ymin - 1, xmax, ymax).
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from odis.imageio import list_images
from odis.importers.rows import MAX_SIDE, AnnotationError, Imported, Rows, image_ids, size_or_error


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


def _stem(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _folder_wnid(rel: str) -> str | None:
    """The class folder of a train image (`train/<wnid>/<file>`), else None."""
    return rel.split("/")[-2] if rel.startswith("train/") and rel.count("/") >= 2 else None


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
    wnids = {w for w in map(_folder_wnid, rels) if w is not None}
    wnids |= {name for _, _, objs in parsed.values() for name, _ in objs if name}
    classes = sorted(wnids)
    cls_index = {w: i for i, w in enumerate(classes)}
    rows = Rows("imagenet-gt")
    for rel, iid in zip(rels, image_ids(rels, "stem")):
        stem, folder_wnid = _stem(rel), _folder_wnid(rel)
        if stem not in parsed:
            w, h, err = size_or_error(root / rel, rel)
            if err:
                rows.error(iid, rel, err, width=w, height=h)
            else:
                rows.image(iid, rel, w, h, [])
            continue
        w, h, objects = parsed[stem]
        rows.image(iid, rel, w, h, ((box, cls_index.get(folder_wnid or name)) for name, box in objects))
    rows.counts["unused_xml"] = len(set(parsed) - {_stem(r) for r in rels})
    return rows.imported(root, "stem", annotations=str(ann_root.resolve()), classes=classes)
