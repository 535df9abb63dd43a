"""Picture commands: show boxes | attention | views."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from odis.cli.common import show_app, fail, check_out_path, picture_suffixes, save_picture


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

    check_out_path(out, "--out", suffixes=picture_suffixes())
    try:
        root = images or manifest_metadata(manifest).get("images_root")
        if root is None:
            fail(f"{manifest}: no images root recorded; pass --images")
        pic, counts = manifest_grid(manifest, root, n, cols, cell, min_score,
                                    [i for i in ids.split(",") if i] or None, seed)
    except (ManifestError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    save_picture(pic, out)
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

    check_out_path(out, "--out", suffixes=picture_suffixes())
    try:
        img = load_image(image)
        b = _fit_box(_show_box(box), img.width, img.height)
        model = open_backbone(backbone, arch)
        view, att, vbox = obj_attention_maps(model, img, b, size)
    except (FileNotFoundError, ValueError, ImageDecodeError) as e:
        fail(str(e))
    pic = attention_figure(view, att, vbox)
    save_picture(pic, out)
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
    check_out_path(out, "--out", suffixes=picture_suffixes())
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
    save_picture(pic, out)
    typer.echo(f"wrote {out} ({pic.width}x{pic.height}): object in view 1/2: "
               f"{', '.join('yes' if v else 'no' for v in sample['obj_valid'])}; fallbacks {sample['fallbacks']}")
