"""An experiment's data: synthetic scenes sharded once (`odis synth` -> import-boxes -> shard), and each run's box
source as a manifest: the ground truth, a detector's boxes of the train scenes (`data.extract`: the real
`odis extract-boxes`, keyed like the shards), or one of the two controls odis makes from the ground truth.

- `jitter:S`: each GT box moved by up to S of its width/height and scaled by a factor in [1 - S, 1 + S] per side
  (a weak detector's boxes);
- `random`: one box per image, anywhere, with sides of 25-60% of the image's (does the box's content matter?).
Both are drawn once per experiment (seed 0): every seed of a run sees the same boxes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from odis.pipelines.experiment.spec import Spec


def prepare_data(spec: Spec, out: Path, echo=print) -> dict:
    """{"train", "val": shard sets, "boxes": {name: manifest}}. Synthetic scenes, and the box sources made from
    them, are made once, then reused; here, before runs start in parallel."""
    if "synth" not in spec.data:
        return {"train": spec.data["train"], "val": spec.data["val"], "boxes": dict(spec.data.get("boxes", {})),
                "sets": _eval_sets(spec, out, echo)}
    root = out / "data"
    paths = {"train": root / "shards" / "train", "val": root / "shards" / "val",
             "boxes": {"gt": made_manifest("gt", out)}, "extract": dict(spec.data.get("extract", {}))}
    _synth_once(spec.data["synth"], root, echo, "synth scenes")
    paths["sets"] = _eval_sets(spec, out, echo)
    for source in dict.fromkeys(r.boxes for r in spec.runs if r.method == "odis"):
        box_manifest(source, paths, out, echo)
    return paths


def val_manifest(out: Path) -> Path | None:
    """The GT boxes of the synthetic val scenes (None for an experiment on given shards)."""
    path = Path(out) / "data" / "manifests" / "val-gt.parquet"
    return path if path.is_file() else None


def _eval_sets(spec: Spec, out: Path, echo) -> dict:
    """name -> {"train", "val", "modes"}: the given shard sets, or scenes made once under OUT/data/sets/NAME."""
    sets = {}
    for name, s in spec.eval_sets.items():
        modes = list(s.get("modes", spec.modes))
        if "synth" not in s:
            sets[name] = {"train": s["train"], "val": s["val"], "modes": modes}
            continue
        where = out / "data" / "sets" / name
        sets[name] = {"train": where / "shards" / "train", "val": where / "shards" / "val", "modes": modes}
        _synth_once(s["synth"], where, echo, f"eval set {name}")
    return sets


def _synth_once(s: dict, root: Path, echo, what: str) -> None:
    """Scenes, manifests and shards under `root`, unless an earlier run made them (the val index is last)."""
    if not (root / "shards" / "val" / "index.json").is_file():
        echo(f"[experiment] data: {what} -> {root}")
        _synth(s, root)


def _synth(s: dict, root: Path) -> None:
    from odis.importers import import_coco
    from odis.manifest import write_manifest
    from odis.pipelines.shard import ShardSettings, run_shard
    from odis.synth import SynthConfig
    from odis.synth_dataset import write_dataset

    rng = lambda text, cast: tuple(cast(v) for v in str(text).split("-"))  # noqa: E731  "2-3" -> (2, 3)
    cfg = SynthConfig(size=int(s.get("size", 64)), objects=rng(s.get("objects", "2-3"), int),
                      scale=rng(s.get("scale", "0.25-0.35"), float), max_iou=float(s.get("max_iou", 0.2)),
                      clutter=float(s.get("clutter", 0.3)), distractors=str(s.get("distractors", "other")),
                      palette=str(s.get("palette", "gray")), seed=int(s.get("seed", 0)),
                      backgrounds=s.get("backgrounds"))
    write_dataset(root / "scenes", cfg, int(s["train"]), int(s["val"]), fmt="jpg", overwrite=True, progress=False)
    for split in ("train", "val"):
        res = import_coco(root / "scenes" / split, root / "scenes" / "annotations" / f"instances_{split}.json")
        m = write_manifest(res.table, root / "manifests" / f"{split}-gt.parquet", res.metadata)
        run_shard(ShardSettings(images=str(root / "scenes" / split), out=str(root / "shards" / split),
                                labels="folder", manifest=str(m)), overwrite=True, num_workers=1)


def box_manifest(source: str, paths: dict, out: Path, echo=print) -> str | None:
    """The manifest a run trains with (None: no boxes, the shards' own json)."""
    if source == "none":
        return None
    if source in paths["boxes"]:
        return str(paths["boxes"][source])
    if source in paths.get("extract", {}):
        return str(_extracted_manifest(source, paths["extract"][source], out, echo))
    gt = paths["boxes"].get("gt")
    if gt is None:
        raise ValueError(f"boxes {source!r} are made from the ground truth: give data.boxes.gt")
    target = made_manifest(source, out)
    if not target.exists():
        _control_manifest(source, Path(gt), target)
    return str(target)


def made_manifest(source: str, out: Path) -> Path:
    """Where an experiment keeps the train manifest it made for a box source (a detector's, jitter, random)."""
    return Path(out) / "data" / "manifests" / f"train-{source.replace(':', '-')}.parquet"


def _extracted_manifest(name: str, opts: dict, out: Path, echo) -> Path:
    """`odis extract-boxes` with the spec's options over the train scenes, once (a killed extraction resumes: it
    is renamed to its place when every image has its rows)."""
    from odis.manifest import manifest_metadata
    from odis.pipelines.detectors import default_yolo_weights
    from odis.pipelines.extract import ExtractConfig, extract_boxes, resolve_detector

    target = made_manifest(name, out)
    if target.exists():
        return target
    opts = dict(opts)
    if opts["detector"] == "yolo" and not opts.get("weights"):
        opts["weights"] = default_yolo_weights()  # the offline default of `odis extract-boxes`
    det = resolve_detector(opts.pop("detector"), **opts)
    scheme = manifest_metadata(made_manifest("gt", out))["id_scheme"]
    partial = target.with_name(target.name + ".partial")
    echo(f"[experiment] data: boxes {name} by {det.name} -> {target}")
    extract_boxes(ExtractConfig(detector=det, images=str(out / "data" / "scenes" / "train"), out=str(partial),
                                id_scheme=scheme, progress=False))
    partial.rename(target)
    return target


def _control_manifest(source: str, gt: Path, target: Path) -> None:
    from odis.manifest import add_row, empty_columns, make_metadata, manifest_metadata, read_manifest
    from odis.manifest import table_from_columns, write_manifest

    rows = read_manifest(gt).to_pylist()
    rng = np.random.default_rng(0)
    cols, seen = empty_columns(), set()
    for r in rows:
        w, h = r["width"], r["height"]
        if source == "random":
            if r["image_id"] in seen:
                continue
            seen.add(r["image_id"])
            bw, bh = rng.uniform(0.25, 0.6) * w, rng.uniform(0.25, 0.6) * h
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            add_row(cols, r["image_id"], r["path"], w, h, "random", box=(x0, y0, x0 + bw, y0 + bh))
            continue
        if r["x0"] is None:
            add_row(cols, r["image_id"], r["path"], w, h, "jitter", error=r["error"])
            continue
        add_row(cols, r["image_id"], r["path"], w, h, "jitter", box=_jitter(r, float(source[7:]), w, h, rng))
    meta = manifest_metadata(gt)
    write_manifest(table_from_columns(cols), target,
                   make_metadata(source.split(":")[0], meta.get("images_root"), meta.get("id_scheme", "path"),
                                 made_from=str(gt)))


def _jitter(r: dict, s: float, w: float, h: float, rng: np.random.Generator) -> tuple[float, ...]:
    bw, bh = r["x1"] - r["x0"], r["y1"] - r["y0"]
    cx = (r["x0"] + r["x1"]) / 2 + rng.uniform(-s, s) * bw
    cy = (r["y0"] + r["y1"]) / 2 + rng.uniform(-s, s) * bh
    bw, bh = bw * rng.uniform(1 - s, 1 + s), bh * rng.uniform(1 - s, 1 + s)
    x0, y0 = np.clip([cx - bw / 2, cy - bh / 2], 0, [w, h])
    x1, y1 = np.clip([cx + bw / 2, cy + bh / 2], 0, [w, h])
    if x1 - x0 < 1 or y1 - y0 < 1:  # moved off the image: keep the GT box
        return r["x0"], r["y0"], r["x1"], r["y1"]
    return float(x0), float(y0), float(x1), float(y1)
