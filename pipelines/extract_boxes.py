"""`odis extract-boxes`: a Ray Data job that runs a class-agnostic detector over a folder of images and writes a
box manifest (a directory of parquet parts).

Flow: the driver lists image paths (the job's input, not `read_images`) -> `map_batches` with a callable class
(`BoxExtractor`: the detector is loaded once per actor; decoding happens inside the batch function, each row's
failure becomes an `error` value) -> the driver streams the per-image results back, explodes them to one row per
box and writes parquet parts into a staging folder next to the output (`.NAME.partial/`), each part atomically
(temporary name, then rename). When the job succeeds the parts move into OUT and the staging folder goes.

Resume: images whose id is already in OUT or in a complete staged part are skipped, so a killed run keeps its
finished parts and never leaves half-written or duplicated rows. An image the detector failed on (an error row
`<path>: detector failed (...)`) is not done: its row is dropped and it is processed again; an image that could
not be read keeps its error row (reading it again gives the same error). `overwrite=True` starts over, deleting only
the parts an earlier run wrote: an OUT that holds anything else, or that overlaps the images folder, is refused.

Everything that can be checked without the detector (its files and options, the id of every image) is checked
before Ray starts and before any output exists, so a mistake costs one line, not a job.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from odis.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from odis.manifest import (ID_SCHEMES, ManifestError, add_row, empty_columns, image_ids_in, image_ids_of,
                           make_metadata, manifest_files, manifest_metadata, read_manifest, sha256_of,
                           table_from_columns, write_manifest)
from odis.pipelines.detectors import DEFAULTS, DetectorConfig, blank_image, build_detector, check_detector
from odis.pipelines.ray_connect import check_ray_address, init_ray

# Metadata that must agree for a resumed run to add rows to an existing manifest.
_RESUME_KEYS = ("source", "images_root", "id_scheme", "weights_sha256", "conf", "iou", "max_boxes", "min_area",
                "imgsz")

RESULT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.float32())), ("scores", pa.list_(pa.float32())), ("error", pa.string()),
])


@dataclass
class ExtractConfig:
    detector: DetectorConfig
    images: str
    out: str
    id_scheme: str = "path"  # odis.manifest.image_id_for scheme; must match the shards the boxes are joined to
    batch_size: int = 16
    num_workers: int | None = None  # None: 1 on CPU, one per GPU with --device cuda
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared out among the workers
    ray_address: str | None = None
    overwrite: bool = False
    limit: int | None = None  # only the first N images (sorted by path)
    part_size: int = 1000  # images per parquet part
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True


@dataclass
class ExtractSummary:
    images: int = 0  # images in the manifest after this run
    processed: int = 0  # images processed by this run
    skipped_done: int = 0  # images already in the manifest (resume)
    boxes: int = 0
    no_box_images: int = 0
    error_images: int = 0
    not_images: int = 0  # files under the root without an image extension (listed, not processed)
    redone: int = 0  # images an earlier run could not read or detect, processed again (counted in `processed`)
    left_out: list = field(default_factory=list)  # {"path", "reason"}: folders and links the listing did not walk
    seconds: float = 0.0
    images_per_s: float = 0.0
    out: str = ""
    errors: Counter = field(default_factory=Counter)


class DetectorLoadError(RuntimeError):
    """The detector could not be built in a Ray actor: rerunning will not help (the driver looks for this name
    in Ray's error to say so)."""


class DetectorBatchError(RuntimeError):
    """The detector loaded but failed on every image of a batch, one by one too, and on a blank image: a broken
    detector or device, not the images, so the job stops (finished parts kept) instead of writing an error row for
    every image."""


DETECTOR_FAILED = "detector failed"  # the reason of an error row from the detector, not from the image
# Error rows a resume redoes, by the reason after `<path>: `: the detector's failures and the reads that may pass
# next time (the system's errors: permissions, I/O on a network filesystem, a file missing; odis.imageio's
# "cannot read", and BoxExtractor's own for anything unforeseen). A file PIL finds is no image, or cannot open or
# decode, stays an error row (redone only with --overwrite).
PASSING_REASONS = (f"{DETECTOR_FAILED} (", "cannot read (", "file not found")


def redone_on_resume(path: str, error: str | None) -> bool:
    """Whether an error row's image is processed again by a resumed run (PASSING_REASONS)."""
    return error is not None and error.startswith(tuple(f"{path}: {r}" for r in PASSING_REASONS))


class BoxExtractor:
    """The batch function: decode each path (errors captured per row), detect, one result row per image."""

    def __init__(self, detector: dict, images: str, max_pixels: int):
        # A detector that cannot load fails the first batch, not the constructor: Ray restarts an actor whose
        # constructor raised and prints each attempt's traceback (~200 lines) before the job fails.
        self.detector, self.load_error = None, None
        try:
            self.detector = build_detector(DetectorConfig(**detector))
        except Exception as e:  # noqa: BLE001 - raised at the first batch, marked as a load failure
            why = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())  # one line: the driver says it
            self.load_error = f"cannot load the {detector['name']} detector ({type(e).__name__}: {why})"
        self.root = Path(images)
        self.max_pixels = max_pixels
        # Decoding runs in threads (PIL releases the GIL), one per CPU this actor holds: serial decoding left the
        # cores the detector uses idle for a third of each batch on a 2-core machine (benchmarks/extract.py).
        self.prepare = getattr(self.detector, "prepare", None)
        self.readers = ThreadPoolExecutor(max_workers=_actor_cpus(), thread_name_prefix="odis-decode")
        # The actor runs two batches at a time (_actor_pool): one decodes while the other holds the detector, which
        # is one model and not thread-safe.
        self.detector_lock = threading.Lock()

    def _read(self, rel: str) -> tuple[object, int, int, str | None]:
        """(image for the detector or None, width, height, error) of one file; never raises."""
        try:
            rgb, (w, h) = decode_rgb(self.root / rel, max_pixels=self.max_pixels, name=rel)
        except ImageDecodeError as e:
            return None, 0, 0, str(e)
        except Exception as e:  # noqa: BLE001 - never let one file abort the job
            return None, 0, 0, f"{rel}: cannot read ({type(e).__name__}: {e})"
        try:
            return (self.prepare(rgb) if self.prepare else Image.fromarray(rgb)), w, h, None
        except Exception:  # noqa: BLE001 - the detector converts it again: a failure is then its (redone) row
            return Image.fromarray(rgb), w, h, None

    def _detect(self, images: list) -> list:
        """Detector on the batch; if the batch fails, image by image so the failure is pinned to its row."""
        with self.detector_lock:
            try:
                return self.detector(images)
            except Exception:  # noqa: BLE001 - any detector failure becomes a per-image result below
                out = []
                for im in images:
                    try:
                        out.append(self.detector([im])[0])
                    except Exception as e:  # noqa: BLE001
                        out.append(e)
                return out

    def _works(self) -> bool:
        """Whether the detector still runs on a blank image (the check YoloDetector makes at load)."""
        with self.detector_lock:
            try:
                self.detector([blank_image()])
                return True
            except Exception:  # noqa: BLE001 - a broken detector or device
                return False

    def __call__(self, batch: dict) -> pa.Table:
        if self.load_error:  # a new exception each call: two threads may raise it at once
            raise DetectorLoadError(self.load_error)
        rows = {k: [] for k in RESULT_SCHEMA.names}
        decoded, where = [], []
        rels = [str(rel) for rel in batch["path"]]
        for image_id, rel, (im, w, h, err) in zip(batch["image_id"], rels, self.readers.map(self._read, rels)):
            if im is not None:
                decoded.append(im)
                where.append(len(rows["image_id"]))
            for k, v in (("image_id", str(image_id)), ("path", rel), ("width", w), ("height", h),
                         ("boxes", []), ("scores", []), ("error", err)):
                rows[k].append(v)
        if decoded:
            results = self._detect(decoded)
            failed = [(i, r) for i, r in zip(where, results) if isinstance(r, Exception)]
            # Every image of a batch failed: the detector is broken (stop the job) if it fails on a blank image too;
            # else the images are the cause (tiny ones, say, or the ones an earlier run failed on, which a resume
            # batches together), and they get error rows, redone by a rerun.
            if len(decoded) > 1 and len(failed) == len(decoded) and not self._works():
                i, e = failed[0]
                first = (str(e).strip().splitlines() or [""])[0]
                raise DetectorBatchError(f"the detector failed on all {len(decoded)} images of a batch, e.g. "
                                         f"{rows['path'][i]} ({type(e).__name__}: {first})")
            for i, res in zip(where, results):
                if isinstance(res, Exception):
                    rows["error"][i] = f"{rows['path'][i]}: {DETECTOR_FAILED} ({type(res).__name__}: {res})"
                else:
                    rows["boxes"][i] = res[0].reshape(-1).tolist()
                    rows["scores"][i] = res[1].tolist()
        return pa.table(rows, schema=RESULT_SCHEMA)


