"""`extract_boxes`: check everything that can be checked without the detector, list the images, skip those an
earlier run finished, run the Ray job and stream its results into parquet parts, then move the parts into place.

Everything that can be checked without the detector (its files and options, the id of every image) is checked
before Ray starts and before any output exists, so a mistake costs one line, not a job.
"""
from __future__ import annotations

import os
import re
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from odis.image_ids import ID_SCHEMES, image_ids_of
from odis.manifest import add_row, empty_columns, image_ids_in, manifest_files, table_from_columns, write_manifest
from odis.pipelines.detectors import check_detector
from odis.pipelines.extract.job import RESULT_SCHEMA, DetectorBatchError, DetectorLoadError, detection_dataset
from odis.pipelines.extract.local import local_batches
from odis.pipelines.extract.outdir import check_out_apart, finish_out, prepare_out, staging_dir
from odis.pipelines.extract.settings import ExtractConfig, ExtractSummary, build_metadata
from odis.pipelines.ray_connect import check_ray_address, ray_session


def uses_ray(cfg: ExtractConfig) -> bool:
    """Whether the job runs on Ray: asked for (`use_ray`, an address, RAY_ADDRESS), more than one detector, or a
    Ray this process has initialised already; else one detector in this process (pipelines/extract/local.py)."""
    ray = sys.modules.get("ray")
    if cfg.use_ray or cfg.ray_address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return True
    cuda = cfg.detector.device.startswith("cuda")
    if cfg.num_workers is not None:
        return cfg.num_workers > 1
    return cuda and (cfg.gpus_per_worker < 1 or _visible_gpus() > 1)  # cuda default: detectors fill the GPUs


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def extract_boxes(cfg: ExtractConfig) -> ExtractSummary:
    """Run the job (see pipelines/extract/__init__.py): on Ray or in this process (`uses_ray`)."""
    out, root = Path(cfg.out), Path(cfg.images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a folder")
    check_detector(cfg.detector)
    if not 0 < cfg.gpus_per_worker <= 1:
        raise ValueError(f"--num-gpus-per-worker {cfg.gpus_per_worker:g}: a detector runs on one GPU, so its share "
                         "is in (0, 1] (0.5: two detectors per GPU)")
    check_ray_address(cfg.ray_address)  # an unreachable cluster is said before the images are listed
    check_out_apart(out, root)
    # listed before --overwrite deletes anything: a bad id scheme must not cost the output
    items, not_images, left_out = _list(cfg)
    meta = build_metadata(cfg)
    done, redone = prepare_out(out, cfg.overwrite, meta, {it["image_id"] for it in items})
    todo = [it for it in items if it["image_id"] not in done]
    summary = ExtractSummary(skipped_done=len(items) - len(todo), not_images=not_images, out=str(out), redone=redone,
                             left_out=left_out)
    t0 = time.perf_counter()
    if todo and uses_ray(cfg):
        import ray

        with ray_session(cfg.ray_address, log_to_driver=False, configure_logging=True, logging_level="ERROR"):
            try:
                _run(cfg, detection_results(cfg, todo), len(todo), staging_dir(out), meta, summary)
            except ray.exceptions.RayError as e:  # e.g. the detector failed to load in its actor
                raise _job_failed(str(e), staging_dir(out)) from e
    elif todo:
        try:
            _run(cfg, local_batches(cfg, todo), len(todo), staging_dir(out), meta, summary)
        except (DetectorLoadError, DetectorBatchError) as e:
            raise _job_failed(f"{type(e).__name__}: {e}", staging_dir(out)) from e
    finish_out(out, meta)
    summary.seconds = time.perf_counter() - t0
    summary.images_per_s = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
    summary.images = len(image_ids_in(out))
    return summary


def _list(cfg: ExtractConfig) -> tuple[list[dict], int, list[dict]]:
    """({image_id, path} of every image to cover, sorted by path; number of non-image files; what the listing left
    out and why). The same listing as `odis shard` (symlinked folders followed once), so both see the same files."""
    from odis.pipelines.shard.scan import scan_images

    if cfg.id_scheme not in ID_SCHEMES:
        raise ValueError(f"--id-scheme {cfg.id_scheme!r}: expected one of {', '.join(ID_SCHEMES)}")
    scan = scan_images(cfg.images)
    rels = [rel for rel, _ in scan.images]
    if cfg.limit is not None:
        rels = rels[: cfg.limit]
    ids = image_ids_of(rels, cfg.id_scheme)  # two files with one id: refused before starting
    return [{"image_id": ids[rel], "path": rel} for rel in rels], len(scan.others), scan.warnings


def _quiet_ray_data_console() -> None:
    """Ray Data's console lines would break our progress bar, and on a failure it prints the whole stack trace
    that the driver then sums up in one line; everything still goes to its ray-data.log file. Only Ray's own
    console handlers: a handler of the caller's (an app's, pytest's) that also sits there is not ours to mute."""
    import logging

    for h in logging.getLogger("ray.data").handlers:
        if type(h).__module__.startswith("ray.") and "File" not in type(h).__name__:
            h.setLevel(logging.CRITICAL)


def detection_results(cfg: ExtractConfig, todo: list[dict]):
    """The Ray job's result tables, streamed to the driver as they come."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar (_run) counts images
    _quiet_ray_data_console()
    return detection_dataset(cfg, todo).iter_batches(batch_size=None, batch_format="pyarrow")


def _run(cfg: ExtractConfig, results, total: int, staging: Path, meta: dict, summary: ExtractSummary) -> None:
    """Stream `results` (tables of RESULT_SCHEMA) into parts of `cfg.part_size` images in `staging`."""
    from tqdm import tqdm

    # No staging.mkdir here: write_manifest makes it with the first part, so a job that fails before writing
    # anything leaves no empty `.NAME.partial/` behind.
    run_id, seq, pending, pending_n = uuid.uuid4().hex[:8], 0, [], 0
    counts = Counter()

    def flush():
        nonlocal seq, pending, pending_n
        if pending:
            write_manifest(pa.concat_tables(pending), staging / f"part-{run_id}-{seq:05d}.parquet", meta)
            seq, pending, pending_n = seq + 1, [], 0

    bar = tqdm(total=total, unit="img", desc=f"extract-boxes [{cfg.detector.name}]", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in results:
            pending.append(results_to_manifest(batch, cfg.detector.name, counts, summary.errors))
            pending_n += batch.num_rows
            summary.processed += batch.num_rows
            bar.update(batch.num_rows)
            bar.set_postfix(boxes=counts["boxes"], errors=counts["error_images"], refresh=False)
            if pending_n >= cfg.part_size:
                flush()
        flush()
    finally:
        bar.close()
    summary.boxes, summary.no_box_images = counts["boxes"], counts["no_box_images"]
    summary.error_images = counts["error_images"]


def results_to_manifest(results: pa.Table, source: str, counts: Counter, errors: Counter) -> pa.Table:
    """Explode per-image results to manifest rows: one per box, one no-box row, or one error row."""
    cols = empty_columns()
    r = results.to_pydict()
    for image_id, rel, w, h, boxes, scores, err in zip(*(r[k] for k in RESULT_SCHEMA.names)):
        if err is not None:
            add_row(cols, image_id, rel, w, h, source, error=err)
            counts["error_images"] += 1
            errors[err.split(": ", 1)[-1].split(" (", 1)[0]] += 1
            continue
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(b) == 0:
            add_row(cols, image_id, rel, w, h, source)
            counts["no_box_images"] += 1
        for box, s in zip(b, scores):
            add_row(cols, image_id, rel, w, h, source, box, s, None)
        counts["boxes"] += len(b)
    return table_from_columns(cols)


def _job_failed(error: str, staging: Path) -> RuntimeError:
    """One line for a failed job (the text of Ray's error, or "DetectorLoadError: ..."): its root cause and whether
    rerunning can help (a detector that cannot load will not load next time either; a lost worker or node, or
    memory, may be fine next time)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b.*:", ln)]
    kept = (f"the {len(manifest_files(staging))} finished part(s) are kept in {staging}"
            if staging.is_dir() and manifest_files(staging) else "nothing was written")
    loads = [ln for ln in raised if "DetectorLoadError" in ln]
    if loads:
        cause = loads[-1].split(": ", 1)[-1]
        return RuntimeError(f"{cause}; fix --weights or the detector options and rerun ({kept})")
    batches = [ln for ln in raised if "DetectorBatchError" in ln]
    if batches:
        cause = batches[-1].split(": ", 1)[-1]
        return RuntimeError(f"{cause}; fix the cause (--device, memory) and rerun the same command to "
                            f"resume ({kept})")
    cause = (raised or lines or ["unknown error"])[-1]  # the root exception is raised last
    return RuntimeError(f"the Ray job failed: {cause} ({kept}; if the cause was transient, e.g. a lost worker or "
                        "node or out of memory, rerun the same command to resume)")
