"""Box manifests: one parquet row per box, provenance in `odis.*` schema metadata. This module owns the schema,
the metadata, reading and writing, the one-id-one-image rule and merging.

A manifest is a single `.parquet` file or a directory of part files (what the Ray job writes); readers accept
both. Images without a box get one row with null box ("processed, no box"); unreadable images get one row with
`error` set (width and height are 0 when the file could not even be opened). Nothing is dropped silently.

API used by other stages: `read_manifest(path) -> pyarrow.Table`, `manifest_metadata(path) -> dict`,
`write_manifest(table, path, meta)`. Image ids are odis/image_ids.py's, validation is odis/manifest_validate.py,
statistics and the plot odis/manifest_stats.py.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from odis import __version__
from odis.files import write_atomic

MANIFEST_VERSION = 1
META_PREFIX = "odis."

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("x0", pa.float32()),
    pa.field("y0", pa.float32()),
    pa.field("x1", pa.float32()),
    pa.field("y1", pa.float32()),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("category", pa.int32()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("error", pa.string()),
])
COLUMNS = SCHEMA.names
BOX_COLUMNS = ["x0", "y0", "x1", "y1"]
GT_SOURCES = {"coco-gt", "imagenet-gt", "yolo-labels", "tiny-imagenet-gt"}
DETECTOR_SOURCES = {"yolo", "mavl", "selective-search"}
CONTROL_SOURCES = {"jitter", "random"}  # boxes made by odis experiment: GT moved and scaled, or random
SOURCES = GT_SOURCES | DETECTOR_SOURCES | CONTROL_SOURCES | {"merged"}


class ManifestError(ValueError):
    """A manifest is missing, unreadable or violates the schema; the message names file, row and column."""


# ---- building tables ---------------------------------------------------------------------------------------

def empty_columns() -> dict[str, list]:
    return {name: [] for name in COLUMNS}


def add_row(cols: dict[str, list], image_id: str, path: str, width: int, height: int, source: str,
            box: Iterable[float] | None = None, score: float = 1.0, category: int | None = None,
            error: str | None = None) -> None:
    """Append one row to column lists; `box=None` means "no box" (or, with `error`, "unreadable")."""
    x0, y0, x1, y1 = (None,) * 4 if box is None else (float(v) for v in box)
    for k, v in (("image_id", image_id), ("path", path), ("width", int(width)), ("height", int(height)),
                 ("x0", x0), ("y0", y0), ("x1", x1), ("y1", y1), ("score", float(score)),
                 ("category", None if category is None else int(category)), ("source", source),
                 ("error", error)):
        cols[k].append(v)


def table_from_columns(cols: Mapping[str, list | np.ndarray]) -> pa.Table:
    """A manifest table in the exact schema from a dict of column lists/arrays."""
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise ManifestError(f"missing columns {missing}")
    return pa.table({f.name: pa.array(cols[f.name], type=f.type, from_pandas=True) for f in SCHEMA}, schema=SCHEMA)


# ---- metadata ----------------------------------------------------------------------------------------------

def make_metadata(source: str, images_root: str | os.PathLike | None, id_scheme: str, **fields) -> dict:
    """Provenance for a new manifest: version, source, images root, id scheme, creation time, and `fields`
    (weights, weights_sha256, conf, iou, max_boxes, min_area, imgsz, annotations, ...)."""
    meta = {"manifest_version": MANIFEST_VERSION, "odis_version": __version__, "source": source,
            "images_root": None if images_root is None else str(Path(images_root).resolve()),
            "id_scheme": id_scheme,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    meta.update(fields)
    return meta


def _encode_metadata(meta: Mapping) -> dict[bytes, bytes]:
    return {f"{META_PREFIX}{k}".encode(): json.dumps(v).encode() for k, v in meta.items()}


def _decode_metadata(raw: Mapping[bytes, bytes] | None) -> dict:
    out = {}
    for k, v in (raw or {}).items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            try:
                out[key[len(META_PREFIX):]] = json.loads(v.decode())
            except ValueError:
                out[key[len(META_PREFIX):]] = v.decode()
    return out


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file, or of a weights directory (relative names and contents, in sorted order)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---- write / read ------------------------------------------------------------------------------------------

def write_manifest(table: pa.Table, path: str | os.PathLike, metadata: Mapping) -> Path:
    """Write one parquet file atomically (odis.files.write_atomic) with `odis.*` metadata."""
    table = table.cast(SCHEMA).replace_schema_metadata(_encode_metadata(metadata))
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def manifest_files(path: str | os.PathLike) -> list[Path]:
    """The parquet files that make up a manifest: the file itself, or a directory's visible `*.parquet` parts."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        parts = sorted(f for f in p.glob("*.parquet") if not f.name.startswith((".", "_")) and f.is_file())
        return parts
    raise ManifestError(f"{p}: no such manifest (expected a .parquet file or a directory of parts)")


def manifest_metadata(path: str | os.PathLike) -> dict:
    """The `odis.*` provenance of a manifest as a dict, keys without the prefix (`source`, `images_root`, ...)."""
    files = manifest_files(path)
    if not files:
        return {}
    try:
        return _decode_metadata(pq.read_schema(files[0]).metadata)
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{files[0]}: not a readable parquet file ({e})") from None