def _actor_pool(n: int):
    """n detector actors, each running two batches at a time in two threads (BoxExtractor: one decodes while the
    other holds the detector). Ray Data runs a class's calls one at a time unless told they may overlap."""
    import inspect

    import ray

    if "enable_true_multi_threading" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
        return ray.data.ActorPoolStrategy(size=n, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(size=n)  # an older Ray: decode and detect take turns


def _actor_cpus() -> int:
    """The CPUs Ray gave this actor (its decode threads), else the CPUs this process may run on."""
    try:
        import ray

        n = ray.get_runtime_context().get_assigned_resources().get("CPU", 0) if ray.is_initialized() else 0
    except Exception:  # noqa: BLE001 - outside Ray, or an older Ray without the call
        n = 0
    return max(1, int(n)) if n else len(os.sched_getaffinity(0))


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


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _check_resumable(out: Path, staging: Path, meta: dict) -> None:
    for where in (out, staging):
        if where.is_dir() and manifest_files(where):
            old = manifest_metadata(where)
            diff = {k: (old.get(k), meta.get(k)) for k in _RESUME_KEYS if old.get(k) != meta.get(k)}
            if diff:
                raise ManifestError(f"{where} was made with other settings {diff} (old, new); "
                                    "use --overwrite to start over or another --out")


def _check_out_apart(out: Path, images: Path) -> None:
    """Refuse an --out that is, holds or lies inside --images: parts would land among the images, and
    --overwrite would delete them."""
    o, i = out.resolve(), images.resolve()
    if o == i or o.is_relative_to(i) or i.is_relative_to(o):
        how = "is" if o == i else "is inside" if o.is_relative_to(i) else "contains"
        raise ManifestError(f"--out {out} {how} --images {images}; choose an --out outside the images folder")


# What extract-boxes writes into OUT and its staging folder: parts, and the temporary file of a part being
# written (write_manifest) when a run was killed.
_OURS = re.compile(r"part-.*\.parquet|\.part-.*\.parquet\.tmp-\d+")


def _check_only_ours(where: Path) -> None:
    """Refuse an output (or staging) folder that holds anything extract-boxes did not write: a resume would mix
    foreign parquet files into the manifest, and --overwrite must never delete someone else's files."""
    if where.is_file() or where.is_symlink() and not where.is_dir():
        raise ManifestError(f"{where} exists and is a file, not an extract-boxes output folder; "
                            "use another --out (or remove it yourself)")
    if not where.is_dir():
        return
    others = sorted(p.name for p in where.iterdir() if not (_OURS.fullmatch(p.name) and p.is_file()))
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise ManifestError(f"{where} holds files extract-boxes did not write ({', '.join(others[:3])}{more}); "
                            "use another --out (extract-boxes never deletes or mixes in other files)")


def _delete_ours(where: Path) -> None:
    """--overwrite: remove the parts written by an earlier run, then the folder if nothing else is left (only
    after _check_only_ours, so nothing else is in it)."""
    if not where.is_dir():
        return
    for p in where.iterdir():
        if _OURS.fullmatch(p.name):
            p.unlink()
    where.rmdir()


def _ray_init(address: str | None):
    """Reuse an initialised Ray; else connect to `address`/RAY_ADDRESS (an unreachable one fails within seconds),
    else start a private local instance ("local": never attach to someone else's cluster by accident). Returns
    True if we started it."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    return init_ray(address, include_dashboard=False if address == "local" else None, log_to_driver=False,
                    configure_logging=True, logging_level="ERROR")


def _quiet_ray_data_console() -> None:
    """Ray Data's console lines would break our progress bar, and on a failure it prints the whole stack trace
    that the driver then sums up in one line; everything still goes to its ray-data.log file."""
    import logging

    for h in logging.getLogger("ray.data").handlers:
        if "File" not in type(h).__name__:
            h.setLevel(logging.CRITICAL)


def _resources(cfg: ExtractConfig) -> tuple[int, dict]:
    """(number of detector actors, Ray resources per actor): one actor per GPU with cuda; on CPU the cluster's
    CPUs are shared out so the actors use every core without oversubscribing."""
    import ray

    total = ray.cluster_resources()
    if cfg.detector.device.startswith("cuda"):
        n = cfg.num_workers or max(1, int(total.get("GPU", 0)))
        if total.get("GPU", 0) < 1:
            raise RuntimeError("--device cuda but the Ray cluster has no GPU")
        return n, {"num_gpus": 1, "num_cpus": cfg.cpus_per_worker or 1}
    n = cfg.num_workers or 1
    node_cpus = [nd["Resources"].get("CPU", 0) for nd in ray.nodes() if nd.get("Alive")]
    per = cfg.cpus_per_worker or max(1, min(max(node_cpus, default=1), int(total.get("CPU", 1) // n)))
    return n, {"num_cpus": per}


def build_metadata(cfg: ExtractConfig) -> dict:
    d = cfg.detector
    return make_metadata(d.name, cfg.images, cfg.id_scheme, detector=d.name,
                         weights=None if not d.weights else str(Path(d.weights).resolve()),
                         weights_sha256=None if not d.weights else sha256_of(d.weights),
                         conf=d.conf, iou=d.iou, max_boxes=d.max_boxes, min_area=d.min_area, imgsz=d.imgsz,
                         device=d.device)


def resolve_detector(name: str, **options) -> DetectorConfig:
    """A DetectorConfig with the detector's defaults for every option left as None."""
    opts = {k: v for k, v in options.items() if v is not None}
    return DetectorConfig(name=name, **{**DEFAULTS.get(name, {}), **opts})


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


def _job_failed(e: Exception, staging: Path) -> RuntimeError:
    """One line for a failed Ray job: its root cause and whether rerunning can help (a detector that cannot
    load will not load next time either; a lost worker or node, or memory, may be fine next time)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
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
    cause = (raised or lines or [type(e).__name__])[-1]  # the root exception is raised last
    return RuntimeError(f"the Ray job failed: {cause} ({kept}; if the cause was transient, e.g. a lost worker or "
                        "node or out of memory, rerun the same command to resume)")


def _promote(staging: Path, out: Path) -> None:
    """Move the complete parts from the staging folder into OUT (each rename is atomic), then drop staging."""
    out.mkdir(parents=True, exist_ok=True)
    for part in manifest_files(staging):
        os.replace(part, out / part.name)
    shutil.rmtree(staging)


def extract_boxes(cfg: ExtractConfig) -> ExtractSummary:
    """Run the job (see the module doc). Uses an already initialised Ray if there is one."""
    import ray

    out, root = Path(cfg.out), Path(cfg.images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a folder")
    check_detector(cfg.detector)
    check_ray_address(cfg.ray_address)  # an unreachable cluster is said before the images are listed
    _check_out_apart(out, root)
    # listed before --overwrite deletes anything: a bad id scheme must not cost the output
    items, not_images, left_out = _list(cfg)
    staging = staging_dir(out)
    for where in (out, staging):
        _check_only_ours(where)
    if cfg.overwrite:
        for where in (out, staging):
            _delete_ours(where)
    meta = build_metadata(cfg)
    _check_resumable(out, staging, meta)
    done, redone = _done((out, staging), {it["image_id"] for it in items})
    todo = [it for it in items if it["image_id"] not in done]
    summary = ExtractSummary(skipped_done=len(items) - len(todo), not_images=not_images, out=str(out), redone=redone,
                             left_out=left_out)
    started = _ray_init(cfg.ray_address)
    t0 = time.perf_counter()
    try:
        if todo:
            try:
                _run(cfg, todo, staging, meta, summary)
            except ray.exceptions.RayError as e:  # e.g. the detector failed to load in its actor
                raise _job_failed(e, staging) from e
        if staging.is_dir():
            _promote(staging, out)
        elif not out.exists():  # nothing to do and nothing yet: an empty but valid manifest
            out.mkdir(parents=True)
            write_manifest(table_from_columns(empty_columns()), out / "part-empty.parquet", meta)
    finally:
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    summary.images_per_s = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
    summary.images = len(image_ids_in(out))
    return summary


def _run(cfg: ExtractConfig, todo: list[dict], staging: Path, meta: dict, summary: ExtractSummary) -> None:
    import ray
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar below counts images
    _quiet_ray_data_console()
    n_actors, resources = _resources(cfg)
    bs = max(1, cfg.batch_size)
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // bs, 10_000)))
    settings = dict(detector=asdict(cfg.detector), images=str(Path(cfg.images).resolve()), max_pixels=cfg.max_pixels)
    ds = ds.map_batches(BoxExtractor, batch_size=bs, batch_format="numpy", fn_constructor_kwargs=settings,
                        compute=_actor_pool(n_actors), **resources)
    # No staging.mkdir here: write_manifest makes it with the first part, so a job that fails before writing
    # anything leaves no empty `.NAME.partial/` behind.
    run_id, seq, pending, pending_n = uuid.uuid4().hex[:8], 0, [], 0
    counts = Counter()

    def flush():
        nonlocal seq, pending, pending_n
        if pending:
            write_manifest(pa.concat_tables(pending), staging / f"part-{run_id}-{seq:05d}.parquet", meta)
            seq, pending, pending_n = seq + 1, [], 0

    bar = tqdm(total=len(todo), unit="img", desc=f"extract-boxes [{cfg.detector.name}]", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
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

