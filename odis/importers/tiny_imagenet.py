"""A Tiny-ImageNet-200 folder (one box per image in txt tables) -> box manifest.

Tiny-ImageNet boxes are 0-based inclusive: the box is (x0, y0, x1 + 1, y1 + 1).
"""
from __future__ import annotations

import os
from pathlib import Path

from odis.imageio import list_images
from odis.importers.rows import AnnotationError, Imported, Rows, image_ids, read_text, size_or_error


def _read_tsv(path: Path, ncols: int) -> list[tuple[str, list[str]]]:
    """(`file:line`, fields) of each non-blank line."""
    rows = []
    for k, line in enumerate(read_text(path).splitlines(), start=1):
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
    classes = sorted(read_text(wnids_file).split())
    cls_index = {w: i for i, w in enumerate(classes)}
    boxes = _tiny_boxes(root, classes, wnids_file)
    rels = [r for r in list_images(root)[0] if r.split("/")[0] in ("train", "val", "test")]
    missing = sorted(set(boxes) - set(rels))
    ids = image_ids(rels + missing, "stem")
    rows = Rows("tiny-imagenet-gt")
    for rel, iid in zip(rels, ids):
        w, h, err = size_or_error(root / rel, rel)
        if err:
            rows.error(iid, rel, err)
            continue
        wnid, box = boxes.get(rel, (rel.split("/")[1] if rel.startswith("train/") else None, None))
        cat = cls_index.get(wnid) if wnid else None
        rows.image(iid, rel, w, h, [] if box is None else [(box, cat)], no_box_category=cat)
    for rel, iid in zip(missing, ids[len(rels):]):
        what = "not an image file" if (root / rel).exists() else "file not found"
        rows.error(iid, rel, f"{rel}: {what} under {root} (named by its box line)", missing=True)
    return rows.imported(root, "stem", classes=classes)
