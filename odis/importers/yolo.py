"""A folder of images with YOLO txt labels (`class cx cy w h`, normalised to the image) -> box manifest."""
from __future__ import annotations

import os
from pathlib import Path

from odis.imageio import list_images
from odis.importers.rows import AnnotationError, Imported, Rows, image_ids, read_text, size_or_error


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


def _boxes(txt: Path, w: int, h: int):
    """(box in pixels, class) of each non-blank line of a label file."""
    lines = read_text(txt).splitlines() if txt.is_file() else []
    for k, line in enumerate(lines, start=1):
        if line.strip():
            cls, (x0, y0, x1, y1) = parse_yolo_line(line, f"{txt}:{k}")
            yield (x0 * w, y0 * h, x1 * w, y1 * h), cls


def import_yolo(images: str | os.PathLike, labels: str | os.PathLike | None = None) -> Imported:
    """YOLO txt labels (`class cx cy w h`, normalised to the image). The label of `images/.../x.jpg` is
    `labels/.../x.txt` (ultralytics' rule), or `LABELS/<relpath>.txt` when `labels` is given. An image without
    a label file is a no-box image. Ids: the "path" scheme of `image_id_for`."""
    root = Path(images)
    lab = Path(labels) if labels else None
    if lab is not None and not lab.is_dir():
        raise AnnotationError(f"{lab}: labels folder not found")
    rels, _ = list_images(root)
    rows = Rows("yolo-labels")
    for rel, iid in zip(rels, image_ids(rels, "path")):
        w, h, err = size_or_error(root / rel, rel)
        if err:
            rows.error(iid, rel, err)
            continue
        txt = _yolo_label_path(root, rel, lab)
        if rows.image(iid, rel, w, h, _boxes(txt, w, h)) == 0:
            rows.counts["missing_label_files"] += 0 if txt.is_file() else 1
    return rows.imported(root, "path", annotations=None if lab is None else str(lab.resolve()))
