"""What every box importer shares: the row emitter (per-image boxes -> manifest rows and counts), the result type,
and the checks on file names, text files and image headers that stop an import with the file named.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from odis.boxes import account_boxes
from odis.image_ids import image_id_list
from odis.imageio import ImageDecodeError, image_size
from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns

MAX_SIDE = 2**31 - 1  # the manifest stores width and height as int32


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file (and line or key)."""


@dataclass
class Imported:
    table: pa.Table
    metadata: dict
    counts: Counter = field(default_factory=Counter)


class Rows:
    """The manifest rows of one import (all of one `source`) and the counts of what was kept, dropped and why."""

    def __init__(self, source: str):
        self.source = source
        self.cols = empty_columns()
        self.counts: Counter = Counter()

    def image(self, iid: str, rel: str, width: int, height: int, boxes: Iterable[tuple[tuple, int | None]],
              no_box_category: int | None = None) -> int:
        """The rows of one readable image from its (box, category) pairs: one row per box left after clipping to
        the image, or one no-box row (category `no_box_category`) when none is left. Returns the boxes kept."""
        n = 0
        for box, category in boxes:
            b = self._kept_box(box, width, height)
            if b is None:
                continue
            add_row(self.cols, iid, rel, width, height, self.source, b, 1.0, category)
            n += 1
        if n == 0:
            add_row(self.cols, iid, rel, width, height, self.source, category=no_box_category)
            self.counts["no_box_images"] += 1
        self.counts["boxes"] += n
        self.counts["images"] += 1
        return n

    def error(self, iid: str, rel: str, error: str, missing: bool = False, width: int = 0, height: int = 0) -> None:
        """The error row of an image that could not be read (`error_images`, one of the `images`) or, `missing`,
        of a file the annotations list but that is not there (`missing_files`, not one of the `images`)."""
        add_row(self.cols, iid, rel, width, height, self.source, error=error)
        if missing:
            self.counts["missing_files"] += 1
        else:
            self.counts["error_images"] += 1
            self.counts["images"] += 1

    def imported(self, images_root: str | os.PathLike, id_scheme: str, **fields) -> Imported:
        """The finished import: the table, its provenance (`fields` added) and the counts."""
        meta = make_metadata(self.source, images_root, id_scheme, **fields)
        return Imported(table_from_columns(self.cols), meta, self.counts)

    def _kept_box(self, box, width: int, height: int):
        """The box clipped to the image, or None: odis.boxes.account_boxes, its counts added (`clipped`,
        `dropped_not_finite`, `dropped_empty`; `used` is the rows written)."""
        b, used, _, n = account_boxes([box], width, height)
        self.counts.update({k: v for k, v in n.items() if v and k != "used"})
        return b[0] if used[0] else None


def image_ids(rels: list[str], scheme: str) -> list[str]:
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


def read_text(path: Path) -> str:
    """A text annotation file; one that is not UTF-8 stops the import naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})") from None


def size_or_error(path: Path, rel: str):
    """(width, height, None) from the header, or (0, 0, error message)."""
    try:
        w, h = image_size(path, name=rel)
        return w, h, None
    except ImageDecodeError as e:
        return 0, 0, str(e)
