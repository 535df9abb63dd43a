"""The `odis` command line: parse, call the library or a pipeline, print. No logic lives here.

Each stage of the flow has its section below (boxes, shards, training, evaluation, pictures, demo).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Optional

# Offline and quiet by default, before any of these libraries is imported by a command.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import typer

app = typer.Typer(
    name="odis",
    help="ODIS: object-level self-distillation for ViT pretraining with bounding boxes.\n\n"
    "Flow: import-boxes / extract-boxes -> shard -> train -> eval / show.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Evaluate frozen features: k-NN, linear probe, dense nearest-neighbour retrieval.",
                       no_args_is_help=True)
show_app = typer.Typer(help="Pictures: boxes on images, OBJ attention maps, the ODIS views of a sample.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(show_app, name="show")


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ---- checks shared by the commands: option ranges typer's min=/max= cannot say, output paths ------------------

def _positive(value):
    """Option callback: a number that must be > 0 (typer's min= includes the bound; NaN is refused too)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


def _number_list(cast, ok, expected: str, required: bool = True):
    """Option callback: comma-separated numbers, each `ok`, as a tuple (at least one when `required`)."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated {'integers' if cast is int else 'numbers'}, "
                                     f"got {text!r}") from None
        if required and not values:
            raise typer.BadParameter(f"expected at least one value, got {text!r}")
        bad = [v for v in values if not ok(v)]
        if bad:
            raise typer.BadParameter(f"each value must be {expected}, got {bad[0]}")
        return values
    return parse


def _out_path(path: Optional[Path], option: str, folder: bool = False, suffixes: tuple = ()) -> None:
    """An output that cannot be written is a one-line error naming it, before any work: a folder given for a file
    or the reverse, a parent that is a file, a place where nothing can be created (read-only, /proc, /sys), a
    file name whose suffix names no format that can be written."""
    if path is None:
        return
    if suffixes and path.suffix.lower() not in suffixes:
        first = (".png", ".jpg", ".webp", ".pdf", ".svg")
        common = sorted(suffixes, key=lambda e: (first.index(e) if e in first else len(first), e))
        fail(f"{option} {path}: expected a file name ending in {', '.join(common[:5])}"
             + (f" (or {len(common) - 5} other formats)" if len(common) > 5 else ""))
    if path.is_dir() and not folder:
        fail(f"{option} {path}: is a folder, not a file")
    if folder and os.path.lexists(path) and not path.is_dir():
        fail(f"{option} {path}: is a file, not a folder")
    where = path if path.is_dir() else path.parent  # the nearest existing folder: what is missing gets created
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    if not where.is_dir():
        fail(f"{option} {path}: {where} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        fail(f"{option} {path}: cannot write in {where} ({e.strerror or e})")


@contextlib.contextmanager
def _writing(path: Path, option: str):
    """An OSError while writing `path` (disk full, a folder gone since the check) is a one-line error naming it."""
    try:
        yield
    except OSError as e:
        fail(f"{option} {path}: cannot write it ({e.strerror or e})")


def _picture_suffixes() -> tuple:
    """File suffixes Pillow can write (`odis show --out`)."""
    from PIL import Image

    Image.init()
    return tuple(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


def _save_picture(pic, out: Path) -> None:
    with _writing(out, "--out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        pic.save(out)


# ---- boxes: import-boxes, extract-boxes, stats -------------------------------------------------------------

def _print_stats(s: dict) -> None:
    def q(d: dict, fmt: str) -> str:
        return "  ".join(f"{k} {format(v, fmt)}" for k, v in d.items()) if d else "-"

    typer.echo(f"images {s['images']}  boxes {s['boxes']}  no-box images {s['no_box_images']}  "
               f"error images {s['error_images']}")
    typer.echo(f"boxes/image        {q(s['boxes_per_image'], '.3g')}")
    typer.echo(f"box area / image   {q(s['box_area_fraction'], '.3g')}")
    typer.echo(f"score              {q(s['score'], '.3g')}")
    typer.echo(f"rows by source     {s['sources']}")
    if s["errors_by_reason"]:
        typer.echo(f"errors by reason   {s['errors_by_reason']}")


@app.command("import-boxes")
def import_boxes_cmd(
    fmt: str = typer.Option(..., "--format", help="coco | imagenet | yolo | tiny-imagenet"),
    images: Path = typer.Option(..., "--images", help="Images root; manifest paths are relative to it. "
                                "tiny-imagenet: the tiny-imagenet-200 folder (annotations are inside)."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="coco: instances_*.json; imagenet: "
                                               "folder of ILSVRC XML files (any layout, matched by file stem); "
                                               "yolo: labels folder (default: images/ -> labels/ rule)."),
    out: Path = typer.Option(..., "--out", help="Output manifest, e.g. manifests/coco-train-gt.parquet."),
    from_segmentation: bool = typer.Option(False, "--from-segmentation", help="coco: boxes from the "
                                           "segmentation masks (as the paper does) instead of `bbox`."),
    keep_crowd: bool = typer.Option(False, "--keep-crowd/--drop-crowd", help="coco: keep iscrowd annotations."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Turn ground-truth annotations into a box manifest (one row per box; no-box and error rows kept).

    \b
    odis import-boxes --format coco --images coco/val2017 --annotations coco/annotations/instances_val2017.json \\
        --out manifests/coco-val-gt.parquet --from-segmentation
    odis import-boxes --format imagenet --images ILSVRC/Data/CLS-LOC --annotations ILSVRC/Annotations/CLS-LOC \\
        --out manifests/in1k-gt.parquet
    """
    from odis.importers import AnnotationError, import_boxes
    from odis.manifest import summary_stats, write_manifest

    _out_path(out, "--out")
    if out.exists() and not overwrite:
        fail(f"{out} exists (use --overwrite to replace it)")
    if not images.is_dir():
        fail(f"--images {images}: not a folder")
    try:
        res = import_boxes(fmt, images, annotations, from_segmentation=from_segmentation, keep_crowd=keep_crowd)
    except AnnotationError as e:
        fail(str(e))
    with _writing(out, "--out"):
        write_manifest(res.table, out, res.metadata)
    typer.echo(f"{out}: {res.table.num_rows} rows")
    _print_stats(summary_stats(res.table))
    dropped = {k: v for k, v in res.counts.items() if k.startswith(("dropped", "missing", "unused"))}
    if dropped:
        typer.echo(f"not turned into boxes: {dropped}")
    if res.counts.get("clipped"):
        typer.echo(f"clipped to the image: {res.counts['clipped']} box(es) reaching outside it")


@app.command("extract-boxes")
def extract_boxes_cmd(
    detector: str = typer.Option(..., "--detector", help="yolo | mavl | selective-search"),
    images: Path = typer.Option(..., "--images", help="Images root, searched recursively (jpg, png, webp, bmp, "
                                "tif, gif). On a cluster it must be at the same path on every node."),
    out: Path = typer.Option(..., "--out", help="Output manifest folder of parquet parts, e.g. "
                             "manifests/coco-yolo.parquet. Rerunning resumes."),
    id_scheme: str = typer.Option("path", "--id-scheme", help="Image id rule: path | stem | coco. Use the scheme "
                                  "of the shards the boxes will be joined to (COCO shards: coco)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="yolo: .pt file or exported model folder "
                                          "(default ../shared/weights/yolo11n_int8_openvino_model); mavl: a local "
                                          "OWL-ViT/OWLv2 folder (save_pretrained); selective-search: none."),
    conf: Optional[float] = typer.Option(None, "--conf", help="Score threshold (yolo 0.25, mavl 0.1)."),
    iou: Optional[float] = typer.Option(None, "--iou", help="Class-agnostic NMS IoU (yolo 0.7, mavl 0.5)."),
    max_boxes: int = typer.Option(100, "--max-boxes", help="Keep at most N boxes per image (best first)."),
    min_area: float = typer.Option(0.0, "--min-area", help="Drop boxes smaller than this fraction of the image."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="yolo: inference size (640); mavl: model input "
                                        "(default: the processor's); selective-search: longest side (500)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per detector call."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=1, help="Detector actors (default 1 on "
                                              "CPU, one per GPU with --device cuda)."),
    cpus_per_worker: Optional[float] = typer.Option(None, "--cpus-per-worker", callback=_positive, help="Ray CPUs "
                                                    "per actor (default: the cluster's CPUs shared out)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster (host:port or ray://...); "
                                              "default RAY_ADDRESS, else a private local Ray."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images (sorted by path)."),
    part_size: int = typer.Option(1000, "--part-size", min=1, help="Images per parquet part (what a kill can "
                                  "lose)."),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", min=1, help="Refuse larger images (decompression "
                                   "bombs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: delete the parts of an earlier run in --out (and its staged parts) first; nothing else."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run a class-agnostic detector over a folder as a Ray Data job and write a box manifest.

    Unreadable images get an `error` row (a rerun redoes those the system could not read and those the detector
    failed on); images with no box get a no-box row. A killed run resumes from its finished parts: rerun the same
    command.

    \b
    odis extract-boxes --detector yolo --images coco/train2017 --id-scheme coco --out manifests/coco-yolo.parquet
    odis extract-boxes --detector mavl --weights models/owlv2-base --images in1k/train --out manifests/in1k-mavl.parquet \\
        --device cuda --ray-address 10.0.0.1:6379
    """
    from odis.manifest import ManifestError
    from pipelines.detectors import DETECTORS, default_yolo_weights
    from pipelines.extract_boxes import ExtractConfig, extract_boxes, resolve_detector

    _out_path(out, "--out", folder=True)
    if detector not in DETECTORS:
        fail(f"--detector {detector!r}: expected one of {', '.join(DETECTORS)}")
    if detector == "yolo" and weights is None:
        weights = default_yolo_weights()
        if weights is None:
            fail("--detector yolo: no --weights given and ../shared/weights/yolo11n_int8_openvino_model not found")
    # --weights and the other options are checked by extract_boxes before Ray starts (one-line errors below).
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "odis" / "ultralytics"))
    det = resolve_detector(detector, weights=weights if detector != "selective-search" else None, conf=conf,
                           iou=iou, max_boxes=max_boxes, min_area=min_area, imgsz=imgsz, device=device)
    cfg = ExtractConfig(detector=det, images=str(images), out=str(out), id_scheme=id_scheme, batch_size=batch_size,
                        num_workers=num_workers, cpus_per_worker=cpus_per_worker, ray_address=ray_address,
                        overwrite=overwrite, limit=limit, part_size=part_size, max_pixels=max_pixels,
                        progress=not quiet)
    try:
        s = extract_boxes(cfg)
    except (ManifestError, FileNotFoundError, ValueError, RuntimeError) as e:
        fail(str(e))
    typer.echo(f"{out}: {s.images} images in the manifest; this run: {s.processed} processed "
               f"({s.skipped_done} already done), {s.boxes} boxes, {s.no_box_images} no-box images, "
               f"{s.error_images} errors, {s.processed / max(s.seconds, 1e-9):.2f} img/s over {s.seconds:.1f} s")
    if s.redone:
        typer.echo(f"{s.redone} image(s) an earlier run could not read or its detector failed on were processed again")
    if s.not_images:
        typer.echo(f"{s.not_images} file(s) without an image extension were not processed")
    if s.left_out:
        typer.secho(f"{len(s.left_out)} entr(ies) of the folder left out by the listing:", fg=typer.colors.YELLOW)
        for w in s.left_out:
            typer.echo(f"  {w['path']}: {w['reason']}")
    for reason, n in s.errors.most_common(10):
        typer.secho(f"  error x{n}: {reason}", fg=typer.colors.YELLOW)


@app.command("stats")
def stats_cmd(
    manifest: Path = typer.Argument(..., help="A manifest: .parquet file or folder of parts."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the distributions into this PNG."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check the schema rules too."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Images, boxes, boxes per image, box-area and score distributions, no-box and error counts.
    Exit code 1 if the manifest breaks a schema rule (each violation names file, row and column)."""
    import json as _json

    from odis.manifest import (ManifestError, manifest_files, manifest_metadata, plot_stats, read_manifest,
                               summary_stats, validate_manifest)

    if manifest.is_dir() and not manifest_files(manifest):
        fail(f"{manifest}: no parquet parts in this folder")
    if plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        _out_path(plot, "--plot", suffixes=tuple(f".{e}" for e in FigureCanvasBase.get_supported_filetypes()))
    try:
        table = read_manifest(manifest)
        meta = manifest_metadata(manifest)
    except ManifestError as e:
        fail(str(e))
    s = summary_stats(table)
    if as_json:
        typer.echo(_json.dumps({"metadata": meta, **s}, indent=1))
    else:
        typer.echo(f"{manifest}: source {meta.get('source')}, created {meta.get('created_at')}, "
                   f"images root {meta.get('images_root')}" if meta else
                   f"{manifest}: no odis metadata (written by another tool, or by pandas, which drops it): source, "
                   "images root and id scheme unknown")
        _print_stats(s)
    if plot is not None:
        with _writing(plot, "--plot"):
            typer.echo(f"plot: {plot_stats(table, plot, title=str(manifest.name))}")
    problems = validate_manifest(manifest) if validate else []
    for p in problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(1)


# ---- shards: shard, verify ---------------------------------------------------------------------------------

@app.command("shard")
def shard_cmd(
    images: Path = typer.Option(..., "--images", help="Images root (ImageNet: train/ with one folder per class; "
                                "COCO: train2017/). Searched recursively, symlinked folders followed (once "
                                "each); hidden files are ignored."),
    out: Path = typer.Option(..., "--out", help="Output folder shards/NAME: NAME-000000.tar ... + index.json."),
    prefix: str = typer.Option("", "--prefix", help="Shard name prefix (default: the --out folder's name)."),
    labels: str = typer.Option("none", "--labels", help="folder: the first folder under --images is the class "
                               "(ImageNet, Tiny-ImageNet); coco: category of the image's largest box in the COCO "
                               "JSON; none: label null."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Box manifest (.parquet or part folder) whose "
                                            "boxes go into each sample's json, scaled to the stored image."),
    coco_json: Optional[Path] = typer.Option(None, "--coco-json", help="COCO instances JSON for --labels coco "
                                             "(default: ROOT/../annotations/instances_<ROOT name>.json)."),
    id_scheme: Optional[str] = typer.Option(None, "--id-scheme", help="Key rule: path | stem | coco (default: the "
                                            "manifest's, coco with --labels coco, else path)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="At most N samples per shard."),
    max_size: str = typer.Option("1GB", "--max-size", help="Target shard size (1GB, 500MB, 2GiB; 0 = no limit), "
                                 "planned from source file sizes so that reruns are deterministic."),
    resize_short: Optional[int] = typer.Option(None, "--resize-short", help="Re-encode images whose short side "
                                               "exceeds N to short side N (boxes scaled). Default: bytes copied."),
    quality: int = typer.Option(90, "--quality", min=1, max=100, help="JPEG/WebP quality when an image is "
                                "re-encoded."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled sample order (and of the shard plan)."),
    num_workers: int = typer.Option(os.cpu_count() or 1, "--num-workers", min=1, help="Local processes (one shard "
                                    "each)."),
    use_ray: bool = typer.Option(False, "--use-ray", help="Run as a Ray job, one task per shard (local Ray "
                                 "unless --ray-address / RAY_ADDRESS)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (implies "
                                              "--use-ray). Images and --out must be on a filesystem all nodes see."),
    check: str = typer.Option("header", "--check", help="header: read each image's header and end marker "
                              "(catches truncation, fast); decode: decode every image too."),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", min=1, help="Refuse larger images (decompression "
                                   "bombs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete this shard set in --out and start over."),
) -> None:
    """Write webdataset shards (+ index.json, written last) from an image folder.

    A killed run resumes: rerun the same command and only the missing shards are written.

    \b
    odis shard --images data/imagenet/train --out shards/in1k --labels folder --max-size 1GB
    odis shard --images coco/train2017 --out shards/coco --labels coco --manifest manifests/coco-gt.parquet
    """
    import time as _time

    from tqdm import tqdm

    from odis.manifest import ManifestError
    from pipelines.ray_connect import RayAddressError
    from pipelines.shard import ShardError, ShardSettings, parse_size, run_shard

    _out_path(out, "--out", folder=True)
    bar = None
    t0 = [0.0, 0]

    def on_plan(plan, n_todo):
        nonlocal bar
        typer.echo(f"{len(plan.shards)} shard(s) planned, {sum(map(len, plan.shards))} images; "
                   f"{n_todo} images to write")
        bar = tqdm(total=n_todo, unit="img", dynamic_ncols=True, smoothing=0.1)
        t0[0] = _time.perf_counter()

    def progress(n, nbytes):
        t0[1] += nbytes
        bar.set_postfix_str(f"{t0[1] / 1e6 / max(_time.perf_counter() - t0[0], 1e-9):.1f} MB/s", refresh=False)
        bar.update(n)

    try:
        settings = ShardSettings(
            images=str(images), out=str(out), prefix=prefix, labels=labels, manifest=str(manifest) if manifest else None,
            coco_json=str(coco_json) if coco_json else None, id_scheme=id_scheme, max_samples=max_samples,
            max_size=parse_size(max_size), resize_short=resize_short, quality=quality, seed=seed, check=check,
            max_pixels=max_pixels)
        index = run_shard(settings, overwrite=overwrite, num_workers=num_workers, use_ray=use_ray,
                          ray_address=ray_address, progress=progress, on_plan=on_plan)
    except (ShardError, ManifestError, RayAddressError) as e:
        fail(str(e))
    except OSError as e:  # disk full, permissions, a vanished mount: say so, the run resumes after a fix
        fail(f"writing shards to {out}: {e}; rerun the same command to resume")
    finally:
        if bar is not None:
            bar.close()
    secs = index["last_run"]["seconds"]
    typer.echo(f"{out}: {index['num_shards']} shard(s), {index['num_samples']} samples, "
               f"{sum(s['bytes'] for s in index['shards']) / 1e6:.1f} MB; wrote {index['last_run']['shards_written']}"
               f" shard(s) in {secs:.1f} s")
    if index.get("boxes"):
        typer.echo("manifest rows: " + ", ".join(f"{k} {v}" for k, v in index["boxes"].items()))
    for key, what in (("skipped", "left out (unreadable)"), ("warnings", "warning(s)")):
        rows = index[key]
        if rows:
            typer.secho(f"{len(rows)} {what}, listed in {out / 'index.json'}:", fg=typer.colors.YELLOW)
            for r in rows[:10]:
                typer.echo(f"  {r['path']}: {r['reason']}")
            if len(rows) > 10:
                typer.echo(f"  ... and {len(rows) - 10} more")


@app.command("verify")
def verify_cmd(
    shards: Path = typer.Argument(..., help="A shard folder (with index.json) or its index.json."),
    decode: bool = typer.Option(False, "--decode", help="Also decode every image and check its size."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prove a shard set is whole: every indexed shard exists with its sha256 and sample count, no key repeats,
    every json parses and its boxes lie inside the image. Exit code 1 when anything is wrong."""
    import json as _json

    from tqdm import tqdm

    from odis.shards import read_index, verify_shards

    try:
        n = len(read_index(shards)["shards"])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    with tqdm(total=n, unit="shard", dynamic_ncols=True, disable=as_json) as bar:
        report = verify_shards(shards, decode=decode, progress=lambda count, nbytes: bar.update(1))
    typer.echo(_json.dumps(report.to_dict(), indent=1) if as_json else report.summary())
    if not report.ok:
        raise typer.Exit(1)


# ---- training: train ---------------------------------------------------------------------------------------


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    shards: str = typer.Option(None, help="Training shards: a folder with index.json, an index.json, a brace "
                               "pattern (shards/in1k-{000000..000127}.tar) or URLs (s3/gs/http via pipe:)."),
    boxes: str = typer.Option(None, help="Box manifest (parquet) joined by image_id; else the shards' own boxes; "
                              "else the whole image."),
    config: str = typer.Option(None, "--config", "-c", help="YAML recipe from configs/ (or your own). Without "
                               "it: the defaults of trainer/config.py (ODIS, ViT-S/16 at 224 px, the paper's "
                               "recipe; on a small CPU machine start from configs/tiny_cpu.yaml)."),
    method: str = typer.Option(None, help="odis | ibot | dino (overrides the recipe; default odis)."),
    out: str = typer.Option(None, help="Run folder (default: the recipe's `out`)."),
    resume: str = typer.Option(None, help="'auto' (continue from OUT/checkpoint.pt if present) or a checkpoint. "
                               "It must have been trained with the same recipe (a changed setting is refused)."),
    overwrite: bool = typer.Option(False, help="Start over in an --out that already holds a run (removes its "
                                   "checkpoint, export, metrics, config, tb/ and plots/; nothing else)."),
    max_steps: int = typer.Option(None, help="Stop after this many steps (the schedules still span the epochs)."),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N (default auto: the GPU when there is one)."),
    precision: str = typer.Option(None, help="auto | bf16 | fp16 | fp32 (default auto: bf16 on GPUs that have it, "
                                  "else fp16 with loss scaling, as on a V100 or T4; fp32 on CPU)."),
    box_sampling: str = typer.Option(None, help="uniform | area: how one box per image is drawn each step."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Pretrain a ViT with ODIS (or the iBOT / DINO baselines, same code).

    Extra arguments are dotted config overrides, e.g. `optim.epochs=10 data.batch_size=32 model.arch=vit_tiny_patch16_224`.
    Under torchrun (`torchrun --nproc_per_node 8 -m cli train ...`) each process trains on its own device and
    only rank 0 writes OUT: config.yaml, checkpoint.pt, backbone.safetensors, metrics.csv, tb/, plots/.
    """
    from trainer.config import load_config
    from trainer.train import train as run_training

    overrides = list(ctx.args)
    for key, value in (("data.shards", shards), ("data.boxes", boxes), ("method", method), ("out", out),
                       ("max_steps", max_steps), ("device", device), ("precision", precision),
                       ("data.box_sampling", box_sampling)):
        if value is not None:
            overrides.append(f"{key}={value}")  # text settings take the text as typed (load_config)
    try:
        cfg = load_config(config, overrides)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if not cfg.data.shards:
        fail("no training data: give --shards (or data.shards in the config)")
    try:
        final = run_training(cfg, resume=resume, progress=not quiet, overwrite=overwrite)
    except (FileNotFoundError, FloatingPointError, ValueError) as e:
        fail(str(e))
    if final:
        typer.echo(f"step {final['step']}: loss {final['loss']:.4f} -> {cfg.out}")


# ---- evaluation: eval knn | linear | dense-nn ----------------------------------------------------------------

def _eval_finish(result: dict, out: Optional[Path], compare: Optional[Path]) -> None:
    """Write the JSON, print the table (side by side with --compare)."""
    from odis.eval.protocols import load_result, table, write_result

    if out is not None:
        with _writing(out, "--out"):
            write_result(result, out)
    try:
        other = load_result(compare) if compare else None
        typer.echo(table(result, other, other_name=compare.name if compare else "other"))
    except ValueError as e:
        fail(str(e))
    for split, c in result.get("counts", {}).items():
        fell = {k: v for k, v in c.items() if v and k != "errors"}
        if fell:
            typer.echo(f"{split}: whole image used for " + ", ".join(f"{v} ({k.replace('_', ' ')})"
                                                                     for k, v in fell.items()))
        if c.get("errors"):
            typer.secho(f"{split}: {c['errors']} unreadable sample(s) left out, first: "
                        f"{result.get('errors', ['?'])[0]}", fg=typer.colors.YELLOW)
    if out is not None:
        typer.echo(f"wrote {out}")


_BACKBONE_HELP = ("An odis run folder (runs/NAME), its backbone.safetensors or checkpoint.pt, or any timm ViT "
                  "checkpoint (.safetensors/.pth/.bin with timm names; then pass --arch).")
_MODE_HELP = ("How the box conditions the feature: none = whole image; mask = OBJ token with attention masked to "
              "the box (as trained); crop = the box cut out and resized to the input; blackout = pixels outside the "
              "box set to black (before normalisation). Images without a box use the whole image (counted).")
_BOXES_HELP = ("Box manifest (.parquet or part folder) to take boxes from, joined by image_id and scaled to the "
               "stored image. Default: the boxes in the shards' json.")


@eval_app.command("knn")
def eval_knn_cmd(
    backbone: Path = typer.Option(..., "--backbone", help=_BACKBONE_HELP),
    train: str = typer.Option(..., "--train", help="Training shards (folder, index.json or brace pattern): the bank."),
    val: str = typer.Option(..., "--val", help="Validation shards: the queries."),
    boxes_mode: str = typer.Option("none", "--boxes-mode", help=_MODE_HELP),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help=_BOXES_HELP),
    box_select: str = typer.Option("largest", "--box-select", help="Which box of several: largest | score | union."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without odis "
                                       "metadata, e.g. vit_small_patch16_224."),
    size: Optional[int] = typer.Option(None, "--size", min=1, help="Input size (CenterCrop), a multiple of the "
                                       "patch size; Resize is size*256/224. Default: the backbone's training size."),
    k: str = typer.Option("10,20,100,200", "--k", callback=_number_list(int, lambda v: v >= 1, ">= 1"),
                          help="Neighbour counts (clamped to the bank size)."),
    temperature: float = typer.Option(0.07, "--temperature", callback=_positive,
                                      help="T in the vote weight exp(cos/T)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0, help="Data-loading processes (at most one per shard)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Folder to keep extracted features in and reuse."),
    out: Optional[Path] = typer.Option(None, "--out", help="Result JSON."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Another result JSON to print side by side."),
) -> None:
    """Weighted k-NN on frozen features, DINO's protocol (teacher, last-block OBJ/CLS after the final norm,
    L2-normalised, Resize 256 / CenterCrop 224, T = 0.07, top-1/top-5).

    \b
    odis eval knn --backbone runs/odis-s16 --train shards/in1k-train --val shards/in1k-val --boxes-mode mask
    odis eval knn --backbone dino_vits16.pth --arch vit_small_patch16_224 --train ... --val ... --out dino.json
    """
    from odis.eval.features import BOX_MODES, BOX_SELECT
    from odis.eval.protocols import run_knn

    _out_path(out, "--out")
    _out_path(cache, "--cache", folder=True)
    if boxes_mode not in BOX_MODES:
        fail(f"--boxes-mode must be one of {', '.join(BOX_MODES)}, got {boxes_mode!r}")
    if box_select not in BOX_SELECT:
        fail(f"--box-select must be one of {', '.join(BOX_SELECT)}, got {box_select!r}")
    try:
        result = run_knn(backbone, train, val, boxes_mode, boxes, box_select, size, k, temperature, arch,
                         batch_size, workers, device, cache)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    _eval_finish(result, out, compare)


@eval_app.command("linear")
def eval_linear_cmd(
    backbone: Path = typer.Option(..., "--backbone", help=_BACKBONE_HELP),
    train: str = typer.Option(..., "--train", help="Training shards."),
    val: str = typer.Option(..., "--val", help="Validation shards."),
    boxes_mode: str = typer.Option("none", "--boxes-mode", help=_MODE_HELP),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help=_BOXES_HELP),
    box_select: str = typer.Option("largest", "--box-select", help="Which box of several: largest | score | union."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without odis metadata."),
    size: Optional[int] = typer.Option(None, "--size", min=1, help="Input size, a multiple of the patch size; "
                                       "default: the backbone's training size."),
    n_last_blocks: int = typer.Option(4, "--n-last-blocks", min=1, help="Concatenate the OBJ/CLS of the last N "
                                      "blocks (4 for ViT-S as in DINO/iBOT)."),
    lrs: str = typer.Option("1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", "--lrs",
                            callback=_number_list(float, lambda v: v > 0, "> 0"),
                            help="Learning-rate sweep (SGD m=0.9, cosine); the best on val is reported, as iBOT does."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Epochs over the cached features."),
    shots: str = typer.Option("", "--shots", callback=_number_list(int, lambda v: v >= 1, ">= 1", required=False),
                              help="Few-shot settings, e.g. 1,2,5 images per class."),
    fraction: str = typer.Option("", "--fraction", callback=_number_list(float, lambda v: 0 < v <= 1, "in (0, 1]",
                                                                           required=False),
                                 help="Class-stratified fractions of the training set, e.g. 0.01."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Few-shot settings are averaged over this many seeds."),
    skip_full: bool = typer.Option(False, "--skip-full", help="Only the few-shot settings."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Feature-extraction batch."),
    workers: int = typer.Option(2, "--workers", min=0),
    device: str = typer.Option("auto", "--device"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Folder to keep extracted features in and reuse."),
    out: Optional[Path] = typer.Option(None, "--out", help="Result JSON."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Another result JSON to print side by side."),
) -> None:
    """Linear probe on frozen features (extracted once, then every lr trains in the same loop).

    \b
    odis eval linear --backbone runs/odis-s16 --train shards/in1k-train --val shards/in1k-val --shots 1,2,5 \\
        --fraction 0.01 --out linear.json
    """
    from odis.eval.features import BOX_MODES
    from odis.eval.protocols import run_linear

    _out_path(out, "--out")
    _out_path(cache, "--cache", folder=True)
    if boxes_mode not in BOX_MODES:
        fail(f"--boxes-mode must be one of {', '.join(BOX_MODES)}, got {boxes_mode!r}")
    try:
        result = run_linear(backbone, train, val, boxes_mode, boxes, box_select, size, n_last_blocks, lrs, epochs,
                            256, shots, fraction, tuple(range(seeds)), not skip_full, arch, batch_size, workers,
                            device, cache)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    _eval_finish(result, out, compare)


@eval_app.command("dense-nn")
def eval_dense_cmd(
    backbone: Path = typer.Option(..., "--backbone", help=_BACKBONE_HELP),
    dataset: str = typer.Option(..., "--dataset", help="coco (masks from instance annotations) | voc | ade20k."),
    root: Path = typer.Option(..., "--root", help="coco: the folder with annotations/ and SPLIT/; voc: VOC2012 "
                              "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/); ade20k: "
                              "ADEChallengeData2016."),
    train_split: str = typer.Option("", "--train-split", help="Memory split (default: train2017 | train | training)."),
    val_split: str = typer.Option("", "--val-split", help="Query split (default: val2017 | val | validation)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without odis metadata."),
    size: int = typer.Option(512, "--size", min=1, help="Images and masks resized to size x size, a multiple of "
                             "the patch size (Hummingbird: 512)."),
    factors: str = typer.Option("1,8,64,128", "--factors", callback=_number_list(int, lambda v: v >= 1, ">= 1"),
                                help="Memory subsampling factors: each image gives 1/f of its patches (rare "
                                "classes first)."),
    k: int = typer.Option(30, "--k", min=1, help="Neighbours per query patch."),
    beta: float = typer.Option(0.02, "--beta", callback=_positive, help="Temperature of the softmax over neighbour "
                               "similarities."),
    max_train: Optional[int] = typer.Option(None, "--max-train", min=1, help="Use the first N memory images."),
    max_val: Optional[int] = typer.Option(None, "--max-val", min=1, help="Use the first N query images."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed", help="Seed of the memory sampling."),
    out: Optional[Path] = typer.Option(None, "--out", help="Result JSON."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Another result JSON to print side by side."),
) -> None:
    """Dense nearest-neighbour retrieval (Hummingbird): patch memory with label histograms, k = 30 neighbours,
    softmax(cos/0.02) label mixing, bilinear upsampling, mIoU, per memory subsampling factor.

    \b
    odis eval dense-nn --backbone runs/odis-s16 --dataset voc --root data/VOCdevkit/VOC2012 --train-split trainaug
    """
    from odis.eval.protocols import run_dense

    _out_path(out, "--out")
    defaults = {"coco": ("train2017", "val2017"), "voc": ("train", "val"), "ade20k": ("training", "validation")}
    if dataset not in defaults:
        fail(f"--dataset must be one of {', '.join(defaults)}, got {dataset!r}")
    try:
        result = run_dense(backbone, dataset, root, train_split or defaults[dataset][0],
                           val_split or defaults[dataset][1], size, factors, k, beta, max_train, max_val, arch,
                           batch_size, device, seed)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    _eval_finish(result, out, compare)


# ---- pictures: show boxes | attention | views ----------------------------------------------------------------

def _show_box(text: Optional[str]):
    if not text:
        return None
    try:
        b = [float(v) for v in text.split(",")]
    except ValueError:
        b = []
    if len(b) != 4 or b[2] <= b[0] or b[3] <= b[1]:
        fail(f"--box must be x0,y0,x1,y1 with x0 < x1 and y0 < y1 (image pixels), got {text!r}")
    return b


def _fit_box(b: Optional[list], width: int, height: int) -> Optional[list]:
    """--box clipped to the image, with a warning when it reaches outside; an error when nothing of it is inside."""
    from odis.boxes import clip_boxes

    if b is None:
        return None
    clipped = clip_boxes(b, width, height).tolist()
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        fail(f"--box {b} lies outside the {width}x{height} image")
    if clipped != b:
        typer.secho(f"warning: --box {b} reaches outside the {width}x{height} image: clipped to {clipped}",
                    fg=typer.colors.YELLOW, err=True)
    return clipped


@show_app.command("boxes")
def show_boxes_cmd(
    manifest: Path = typer.Argument(..., help="Box manifest (.parquet or part folder)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Images root the manifest's paths are relative "
                                          "to (default: the root recorded in the manifest)."),
    out: Path = typer.Option(Path("boxes.png"), "--out", help="PNG to write."),
    n: int = typer.Option(16, "--n", min=1, help="Number of images."),
    cols: int = typer.Option(4, "--cols", min=1, help="Images per row."),
    cell: int = typer.Option(256, "--cell", min=1, help="Cell size in pixels."),
    min_score: float = typer.Option(0.0, "--min-score", help="Hide boxes scoring below this."),
    ids: str = typer.Option("", "--ids", help="Comma-separated image_ids to show (default: the first N)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Draw N random images with this seed."),
) -> None:
    """A grid of images with their boxes and scores.

    \b
    odis show boxes manifests/coco-yolo.parquet --images data/coco/train2017 --out grid.png
    """
    from odis.manifest import ManifestError, manifest_metadata
    from odis.viz import manifest_grid

    _out_path(out, "--out", suffixes=_picture_suffixes())
    try:
        root = images or manifest_metadata(manifest).get("images_root")
        if root is None:
            fail(f"{manifest}: no images root recorded; pass --images")
        pic, counts = manifest_grid(manifest, root, n, cols, cell, min_score,
                                    [i for i in ids.split(",") if i] or None, seed)
    except (ManifestError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    _save_picture(pic, out)
    typer.echo(f"wrote {out} ({pic.width}x{pic.height}): {counts['images']} images, {counts['boxes']} boxes"
               + (f", {counts['unreadable']} unreadable (red cells)" if counts["unreadable"] else ""))


@show_app.command("attention")
def show_attention_cmd(
    backbone: Path = typer.Option(..., "--backbone", help="Run folder, backbone.safetensors, checkpoint.pt or "
                                  "timm ViT checkpoint (then --arch)."),
    image: Path = typer.Option(..., "--image", help="An image file."),
    box: Optional[str] = typer.Option(None, "--box", help="x0,y0,x1,y1 in image pixels: the OBJ token attends only "
                                      "inside it (as trained). Default: plain CLS over the whole image."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without metadata."),
    size: Optional[int] = typer.Option(None, "--size", min=1, help="Input size, a multiple of the patch size "
                                       "(Resize size*256/224, CenterCrop size)."),
    out: Path = typer.Option(Path("attention.png"), "--out", help="PNG: the view, the head mean, then each head."),
) -> None:
    """The OBJ token's last-block attention per head (paper Fig. 10/11)."""
    from odis.eval.attention import obj_attention_maps
    from odis.eval.protocols import open_backbone
    from odis.imageio import ImageDecodeError, load_image
    from odis.viz import attention_figure

    _out_path(out, "--out", suffixes=_picture_suffixes())
    try:
        img = load_image(image)
        b = _fit_box(_show_box(box), img.width, img.height)
        model = open_backbone(backbone, arch)
        view, att, vbox = obj_attention_maps(model, img, b, size)
    except (FileNotFoundError, ValueError, ImageDecodeError) as e:
        fail(str(e))
    pic = attention_figure(view, att, vbox)
    _save_picture(pic, out)
    typer.echo(f"wrote {out} ({pic.width}x{pic.height}): view, mean of {att.shape[0]} heads, each head "
               f"({att.shape[1]}x{att.shape[2]} patches)")


@show_app.command("views")
def show_views_cmd(
    image: Optional[Path] = typer.Option(None, "--image", help="An image file (or use --shards and --key)."),
    box: Optional[str] = typer.Option(None, "--box", help="x0,y0,x1,y1 object box in image pixels (default: the "
                                      "whole image, as for images without boxes)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Take the sample from these shards instead..."),
    key: Optional[str] = typer.Option(None, "--key", help="...with this key (image_id); one of its boxes is "
                                      "drawn at random, as the trainer does."),
    method: str = typer.Option("odis", "--method", help="odis (object-aware crops) | ibot | dino (random crops)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the box choice, the random crops and the masks."),
    global_size: int = typer.Option(224, "--global-size", min=1, help="A multiple of --patch."),
    local_size: int = typer.Option(96, "--local-size", min=1),
    n_local: int = typer.Option(10, "--n-local", min=0),
    patch: int = typer.Option(16, "--patch", min=1, help="Patch size of the object / MIM mask grids."),
    out: Path = typer.Option(Path("views.png"), "--out", help="PNG to write."),
) -> None:
    """The training views of one sample: source with box and global crops; global views with the object's patches
    (green) and MIM-masked patches (blue); the local views."""
    import numpy as np

    from odis.boxes import sample_box
    from odis.imageio import ImageDecodeError, load_image
    from odis.views import ViewMaker
    from odis.viz import views_figure

    if (image is None) == (shards is None) or (shards is not None and not key):
        fail("give either --image (with an optional --box) or --shards with --key")
    if global_size % patch:
        fail(f"--global-size {global_size} must be a multiple of --patch {patch}")
    _out_path(out, "--out", suffixes=_picture_suffixes())
    rng = np.random.default_rng(seed)
    try:
        if shards is not None:
            from odis.shards import iter_samples

            sample_ = next((x for x in iter_samples(shards) if x.key == key), None)
            if sample_ is None:
                fail(f"{shards}: no sample with key {key!r}")
            img = np.asarray(load_image(sample_.image, name=f"{sample_.shard}:{key}"))
            all_boxes = np.asarray(sample_.meta.get("boxes") or [], float).reshape(-1, 4)
            b = all_boxes[sample_box(all_boxes, "uniform", rng)].tolist() if len(all_boxes) else None
        else:
            img = np.asarray(load_image(image))
            b = _fit_box(_show_box(box), img.shape[1], img.shape[0])
        maker = ViewMaker(global_size=global_size, local_size=local_size, n_local=n_local, patch_size=patch,
                          method=method)
    except (ImageDecodeError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    boxes = np.array([b], float) if b else np.zeros((0, 4))
    sample = maker(img, boxes, rng)
    shown = b if b else [0, 0, img.shape[1], img.shape[0]]
    pic = views_figure(img, sample, shown if method == "odis" else None)
    _save_picture(pic, out)
    typer.echo(f"wrote {out} ({pic.width}x{pic.height}): object in view 1/2: "
               f"{', '.join('yes' if v else 'no' for v in sample['obj_valid'])}; fallbacks {sample['fallbacks']}")


# ---- synthetic data and the demo: synth, demo ----------------------------------------------------------------

def _parse_range(text: str, cast, name: str) -> tuple:
    """'2-3' -> (2, 3); '3' -> (3, 3)."""
    try:
        parts = [cast(p) for p in text.split("-")] if "-" in text.strip("-") else [cast(text)] * 2
    except ValueError:
        parts = []
    if len(parts) != 2:
        fail(f"--{name} must be a number or a range like 1-4, got {text!r}")
    return tuple(parts)


@app.command()
def synth(
    out: str = typer.Option(..., "--out", help="Output folder (train/, val/, annotations/, synth.json)."),
    train: int = typer.Option(1000, help="Number of train scenes."),
    val: int = typer.Option(200, help="Number of val scenes."),
    size: int = typer.Option(64, help="Image side in pixels (e.g. 64, 96, 128, 224)."),
    objects: str = typer.Option("1-3", help="Objects per image, a range: the target plus distractors."),
    scale: str = typer.Option("0.25-0.5", help="Object's longer side as a fraction of the image side (range)."),
    max_iou: float = typer.Option(0.2, "--max-iou", help="Maximum IoU between any two object boxes."),
    clutter: float = typer.Option(0.5, min=0.0, max=1.0,
                                  help="0: plain background; up to 1: texture, pixel noise, unannotated strokes."),
    distractors: str = typer.Option("other", help="'other': distractor classes differ from the target's; 'any'."),
    palette: str = typer.Option("colour", help="colour: random colours everywhere (colour is a nuisance); gray: "
                                "light objects on a dark background, the MNIST look (easier to learn)."),
    mnist: str = typer.Option(None, help="Folder with MNIST IDX files (t10k-images-idx3-ubyte.gz, "
                                         "t10k-labels-idx1-ubyte.gz): digits as objects. Default: 10 drawn shapes."),
    image_format: str = typer.Option("png", "--format", help="png (lossless) or jpg."),
    seed: int = typer.Option(0, min=0, help="Seed: the same settings and seed give the same files."),
    overwrite: bool = typer.Option(False, help="Replace an earlier synth output in --out."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Generate multi-object scenes with exact boxes and per-object labels.

    The paper's claim in miniature. Each image holds one TARGET object plus
    distractors on a cluttered background. The target is the largest object,
    drawn on top; its class is the image label (the class folder). With
    --distractors other the distractors have other classes, so the image
    label is ambiguous and only a box says which object is meant:
    box-conditioned (object-level) features should win on k-NN over objects.

    Objects: 10 drawn shapes (arrow circle cross diamond hexagon moon ring
    square star triangle), or MNIST digits with --mnist (train and val draw
    from disjoint 80/20 pools of the file). A box is the tight box of the
    object's own mask (amodal); every pair of boxes has IoU <= --max-iou.

    Output, usable by `odis import-boxes --format coco` and
    `odis shard --labels folder`:

      OUT/train/CLASS/ID.png       ID: 12-digit COCO-style image id

      OUT/val/CLASS/ID.png         parent folder = image label

      OUT/annotations/instances_train.json, instances_val.json
      (COCO: bbox \\[x,y,w,h], area, iscrowd 0, category_id = 0-based
      class index = folder label index, RLE segmentation, target 0/1)

      OUT/synth.json               settings and counts
    """
    from pathlib import Path

    from odis.synth import SynthConfig, write_dataset

    _out_path(Path(out), "--out", folder=True)
    cfg = SynthConfig(size=size, objects=_parse_range(objects, int, "objects"),
                      scale=_parse_range(scale, float, "scale"), max_iou=max_iou, clutter=clutter,
                      distractors=distractors, palette=palette, seed=seed)
    try:
        summary = write_dataset(Path(out), cfg, train, val, mnist=mnist, fmt=image_format,
                                overwrite=overwrite, progress=progress)
    except (ValueError, FileExistsError) as e:
        fail(str(e))
    s = summary["settings"]
    typer.echo(f"{s['objects_source']}s ({len(s['classes'])} classes), {size}px, objects {objects}, "
               f"max IoU {max_iou}, clutter {clutter}, seed {seed}")
    for split, st in summary["splits"].items():
        typer.echo(f"{split}: {st['images']} images, {st['objects']} objects {st['objects_per_image']}, "
                   f"{st['dropped']} distractors dropped -> {Path(out) / split}, "
                   f"{Path(out) / 'annotations' / f'instances_{split}.json'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder: data/, manifests/, shards/, runs/, "
                             "report.md, loss.png, boxes.png, attention.png, results.json."),
    weights: Optional[str] = typer.Option(None, "--weights", help="YOLO weights (a .pt file or an exported model "
                                          "folder, e.g. ../shared/weights/yolov8n_320_int8_openvino_model): also "
                                          "extract detector boxes and train ODIS on them."),
    size: str = typer.Option("default", "--size", help="default (minutes on 2 CPU cores) | tiny (the test suite's "
                             "end-to-end check; numbers are noise)."),
    progress: bool = typer.Option(True, help="Progress bars of the data steps."),
) -> None:
    """The whole flow on generated data, no download: synth -> import-boxes -> shard -> train ODIS and iBOT ->
    k-NN on the target objects without and with boxes (vs an untrained network) -> OUT/report.md and pictures.

    \b
    odis demo --out runs/demo
    odis demo --out runs/demo-yolo --weights ../shared/weights/yolov8n_320_int8_openvino_model
    """
    from pipelines.demo import SIZES, DemoError, run_demo

    if size not in SIZES:
        fail(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    _out_path(out, "--out", folder=True)
    try:
        res = run_demo(out, size, weights, progress=progress, echo=typer.echo)
    except DemoError as e:
        fail(str(e))
    typer.echo("")
    typer.echo(Path(res.files["report"]).read_text().split("\n## Pictures")[0])
    typer.echo(f"report: {res.files['report']} ({sum(res.seconds.values()):.0f} s)")



if __name__ == "__main__":
    app(prog_name="odis")  # `python -m cli` (torchrun) reads like the console command
