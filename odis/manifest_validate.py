"""Manifest validation: every rule of the schema checked on every part, reported as `FILE: row R: column C: what`
(what `odis stats` prints). The schema itself is odis/manifest.py's.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from odis.manifest import BOX_COLUMNS, COLUMNS, SCHEMA, SOURCES, image_conflicts, manifest_files

_TOL = 1e-3  # float32 rounding of pixel coordinates


def _violations(df, nan: np.ndarray, file: Path, limit: int) -> list[str]:
    """Schema-level rules of one part file as messages `file: row R: column C: what is wrong`. `nan` [rows, 4]
    marks the box cells holding NaN, which pandas no longer tells apart from null."""
    out: list[str] = []
    box = df[BOX_COLUMNS]
    nulls = (box.isna().to_numpy() & ~nan).sum(axis=1)
    err = df["error"].notna()

    def report(mask, column, what):
        for r in np.flatnonzero(np.asarray(mask))[: max(0, limit - len(out))]:
            out.append(f"{file}: row {r}: column {column}: {what(df.iloc[r])}")

    for k, column in enumerate(BOX_COLUMNS):  # one message per row, at its first NaN
        report(nan[:, k] & ~nan[:, :k].any(axis=1), column,
               lambda r: "NaN is not a coordinate (a missing box is null in all four columns)")
    report(df["image_id"].isna() | (df["image_id"] == ""), "image_id", lambda r: "empty")
    report(df["image_id"].fillna("").str.contains(r"[./\\]", regex=True), "image_id",
           lambda r: f"{r.image_id!r} contains '.', '/' or '\\' (ids must be dot-free)")
    report(df["path"].isna() | (df["path"] == ""), "path", lambda r: "empty")
    report(~err & ((df["width"] <= 0) | (df["height"] <= 0)), "width",
           lambda r: f"image size {r.width}x{r.height} must be positive")
    report((nulls > 0) & (nulls < 4), "x0", lambda r: "box is partly null (all four or none must be null)")
    report(err & (nulls < 4), "error", lambda r: "row has an error and a box (the box must be null)")
    full = nulls == 0
    report(full & ((df["x0"] < -_TOL) | (df["y0"] < -_TOL)), "x0",
           lambda r: f"box ({r.x0}, {r.y0}) starts outside the image")
    report(full & (df["x1"] <= df["x0"]), "x1", lambda r: f"x1={r.x1} <= x0={r.x0}")
    report(full & (df["y1"] <= df["y0"]), "y1", lambda r: f"y1={r.y1} <= y0={r.y0}")
    report(full & (df["x1"] > df["width"] + _TOL), "x1", lambda r: f"x1={r.x1} > width={r.width}")
    report(full & (df["y1"] > df["height"] + _TOL), "y1", lambda r: f"y1={r.y1} > height={r.height}")
    report(df["score"].isna() | (df["score"] < 0) | (df["score"] > 1 + _TOL), "score",
           lambda r: f"{r.score} not in [0, 1]")
    report(~df["source"].isin(SOURCES), "source", lambda r: f"{r.source!r} not one of {sorted(SOURCES)}")
    # One path, one id (one id, one image: image_conflicts, over all parts at once).
    per_path = df.groupby("path", sort=False)["image_id"].nunique()
    bad_paths = set(per_path.index[per_path > 1])
    report(df["path"].isin(bad_paths) & ~df["path"].duplicated(), "path",
           lambda r: f"{r.path!r} has several image ids")
    return out


# Types every reader accepts in place of the schema's: pandas writes its strings as large_string.
_SAME_TYPE = {pa.large_string(): pa.string()}


def _type_problems(raw: pa.Table, f: Path) -> list[str]:
    out = []
    for field in SCHEMA:
        if field.name not in raw.column_names:
            out.append(f"{f}: column {field.name}: missing")
            continue
        t = raw.schema.field(field.name).type
        if _SAME_TYPE.get(t, t) != field.type:
            out.append(f"{f}: column {field.name}: type {t}, expected {field.type}")
    return out


def validate_manifest(path: str | os.PathLike, limit: int = 50) -> list[str]:
    """Every violation (up to `limit`) as `FILE: row R: column C: problem`; an empty list means valid.

    Checks the columns and types, dot-free ids, whole-or-null boxes inside the image with x0 < x1 and y0 < y1,
    null box on error rows, scores in [0, 1], known sources, and one path/size per image id across all parts.
    """
    problems: list[str] = []
    images = []  # (image_id, path, width, height, file, row) of every part, for the one-id-one-image check
    files = manifest_files(path)
    if not files:
        return [f"{path}: no parquet parts"]
    for f in files:
        try:
            raw = pq.read_table(f)
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{f}: not a readable parquet file ({e})")
            continue
        problems += _type_problems(raw, f)
        try:  # the value rules run on the schema's types (a column of numbers stored as text is checked as numbers)
            table = raw.select(COLUMNS).cast(SCHEMA).replace_schema_metadata(None)
        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue  # a missing column, or values of another type: reported above
        nan = np.stack([pc.fill_null(pc.is_nan(table.column(c)), False).to_numpy(zero_copy_only=False)
                        for c in BOX_COLUMNS], axis=1)
        df = table.to_pandas()
        problems += _violations(df, nan, f, limit - len(problems))
        images.append(df[["image_id", "path", "width", "height"]].assign(file=str(f), row=np.arange(len(df))))
        if len(problems) >= limit:
            break
    if images:
        import pandas as pd

        rows = pd.concat(images, ignore_index=True)
        for a, b in image_conflicts(rows["image_id"], rows["path"], rows["width"], rows["height"]):
            ra, rb = rows.iloc[a], rows.iloc[b]
            there = "" if ra.file == rb.file else f" of {ra.file}"
            problems.append(f"{rb.file}: column image_id: {rb.image_id!r} names two different images: "
                            f"{rb.path!r} {rb.width}x{rb.height} in row {rb.row} here, {ra.path!r} "
                            f"{ra.width}x{ra.height} in row {ra.row}{there}")
    return problems[:limit]
