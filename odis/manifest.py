"""Box manifests: one parquet row per box (DESIGN.md §2), provenance in `odis.*` schema metadata.

A manifest is a single `.parquet` file or a directory of part files (what the Ray job writes); readers accept
both. Images without a box get one row with null box ("processed, no box"); unreadable images get one row with
`error` set (width and height are 0 when the file could not even be opened). Nothing is dropped silently.

API used by other stages: `read_manifest(path) -> pyarrow.Table`, `manifest_metadata(path) -> dict`,
`image_id_for(relpath, scheme)`, `validate_manifest(path) -> [messages]`, `write_manifest(table, path, meta)`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from odis import __version__

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
SOURCES = GT_SOURCES | DETECTOR_SOURCES | {"merged"}


class ManifestError(ValueError):
    """A manifest is missing, unreadable or violates the schema; the message names file, row and column."""


# ---- image ids ---------------------------------------------------------------------------------------------

ID_SCHEMES = ("path", "stem", "coco")
_UNSAFE = re.compile(r"[^\w\-]", re.UNICODE)  # keep letters, digits, '_' and '-'; everything else becomes '_'
# The same rule as a byte table, for ASCII text (nearly every path): 0.2 µs instead of the regex's 1 µs, which
# was a tenth of `odis shard`'s per-file cost on small images.
_SAFE_ASCII = bytes(c if chr(c).isalnum() or chr(c) in "_-" else ord("_") for c in range(128)) + b"_" * 128


def _sanitise(text: str) -> str:
    """`text` with every character other than letters, digits, '_' and '-' replaced by '_'."""
    if text.isascii():
        return text.encode("ascii").translate(_SAFE_ASCII).decode("ascii")
    return _UNSAFE.sub("_", text)


# A COCO image's file stem: its id (up to 12 digits, zero-padded or not), after `COCO_train2014_` in COCO-2014.
_COCO_STEM = re.compile(r"(?:COCO_[A-Za-z0-9]+_)?(\d{1,12})", re.ASCII)


def image_id_for(relpath: str, scheme: str = "path") -> str:
    """The stable, unique, dot-free key of the image at `relpath` (POSIX path relative to the images root).

    Schemes (the manifest records its scheme as `odis.id_scheme`; any stage that must match keys uses the same):
    - "path" (folders, the default): every character other than letters, digits, '_' and '-' ('/' and '.'
      included) becomes '_', then '-' and the first 10 hex digits of SHA-1(relpath) are appended, so two paths
      that sanitise alike ('a/b.jpg', 'a_b.jpg', 'a/b.png') still get different ids.
      `train/dog 1.jpg` -> `train_dog_1_jpg-<sha1[:10]>`.
    - "stem" (ImageNet, Tiny-ImageNet, whose file stems are unique): the file stem, unsafe characters -> '_'.
    - "coco": the number that ends a COCO file name, `NNNNNNNNNNNN.jpg` (2017) or `COCO_<split>_NNNNNNNNNNNN.jpg`
      (2014), 12-digit zero-padded (`000000000139`): the JSON's image id, as import-boxes keys COCO rows. Any other
      stem is a ValueError naming the file (its digits would make a wrong id, e.g. the 2014 of the split).
    """
    if type(relpath) is str and relpath.isascii() and "\\" not in relpath and relpath[:1] != "/":
        rel = relpath  # nearly every path: ASCII is already NFC, with no '\\' to turn (a tenth of an id's cost)
    else:
        rel = unicodedata.normalize("NFC", str(relpath).replace("\\", "/")).lstrip("/")
    if not rel:
        raise ValueError("image_id_for: empty path")
    if scheme == "path":
        return f"{_sanitise(rel)}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:10]}"
    stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if scheme == "stem":
        return _sanitise(stem)
    if scheme == "coco":
        m = _COCO_STEM.fullmatch(stem)
        if m is None:
            raise ValueError(f"{relpath}: not a COCO image name (NNNNNNNNNNNN.jpg or COCO_<split>_NNNNNNNNNNNN.jpg), "
                             "so it has no --id-scheme coco id; use --id-scheme stem (unique file stems) or path")
        return f"{int(m.group(1)):012d}"
    raise ValueError(f"image_id_for: unknown scheme {scheme!r}, expected one of {ID_SCHEMES}")


def image_ids_of(relpaths, scheme: str) -> dict[str, str]:
    """relpath -> image_id for a whole file list (see image_id_list)."""
    relpaths = list(relpaths)
    return dict(zip(relpaths, image_id_list(relpaths, scheme)))


def image_id_list(relpaths: list[str], scheme: str) -> list[str]:
    """image_id_for of each path, in order. ValueError naming the file when a name has no id under `scheme`, and
    when two files share one id: a key names one sample at every later stage (manifest, shard, train). An unknown
    scheme is an error about the option, whatever the files."""
    if scheme not in ID_SCHEMES:
        raise ValueError(f"--id-scheme {scheme!r}: expected one of {', '.join(ID_SCHEMES)}")
    ids = _plain_path_ids(relpaths) if scheme == "path" else None
    if ids is not None and len(set(ids)) == len(ids):
        return ids
    ids, owner = [], {}
    for r in relpaths:
        try:
            i = image_id_for(r, scheme)
        except ValueError as e:  # named by its file once (the coco scheme's message starts with it already)
            msg = str(e).removeprefix("image_id_for: ")
            raise ValueError(msg if msg.startswith(f"{r}: ") else f"{r}: {msg}") from None
        if i in owner:
            raise ValueError(f"image_id {i!r} (--id-scheme {scheme}) is shared by {owner[i]}, {r}; ids must be "
                             "unique: use --id-scheme path (ids from the whole relative path)")
        owner[i] = r
        ids.append(i)
    return ids


_SAFE_ASCII_NUL = b"\0" + _SAFE_ASCII[1:]  # _SAFE_ASCII that keeps NUL, the separator of _plain_path_ids


def _plain_path_ids(relpaths: list[str]) -> list[str] | None:
    """The "path" ids of a list of plain paths (ASCII, no '\\', none empty or starting with '/'), the same as
    image_id_for's, but sanitised by one translate of the NUL-joined list: 0.7 µs a path instead of 1.8, which was
    a tenth of `odis shard`'s time on small images. None when any path is not plain (image_id_for then)."""
    try:
        joined = "\0".join(relpaths)
    except TypeError:  # not all str
        return None
    if (not joined.isascii() or "\\" in joined or joined.count("\0") != len(relpaths) - 1 or not relpaths
            or joined[:1] in ("", "/", "\0") or joined[-1] == "\0" or "\0\0" in joined or "\0/" in joined):
        return None
    raw = joined.encode("ascii")
    safe = raw.translate(_SAFE_ASCII_NUL).decode("ascii").split("\0")
    return [f"{name}-{hashlib.sha1(path).hexdigest()[:10]}" for name, path in zip(safe, raw.split(b"\0"))]


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
    """Write one parquet file atomically (temporary name, then rename) with `odis.*` metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.cast(SCHEMA).replace_schema_metadata(_encode_metadata(metadata))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


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


# ---- validation --------------------------------------------------------------------------------------------

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


# ---- statistics --------------------------------------------------------------------------------------------

def _quantiles(x: np.ndarray) -> dict:
    if x.size == 0:
        return {}
    q = np.quantile(x, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]),
            "max": float(q[4]), "mean": float(x.mean())}


def box_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Per-box arrays of a manifest (rows with a box only): relative area, score, and per-image box counts."""
    df = table.select(["image_id", "width", "height", *BOX_COLUMNS, "score", "error"]).to_pandas()
    has_box = df["x0"].notna()
    b = df[has_box]
    rel_area = ((b.x1 - b.x0) * (b.y1 - b.y0) / (b.width.astype(float) * b.height.astype(float))).to_numpy()
    ok_images = df.loc[df["error"].isna(), "image_id"].unique()
    counts = b.groupby("image_id").size().reindex(ok_images, fill_value=0).to_numpy()
    return {"rel_area": rel_area, "score": b["score"].to_numpy(dtype=float), "boxes_per_image": counts}


