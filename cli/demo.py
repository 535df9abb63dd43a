"""Generated data and the demo: synth, demo."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from odis.cli.common import app, fail, check_out_path


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
    backgrounds: str = typer.Option(None, help="Folder of photos (searched recursively, e.g. Tiny-ImageNet's "
                                    "train/): each scene's background is a random crop of one (train and val "
                                    "use disjoint photos); --clutter then adds only noise and strokes."),
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

    from odis.synth import SynthConfig
    from odis.synth_dataset import write_dataset

    check_out_path(Path(out), "--out", folder=True)
    cfg = SynthConfig(size=size, objects=_parse_range(objects, int, "objects"),
                      scale=_parse_range(scale, float, "scale"), max_iou=max_iou, clutter=clutter,
                      distractors=distractors, palette=palette, seed=seed, backgrounds=backgrounds)
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
    from odis.pipelines.demo import SIZES, DemoError, run_demo

    if size not in SIZES:
        fail(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    check_out_path(out, "--out", folder=True)
    try:
        res = run_demo(out, size, weights, progress=progress, echo=typer.echo)
    except DemoError as e:
        fail(str(e))
    typer.echo("")
    typer.echo(Path(res.files["report"]).read_text().split("\n## Pictures")[0])
    typer.echo(f"report: {res.files['report']} ({sum(res.seconds.values()):.0f} s)")
