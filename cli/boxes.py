"""Box commands: import-boxes, extract-boxes, stats."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from odis.cli.common import app, fail, positive, check_out_path, writing


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
    from odis.manifest import write_manifest
    from odis.manifest_stats import summary_stats

    check_out_path(out, "--out")
    if out.exists() and not overwrite:
        fail(f"{out} exists (use --overwrite to replace it)")
    if not images.is_dir():
        fail(f"--images {images}: not a folder")
    try:
        res = import_boxes(fmt, images, annotations, from_segmentation=from_segmentation, keep_crowd=keep_crowd)
    except AnnotationError as e:
        fail(str(e))
    with writing(out, "--out"):
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
                                          "(default: yolo11n_int8_openvino_model in $ODIS_SHARED/weights or ../shared/weights); mavl: a local "
                                          "OWL-ViT/OWLv2 folder (save_pretrained); selective-search: none."),
    conf: Optional[float] = typer.Option(None, "--conf", help="Score threshold (yolo 0.25, mavl 0.1)."),
    iou: Optional[float] = typer.Option(None, "--iou", help="Class-agnostic NMS IoU (yolo 0.7, mavl 0.5)."),
    max_boxes: int = typer.Option(100, "--max-boxes", help="Keep at most N boxes per image (best first)."),
    min_area: float = typer.Option(0.0, "--min-area", help="Drop boxes smaller than this fraction of the image."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="yolo: inference size (640); mavl: model input "
                                        "(default: the processor's); selective-search: longest side (500)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per detector call."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=1, help="Detectors (default 1 on CPU, "
                                              "one per GPU with --device cuda); more than one runs as Ray actors."),
    cpus_per_worker: Optional[float] = typer.Option(None, "--cpus-per-worker", callback=positive, help="Decode "
                                                    "threads of a detector: its Ray CPUs (default: the cluster's "
                                                    "CPUs shared out; with cuda, a GPU's share of its node's CPUs); "
                                                    "on one machine, threads (default: one per core)."),
    gpus_per_worker: float = typer.Option(1.0, "--num-gpus-per-worker", callback=positive, help="--device cuda "
                                          "on Ray: the share of a GPU each detector holds; 0.5 runs two per GPU "
                                          "(default --num-workers: as many as the GPUs hold)."),
    use_ray: bool = typer.Option(False, "--use-ray", help="Run as a Ray Data job even with one detector on this "
                                 "machine (a local Ray unless --ray-address / RAY_ADDRESS). Default: one detector "
                                 "in this process, at the detector's own speed."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster (host:port or ray://...), "
                                              "default RAY_ADDRESS; implies --use-ray."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images (sorted by path)."),
    part_size: int = typer.Option(1000, "--part-size", min=1, help="Images per parquet part (what a kill can "
                                  "lose)."),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", min=1, help="Refuse larger images (decompression "
                                   "bombs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: delete the parts of an earlier run in --out (and its staged parts) first; nothing else."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Run a class-agnostic detector over a folder and write a box manifest: in this process on one machine, as
    a Ray Data job on a cluster (--ray-address), with several detectors (--num-workers) or with --use-ray.

    Unreadable images get an `error` row (a rerun redoes those the system could not read and those the detector
    failed on); images with no box get a no-box row. A killed run resumes from its finished parts: rerun the same
    command.

    \b
    odis extract-boxes --detector yolo --images coco/train2017 --id-scheme coco --out manifests/coco-yolo.parquet
    odis extract-boxes --detector mavl --weights models/owlv2-base --images in1k/train --out manifests/in1k-mavl.parquet \\
        --device cuda --ray-address 10.0.0.1:6379
    """
    from odis.manifest import ManifestError
    from odis.pipelines.detectors import DETECTORS, default_yolo_weights
    from odis.pipelines.extract import ExtractConfig, extract_boxes, resolve_detector

    check_out_path(out, "--out", folder=True)
    if detector not in DETECTORS:
        fail(f"--detector {detector!r}: expected one of {', '.join(DETECTORS)}")
    if detector == "yolo" and weights is None:
        weights = default_yolo_weights()
        if weights is None:
            fail("--detector yolo: no --weights given, and no yolo11n_int8_openvino_model in $ODIS_SHARED/weights "
                 "or ../shared/weights")
    # --weights and the other options are checked by extract_boxes before any detector loads (one-line errors).
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "odis" / "ultralytics"))
    det = resolve_detector(detector, weights=weights if detector != "selective-search" else None, conf=conf,
                           iou=iou, max_boxes=max_boxes, min_area=min_area, imgsz=imgsz, device=device)
    cfg = ExtractConfig(detector=det, images=str(images), out=str(out), id_scheme=id_scheme, batch_size=batch_size,
                        num_workers=num_workers, cpus_per_worker=cpus_per_worker, ray_address=ray_address,
                        use_ray=use_ray, gpus_per_worker=gpus_per_worker,
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

    from odis.manifest import ManifestError, manifest_files, manifest_metadata, read_manifest
    from odis.manifest_stats import plot_stats, summary_stats
    from odis.manifest_validate import validate_manifest

    if manifest.is_dir() and not manifest_files(manifest):
        fail(f"{manifest}: no parquet parts in this folder")
    if plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        check_out_path(plot, "--plot", suffixes=tuple(f".{e}" for e in FigureCanvasBase.get_supported_filetypes()))
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
        with writing(plot, "--plot"):
            typer.echo(f"plot: {plot_stats(table, plot, title=str(manifest.name))}")
    problems = validate_manifest(manifest) if validate else []
    for p in problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(1)
