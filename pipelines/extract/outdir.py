"""The output folder of extract-boxes between runs: what an earlier (maybe killed) run left, what a resume skips,
and moving the finished parts into place.

Parts are written into a staging folder beside OUT (`.NAME.partial/`), each one atomically (odis.manifest's
write_manifest); when the job succeeds they move into OUT and the staging folder goes. Images whose id is already
in OUT or in a staged part are done, except error rows whose reason may pass next time (PASSING_REASONS): those
rows are dropped and their images processed again. `--overwrite` deletes only the parts an earlier run wrote: an
OUT that holds anything else, or that overlaps the images folder, is refused.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from odis.files import tmp_pattern
from odis.manifest import (ManifestError, empty_columns, manifest_files, manifest_metadata, read_manifest,
                           table_from_columns, write_manifest)
from odis.outdir import OutputFolder, changed_settings, refuse_changed
from odis.pipelines.extract.job import DETECTOR_FAILED
from odis.pipelines.extract.settings import RESUME_KEYS

# Error rows a resume redoes, by the reason after `<path>: `: the detector's failures and the reads that may pass
# next time (the system's errors: permissions, I/O on a network filesystem, a file missing; odis.imageio's
# "cannot read", and BoxExtractor's own for anything unforeseen). A file PIL finds is no image, or cannot open or
# decode, stays an error row (redone only with --overwrite).
PASSING_REASONS = (f"{DETECTOR_FAILED} (", "cannot read (", "file not found")

# What extract-boxes writes into OUT and its staging folder: parts, and the temporary file of a part being
# written (write_manifest) when a run was killed.
_PART = r"part-.*\.parquet"
_OURS = f"{_PART}|{tmp_pattern(_PART)}"


def redone_on_resume(path: str, error: str | None) -> bool:
    """Whether an error row's image is processed again by a resumed run (PASSING_REASONS)."""
    return error is not None and error.startswith(tuple(f"{path}: {r}" for r in PASSING_REASONS))


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def check_out_apart(out: Path, images: Path) -> None:
    """Refuse an --out that is, holds or lies inside --images: parts would land among the images, and
    --overwrite would delete them."""
    o, i = out.resolve(), images.resolve()
    if o == i or o.is_relative_to(i) or i.is_relative_to(o):
        how = "is" if o == i else "is inside" if o.is_relative_to(i) else "contains"
        raise ManifestError(f"--out {out} {how} --images {images}; choose an --out outside the images folder")


def prepare_out(out: Path, overwrite: bool, meta: dict, ids: set[str]) -> tuple[set[str], int]:
    """Check OUT and its staging folder for a run with provenance `meta` over the images `ids`, emptying both
    first with `overwrite`; return (ids already done, error rows dropped to be redone)."""
    staging = staging_dir(out)
    folders = [OutputFolder(where, files=_OURS) for where in (out, staging)]
    for f in folders:  # a resume would mix in, --overwrite would delete, what extract-boxes did not write
        f.refuse_others(ManifestError, "extract-boxes", "an extract-boxes output folder")
    if overwrite:
        for f in folders:
            f.clear(drop_empty=True)
    _check_resumable(out, staging, meta)
    return _done((out, staging), ids)


def finish_out(out: Path, meta: dict) -> None:
    """After a successful job: the staged parts into OUT; with nothing staged and no OUT yet, an empty but valid
    manifest."""
    staging = staging_dir(out)
    if staging.is_dir():
        _promote(staging, out)
    elif not out.exists():
        out.mkdir(parents=True)
        write_manifest(table_from_columns(empty_columns()), out / "part-empty.parquet", meta)


def _check_resumable(out: Path, staging: Path, meta: dict) -> None:
    """Refuse to add rows to parts made with other settings (RESUME_KEYS): the manifest would mix two runs."""
    for where in (out, staging):
        if where.is_dir() and manifest_files(where):
            refuse_changed(where, changed_settings(manifest_metadata(where), meta, keys=RESUME_KEYS), ManifestError)


def _done(parts_in: tuple[Path, ...], ids: set[str]) -> tuple[set[str], int]:
    """The image ids the parts in these folders cover (what a resumed job skips), after removing the rows of `ids`
    whose error may pass next time (redone_on_resume): those images are processed again and never get a second set
    of rows. Each such part is rewritten atomically, or deleted when nothing is left; a kill right after leaves the
    images without rows, i.e. still to do. Returns (done ids, rows removed), reading each part once."""
    done, dropped = set(), 0
    for part in [p for where in parts_in if where.is_dir() for p in manifest_files(where)]:
        t = pq.read_table(part, columns=["image_id", "path", "error"]).to_pydict()
        drop = [i in ids and redone_on_resume(p, e) for i, p, e in zip(t["image_id"], t["path"], t["error"])]
        done.update(i for i, d in zip(t["image_id"], drop) if not d)
        if not any(drop):
            continue
        dropped += sum(drop)
        if all(drop):
            part.unlink()
        else:
            write_manifest(read_manifest(part).filter(pa.array([not d for d in drop])), part, manifest_metadata(part))
    return done, dropped


def _promote(staging: Path, out: Path) -> None:
    """Move the complete parts from the staging folder into OUT (each rename is atomic), then drop staging."""
    out.mkdir(parents=True, exist_ok=True)
    for part in manifest_files(staging):
        os.replace(part, out / part.name)
    shutil.rmtree(staging)