def read_manifest(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest as one pyarrow Table in the schema (metadata of the first part kept).

    `table.to_pandas()` gives a DataFrame; box columns are NaN where null.
    """
    files = manifest_files(path)
    if not files:
        return SCHEMA.empty_table().select(columns or COLUMNS)
    tables = []
    for f in files:
        try:
            t = pq.read_table(f)
        except (OSError, pa.ArrowException) as e:
            raise ManifestError(f"{f}: not a readable parquet file ({e})") from None
        absent = [c for c in COLUMNS if c not in t.column_names]
        if absent:
            raise ManifestError(f"{f}: missing column(s) {absent}")
        try:
            t = t.select(COLUMNS).cast(SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ManifestError(f"{f}: column types do not match the manifest schema ({e})") from None
        tables.append(t)
    table = pa.concat_tables(tables).replace_schema_metadata(_odis_metadata(pq.read_schema(files[0]).metadata))
    return table.select(columns) if columns else table


def _odis_metadata(raw: Mapping[bytes, bytes] | None) -> dict[bytes, bytes]:
    """Only the `odis.*` keys: a writer's own keys (pandas') describe its columns, not the cast ones, and would make
    `to_pandas()` turn them back into that writer's types."""
    return {k: v for k, v in (raw or {}).items() if k.startswith(META_PREFIX.encode())}


def image_ids_in(path: str | os.PathLike) -> set[str]:
    """The image ids a manifest already covers (empty if it does not exist): what a resumed job skips."""
    p = Path(path)
    if not p.exists():
        return set()
    return set(read_manifest(p, columns=["image_id"]).column("image_id").to_pylist())


# ---- one id, one image ----------------------------------------------------------------------------------

def image_conflicts(ids, paths, widths, heights) -> list[tuple[int, int]]:
    """(first row, conflicting row) for each image id whose rows name two different images (another path or
    size). The one duplicate-id check: `odis stats` reports it, every command that uses a manifest refuses it."""
    import pandas as pd

    if not len(ids):
        return []
    codes = pd.factorize(np.asarray(ids, dtype=object))[0]
    _, first_of = np.unique(codes, return_index=True)
    first = first_of[codes]
    path_codes = pd.factorize(np.asarray(paths, dtype=object))[0]
    w, h = np.asarray(widths), np.asarray(heights)
    differ = (path_codes != path_codes[first]) | (w != w[first]) | (h != h[first])
    rows = np.flatnonzero(differ)
    _, pick = np.unique(codes[rows], return_index=True)
    return [(int(first[r]), int(r)) for r in rows[pick]]


def unique_images(table: pa.Table, where: str) -> tuple[pa.Table, int]:
    """The table without exact duplicate rows (kept once), and how many were dropped. One id for two different
    images would move one image's boxes onto the other: a ManifestError naming both rows. `table` holds at
    least image_id, path, width and height."""
    df = table.to_pandas()
    dup = df.duplicated(keep="first").to_numpy()
    kept = np.flatnonzero(~dup)
    if dup.any():
        table, df = table.filter(pa.array(~dup)), df.iloc[kept]
    conflicts = image_conflicts(df["image_id"], df["path"], df["width"], df["height"])
    if conflicts:
        a, b = conflicts[0]
        ra, rb = df.iloc[a], df.iloc[b]
        more = f" ({len(conflicts) - 1} more id(s) like it; odis stats lists them)" if len(conflicts) > 1 else ""
        raise ManifestError(f"{where}: image_id {ra.image_id!r} names two different images: row {kept[a]} "
                            f"({ra.path!r}, {ra.width}x{ra.height}) and row {kept[b]} ({rb.path!r}, "
                            f"{rb.width}x{rb.height}){more}. Give each image its own id.")
    return table, int(dup.sum())


# ---- merge -------------------------------------------------------------------------------------------------

def merge_manifests(inputs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Concatenate manifests into one file. Rows of an image id present in several inputs must name one image
    (image_conflicts); the provenance of every input is kept under `odis.inputs`."""
    tables, metas, source = [], [], []
    for src in inputs:
        tables.append(read_manifest(src))
        metas.append(manifest_metadata(src))
        source += [str(src)] * tables[-1].num_rows
    merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    cols = {c: merged.column(c).to_numpy(zero_copy_only=False) for c in ("image_id", "path", "width", "height")}
    conflicts = image_conflicts(cols["image_id"], cols["path"], cols["width"], cols["height"])
    if conflicts:
        a, b = conflicts[0]
        raise ManifestError(f"{source[b]}: image_id {cols['image_id'][b]!r} is {cols['path'][b]!r} "
                            f"({cols['width'][b]}x{cols['height'][b]}) but {cols['path'][a]!r} "
                            f"({cols['width'][a]}x{cols['height'][a]}) in {source[a]}")
    roots = {m.get("images_root") for m in metas}
    schemes = {m.get("id_scheme") for m in metas}
    meta = make_metadata("merged", roots.pop() if len(roots) == 1 else None,
                         schemes.pop() if len(schemes) == 1 else "mixed", inputs=metas)
    return write_manifest(merged, out, meta)
