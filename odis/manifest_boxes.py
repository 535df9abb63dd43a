"""A box manifest as the boxes a command uses: `shard --manifest`, `train --boxes` and `eval --boxes` all read it
through `read_box_rows`, which checks its image ids and accounts for every row.

Row accounting (`BoxRows.counts`): rows = duplicate_rows_dropped + error_rows + no_box_rows + used +
dropped_not_finite + dropped_empty, and `clipped` (boxes reaching outside their image, clipped to it) are among the
used. The names are those of odis.boxes.account_boxes, the ones `import-boxes` prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from odis.boxes import account_boxes
from odis.manifest import BOX_COLUMNS, read_manifest, unique_images

_COLUMNS = ["image_id", "path", "width", "height", *BOX_COLUMNS, "score", "category", "source", "error"]


@dataclass
class BoxRows:
    """One entry per manifest row left after exact duplicates are dropped."""

    image_id: list[str]
    width: np.ndarray   # int64 [n], the manifest's image size
    height: np.ndarray
    boxes: np.ndarray   # float64 [n,4], clipped to the image; meaningful where `used`
    score: np.ndarray   # float64 [n]
    used: np.ndarray    # bool [n]: this row's box is used
    dropped: np.ndarray  # bool [n]: this row gives a box that is not used (not finite, or empty in its image)
    clipped: np.ndarray  # bool [n]: this row's box reached outside its image and was clipped to it
    given: np.ndarray   # float64 [n,4]: the boxes as the manifest gives them (NaN where null)
    counts: dict


def read_box_rows(path: str | os.PathLike) -> BoxRows:
    """The manifest's rows, checked (one id, one image: else ManifestError naming both rows) and accounted for."""
    table, duplicates = unique_images(read_manifest(path, columns=_COLUMNS), str(path))
    xyxy = np.stack([_floats(table, c) for c in BOX_COLUMNS], axis=1)
    null = np.stack([table.column(c).is_null().to_numpy(zero_copy_only=False) for c in BOX_COLUMNS], axis=1)
    error = ~table.column("error").is_null().to_numpy(zero_copy_only=False)
    width = table.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
    height = table.column("height").to_numpy(zero_copy_only=False).astype(np.int64)
    score = _floats(table, "score")
    no_box = null.all(axis=1) & ~error
    has = ~null.all(axis=1) & ~error  # partly null coordinates count as not finite: NaN in their place
    xyxy[has & ~np.isfinite(score)] = np.nan  # a box without a usable score is not a box either
    boxes, used_of_has, clipped_of_has, counts = account_boxes(xyxy[has], width[has], height[has])
    out = np.full_like(xyxy, np.nan)
    out[has] = boxes
    used, clipped = np.zeros(len(xyxy), bool), np.zeros(len(xyxy), bool)
    used[has], clipped[has] = used_of_has, clipped_of_has
    counts = {"rows": int(len(xyxy) + duplicates), "duplicate_rows_dropped": duplicates,
              "error_rows": int(error.sum()), "no_box_rows": int(no_box.sum()), **counts}
    ids = table.column("image_id").to_pylist()
    return BoxRows(ids, width, height, out, np.nan_to_num(score, nan=1.0), used, has & ~used, clipped, xyxy, counts)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, NaN where null."""
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False).astype(np.float64)
