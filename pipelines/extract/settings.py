"""What an extract-boxes run is asked to do (ExtractConfig), what it reports (ExtractSummary), and the provenance
it records in every part, which a resumed run must match."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from odis.imageio import DEFAULT_MAX_PIXELS
from odis.manifest import make_metadata, sha256_of
from odis.pipelines.detectors import DEFAULTS, DetectorConfig

# Metadata that must agree for a resumed run to add rows to an existing manifest.
RESUME_KEYS = ("source", "images_root", "id_scheme", "weights_sha256", "conf", "iou", "max_boxes", "min_area",
               "imgsz")


@dataclass
class ExtractConfig:
    detector: DetectorConfig
    images: str
    out: str
    id_scheme: str = "path"  # odis.manifest.image_id_for scheme; must match the shards the boxes are joined to
    batch_size: int = 16
    num_workers: int | None = None  # None: 1 on CPU, one per GPU with --device cuda
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared out among the workers
    gpus_per_worker: float = 1.0  # cuda: the share of a GPU each detector holds (0.5: two per GPU)
    ray_address: str | None = None
    use_ray: bool = False  # a Ray job even on one machine (implied by ray_address, RAY_ADDRESS, num_workers > 1)
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


def resolve_detector(name: str, **options) -> DetectorConfig:
    """A DetectorConfig with the detector's defaults for every option left as None."""
    opts = {k: v for k, v in options.items() if v is not None}
    return DetectorConfig(name=name, **{**DEFAULTS.get(name, {}), **opts})


def build_metadata(cfg: ExtractConfig) -> dict:
    """The `odis.*` provenance of the manifest: the detector, its weights' hash and options, the id scheme."""
    d = cfg.detector
    return make_metadata(d.name, cfg.images, cfg.id_scheme, detector=d.name,
                         weights=None if not d.weights else str(Path(d.weights).resolve()),
                         weights_sha256=None if not d.weights else sha256_of(d.weights),
                         conf=d.conf, iou=d.iou, max_boxes=d.max_boxes, min_area=d.min_area, imgsz=d.imgsz,
                         device=d.device)