def summary_stats(table: pa.Table) -> dict:
    """Images, boxes, boxes per image, relative box area and score distributions, no-box and error counts."""
    arr = box_arrays(table)
    df = table.select(["image_id", "x0", "error", "source"]).to_pandas()
    errors = df.loc[df["error"].notna(), "image_id"].nunique()
    counts = arr["boxes_per_image"]
    return {
        "images": int(df["image_id"].nunique()),
        "boxes": int(df["x0"].notna().sum()),
        "no_box_images": int((counts == 0).sum()),
        "error_images": int(errors),
        "boxes_per_image": _quantiles(counts.astype(float)),
        "box_area_fraction": _quantiles(arr["rel_area"]),
        "score": _quantiles(arr["score"]),
        "sources": {k: int(v) for k, v in df["source"].value_counts().items()},
        "errors_by_reason": _error_reasons(df["error"].dropna()),
    }


def _error_reasons(errors) -> dict[str, int]:
    """Error messages grouped by their reason (the text after the file name)."""
    reasons = errors.map(lambda e: e.split(": ", 1)[-1].split(" (", 1)[0])
    return {k: int(v) for k, v in reasons.value_counts().head(10).items()}


def plot_stats(table: pa.Table, out: str | os.PathLike, title: str = "") -> Path:
    """Histograms of boxes per image, relative box area (log) and score, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = box_arrays(table)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist(arr["boxes_per_image"], bins=min(50, int(arr["boxes_per_image"].max(initial=0)) + 1))
    ax[0].set(title="boxes per image", xlabel="boxes", ylabel="images")
    area = arr["rel_area"][arr["rel_area"] > 0]
    ax[1].hist(area, bins=np.logspace(-5, 0, 41) if area.size else 10)
    ax[1].set(title="box area / image area", xscale="log", ylabel="boxes")
    ax[2].hist(arr["score"], bins=40, range=(0, 1))
    ax[2].set(title="score", ylabel="boxes")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
