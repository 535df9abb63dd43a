"""The `odis` command line: parse, call the library or a pipeline, print. No logic lives here.

Each stage of the flow has its section below (boxes, shards, training, evaluation, pictures, demo).
"""
from __future__ import annotations

import os
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


# ---- boxes: import-boxes, extract-boxes, stats -------------------------------------------------------------

# ---- shards: shard, verify ---------------------------------------------------------------------------------

@app.command("shard")
def shard_cmd(
    images: Path = typer.Option(..., "--images", help="Images root (ImageNet: train/ with one folder per class; "
                                "COCO: train2017/). Searched recursively; hidden files are ignored."),
    out: Path = typer.Option(..., "--out", help="Output folder shards/NAME: NAME-000000.tar ... + index.json."),
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
    quality: int = typer.Option(90, "--quality", help="JPEG/WebP quality when an image is re-encoded."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled sample order (and of the shard plan)."),
    num_workers: int = typer.Option(os.cpu_count() or 1, "--num-workers", help="Local processes (one shard each)."),
    use_ray: bool = typer.Option(False, "--use-ray", help="Run as a Ray job, one task per shard (local Ray "
                                 "unless --ray-address / RAY_ADDRESS)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (implies "
                                              "--use-ray). Images and --out must be on a filesystem all nodes see."),
    check: str = typer.Option("header", "--check", help="header: read each image's header and end marker "
                              "(catches truncation, fast); decode: decode every image too."),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", help="Refuse larger images (decompression bombs)."),
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

    from pipelines.shard import ShardError, ShardSettings, parse_size, run_shard
    from odis.manifest import ManifestError

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
        bar.update(n)
        bar.set_postfix_str(f"{t0[1] / 1e6 / max(_time.perf_counter() - t0[0], 1e-9):.1f} MB/s", refresh=False)

    try:
        settings = ShardSettings(
            images=str(images), out=str(out), labels=labels, manifest=str(manifest) if manifest else None,
            coco_json=str(coco_json) if coco_json else None, id_scheme=id_scheme, max_samples=max_samples,
            max_size=parse_size(max_size), resize_short=resize_short, quality=quality, seed=seed, check=check,
            max_pixels=max_pixels)
        index = run_shard(settings, overwrite=overwrite, num_workers=num_workers, use_ray=use_ray,
                          ray_address=ray_address, progress=progress, on_plan=on_plan)
    except (ShardError, ManifestError) as e:
        fail(str(e))
    finally:
        if bar is not None:
            bar.close()
    secs = index["last_run"]["seconds"]
    typer.echo(f"{out}: {index['num_shards']} shard(s), {index['num_samples']} samples, "
               f"{sum(s['bytes'] for s in index['shards']) / 1e6:.1f} MB; wrote {index['last_run']['shards_written']}"
               f" shard(s) in {secs:.1f} s")
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

# ---- evaluation: eval knn | linear | dense-nn ----------------------------------------------------------------

# ---- pictures: show boxes | attention | views ----------------------------------------------------------------

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
    mnist: str = typer.Option(None, help="Folder with MNIST IDX files (t10k-images-idx3-ubyte.gz, "
                                         "t10k-labels-idx1-ubyte.gz): digits as objects. Default: 10 drawn shapes."),
    image_format: str = typer.Option("png", "--format", help="png (lossless) or jpg."),
    seed: int = typer.Option(0, help="Seed: the same settings and seed give the same files."),
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

    cfg = SynthConfig(size=size, objects=_parse_range(objects, int, "objects"),
                      scale=_parse_range(scale, float, "scale"), max_iou=max_iou, clutter=clutter,
                      distractors=distractors, seed=seed)
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



if __name__ == "__main__":
    app()
