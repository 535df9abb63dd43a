"""The Ray side of extract-boxes: the detector actor (`BoxExtractor`, one result row per image), the actor pool
and the resources each actor holds, and the Ray Data map that runs it over the listed images."""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
from PIL import Image

from odis.imageio import ImageDecodeError, decode_rgb
from odis.pipelines.detectors import DetectorConfig, blank_image, build_detector
from odis.pipelines.extract.settings import ExtractConfig

RESULT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.float32())), ("scores", pa.list_(pa.float32())), ("error", pa.string()),
])

BATCHES_IN_FLIGHT = 2  # per detector: one decoding while the other holds the detector (BoxExtractor's lock)
DETECTOR_FAILED = "detector failed"  # the reason of an error row from the detector, not from the image


class DetectorLoadError(RuntimeError):
    """The detector could not be built in a Ray actor: rerunning will not help (the driver looks for this name
    in Ray's error to say so)."""


class DetectorBatchError(RuntimeError):
    """The detector loaded but failed on every image of a batch, one by one too, and on a blank image: a broken
    detector or device, not the images, so the job stops (finished parts kept) instead of writing an error row for
    every image."""


class BoxExtractor:
    """The batch function: decode each path (errors captured per row), detect, one result row per image."""

    def __init__(self, detector: dict, images: str, max_pixels: int, decode_threads: int | None = None):
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
        # Decoding runs in threads (PIL releases the GIL), one per CPU this actor holds (or `decode_threads`), so
        # that the cores the detector uses are not left idle while a batch decodes.
        self.prepare = getattr(self.detector, "prepare", None)
        self.readers = ThreadPoolExecutor(max_workers=decode_threads or _actor_cpus(),
                                          thread_name_prefix="odis-decode")
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
            self._fill(rows, where, decoded, self._detect(decoded))
        return pa.table(rows, schema=RESULT_SCHEMA)

    def _fill(self, rows: dict, where: list[int], decoded: list, results: list) -> None:
        """Put each detector result (or failure) into its image's row."""
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


def detection_dataset(cfg: ExtractConfig, todo: list[dict]):
    """The Ray Data dataset of result rows (RESULT_SCHEMA) for `todo` ({image_id, path} each), not yet run."""
    import ray

    n_actors, resources = _resources(cfg)
    bs = max(1, cfg.batch_size)
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // bs, 10_000)))
    return ds.map_batches(BoxExtractor, batch_size=bs, batch_format="numpy",
                          fn_constructor_kwargs=extractor_settings(cfg), compute=_actor_pool(n_actors), **resources)


def extractor_settings(cfg: ExtractConfig) -> dict:
    """BoxExtractor's constructor arguments (plain values: they travel to Ray actors)."""
    return dict(detector=asdict(cfg.detector), images=str(Path(cfg.images).resolve()), max_pixels=cfg.max_pixels)


def _actor_pool(n: int):
    """n detector actors, each running two batches at a time in two threads (BoxExtractor: one decodes while the
    other holds the detector). Ray Data runs a class's calls one at a time unless told they may overlap."""
    import inspect

    import ray

    if "enable_true_multi_threading" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
        return ray.data.ActorPoolStrategy(size=n, max_concurrent_calls_per_actor=BATCHES_IN_FLIGHT,
                                          enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(size=n)  # an older Ray: decode and detect take turns


def _actor_cpus() -> int:
    """The CPUs Ray gave this actor (its decode threads), else the CPUs this process may run on."""
    ray = sys.modules.get("ray")  # never imported for this: the one-machine path runs without Ray
    try:
        n = ray.get_runtime_context().get_assigned_resources().get("CPU", 0) if ray and ray.is_initialized() else 0
    except Exception:  # noqa: BLE001 - an older Ray without the call
        n = 0
    return max(1, int(n)) if n else len(os.sched_getaffinity(0))


def _resources(cfg: ExtractConfig) -> tuple[int, dict]:
    """(number of detector actors, Ray resources per actor). cuda: `gpus_per_worker` of a GPU each (a fraction
    puts several detectors on one GPU), by default as many as the cluster's GPUs hold; CPU: one actor unless told.
    An actor's CPUs (its decode threads) default to its share of a node's: the image decoding a GPU detector
    needs must not wait on one core."""
    import ray

    total = ray.cluster_resources()
    nodes = [nd["Resources"] for nd in ray.nodes() if nd.get("Alive")]
    if cfg.detector.device.startswith("cuda"):
        if total.get("GPU", 0) <= 0:
            raise RuntimeError("--device cuda but the Ray cluster has no GPU")
        per_gpu = cfg.gpus_per_worker
        n = cfg.num_workers or max(1, int(total["GPU"] / per_gpu + 1e-9))
        gpu_nodes = [nd for nd in nodes if nd.get("GPU", 0) > 0]
        share = min(nd.get("CPU", 1) * per_gpu / nd["GPU"] for nd in gpu_nodes)  # the CPUs beside its GPU share
        return n, {"num_gpus": per_gpu, "num_cpus": cfg.cpus_per_worker or max(1, int(share))}
    n = cfg.num_workers or 1
    node_cpus = [nd.get("CPU", 0) for nd in nodes]
    per = cfg.cpus_per_worker or max(1, min(max(node_cpus, default=1), int(total.get("CPU", 1) // n)))
    return n, {"num_cpus": per}
