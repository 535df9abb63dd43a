"""Shard commands: shard, verify."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from odis.cli.common import app, fail, check_out_path


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
    from odis.pipelines.ray_connect import RayAddressError
    from odis.pipelines.shard import ShardError, ShardSettings, parse_size, run_shard

    check_out_path(out, "--out", folder=True)
    bar, started, written = None, 0.0, 0  # the progress bar, when writing began, bytes written since

    def on_plan(plan, n_todo):
        nonlocal bar, started
        typer.echo(f"{len(plan.shards)} shard(s) planned, {sum(map(len, plan.shards))} images; "
                   f"{n_todo} images to write")
        bar = tqdm(total=n_todo, unit="img", dynamic_ncols=True, smoothing=0.1)
        started = _time.perf_counter()

    def progress(n, nbytes):
        nonlocal written
        written += nbytes
        bar.set_postfix_str(f"{written / 1e6 / max(_time.perf_counter() - started, 1e-9):.1f} MB/s", refresh=False)
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

    from odis.shards import read_index
    from odis.verify import verify_shards

    try:
        n = len(read_index(shards)["shards"])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    with tqdm(total=n, unit="shard", dynamic_ncols=True, disable=as_json) as bar:
        report = verify_shards(shards, decode=decode, progress=lambda count, nbytes: bar.update(1))
    typer.echo(_json.dumps(report.to_dict(), indent=1) if as_json else report.summary())
    if not report.ok:
        raise typer.Exit(1)
