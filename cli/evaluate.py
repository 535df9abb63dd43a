"""Evaluation commands: eval knn | linear | dense-nn."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from odis.cli.common import eval_app, fail, positive, number_list, check_out_path, writing


def _run(protocol, settings, out: Optional[Path], compare: Optional[Path]) -> None:
    """Run one protocol (its settings are checked in the library), then write and print its result."""
    try:
        result = protocol(settings)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    _eval_finish(result, out, compare)


def _eval_finish(result: dict, out: Optional[Path], compare: Optional[Path]) -> None:
    """Write the JSON, print the table (side by side with --compare)."""
    from odis.eval.protocols import load_result, table, write_result

    if out is not None:
        with writing(out, "--out"):
            write_result(result, out)
    try:
        other = load_result(compare) if compare else None
        typer.echo(table(result, other, other_name=compare.name if compare else "other"))
    except ValueError as e:
        fail(str(e))
    for split, c in result.get("counts", {}).items():
        fell = {k: v for k, v in c.items() if v and k != "errors" and not k.startswith("mask_")}
        if fell:
            typer.echo(f"{split}: whole image used for " + ", ".join(f"{v} ({k.replace('_', ' ')})"
                                                                     for k, v in fell.items()))
        if "mask_segmentation" in c:  # --masks: segmentations, and the box masks that stayed (by reason)
            why = {k: v for k, v in c.items() if v and k.startswith("mask_") and
                   k not in ("mask_segmentation", "mask_fallback_box")}
            typer.echo(f"{split}: segmentation mask used for {c['mask_segmentation']}, box mask for "
                       f"{c.get('mask_fallback_box', 0)}" + (" (" + ", ".join(
                           f"{v} {k.removeprefix('mask_').replace('_', ' ')}" for k, v in why.items()) + ")"
                           if why else ""))
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
_MASKS_HELP = ("With --boxes-mode mask: a COCO instances JSON (e.g. annotations/instances_val2017.json) whose "
               "segmentations replace the boxes (the paper's Table 5 'Use Masks'). A shard key is the COCO image id "
               "(odis shard --id-scheme coco); the selected box takes the segmentation of the annotation whose box "
               "matches it best (IoU >= 0.5), scaled to the stored image, carried through the same Resize/CenterCrop "
               "(nearest) and reduced to the patches with any pixel in it. Images not in the file, or whose object "
               "has no segmentation, keep the box mask (counted as mask_fallback_box, by reason).")
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
    masks: Optional[Path] = typer.Option(None, "--masks", help=_MASKS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without odis "
                                       "metadata, e.g. vit_small_patch16_224."),
    size: Optional[int] = typer.Option(None, "--size", min=1, help="Input size (CenterCrop), a multiple of the "
                                       "patch size; Resize is size*256/224. Default: the backbone's training size."),
    k: str = typer.Option("10,20,100,200", "--k", callback=number_list(int, lambda v: v >= 1, ">= 1"),
                          help="Neighbour counts (clamped to the bank size)."),
    temperature: float = typer.Option(0.07, "--temperature", callback=positive,
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
    from odis.eval.protocols import run_knn
    from odis.eval.settings import KnnSettings

    check_out_path(out, "--out")
    check_out_path(cache, "--cache", folder=True)
    _run(run_knn, KnnSettings(backbone, train, val, boxes_mode, boxes, box_select, size, arch, batch_size, workers,
                              device, cache, ks=tuple(k), T=temperature, masks=masks), out, compare)


@eval_app.command("linear")
def eval_linear_cmd(
    backbone: Path = typer.Option(..., "--backbone", help=_BACKBONE_HELP),
    train: str = typer.Option(..., "--train", help="Training shards."),
    val: str = typer.Option(..., "--val", help="Validation shards."),
    boxes_mode: str = typer.Option("none", "--boxes-mode", help=_MODE_HELP),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help=_BOXES_HELP),
    box_select: str = typer.Option("largest", "--box-select", help="Which box of several: largest | score | union."),
    masks: Optional[Path] = typer.Option(None, "--masks", help=_MASKS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without odis metadata."),
    size: Optional[int] = typer.Option(None, "--size", min=1, help="Input size, a multiple of the patch size; "
                                       "default: the backbone's training size."),
    n_last_blocks: int = typer.Option(4, "--n-last-blocks", min=1, help="Concatenate the OBJ/CLS of the last N "
                                      "blocks (4 for ViT-S as in DINO/iBOT)."),
    lrs: str = typer.Option("1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", "--lrs",
                            callback=number_list(float, lambda v: v > 0, "> 0"),
                            help="Learning-rate sweep (SGD m=0.9, cosine); the best on val is reported, as iBOT does."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Epochs over the cached features."),
    shots: str = typer.Option("", "--shots", callback=number_list(int, lambda v: v >= 1, ">= 1", required=False),
                              help="Few-shot settings, e.g. 1,2,5 images per class."),
    fraction: str = typer.Option("", "--fraction", callback=number_list(float, lambda v: 0 < v <= 1, "in (0, 1]",
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
    from odis.eval.protocols import run_linear
    from odis.eval.settings import LinearSettings

    check_out_path(out, "--out")
    check_out_path(cache, "--cache", folder=True)
    _run(run_linear, LinearSettings(backbone, train, val, boxes_mode, boxes, box_select, size, arch, batch_size,
                                    workers, device, cache, n_last_blocks=n_last_blocks, lrs=tuple(lrs),
                                    epochs=epochs, shots=tuple(shots), fractions=tuple(fraction),
                                    seeds=tuple(range(seeds)), full=not skip_full, masks=masks), out, compare)


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
    factors: str = typer.Option("1,8,64,128", "--factors", callback=number_list(int, lambda v: v >= 1, ">= 1"),
                                help="Memory subsampling factors: each image gives 1/f of its patches (rare "
                                "classes first)."),
    k: int = typer.Option(30, "--k", min=1, help="Neighbours per query patch."),
    beta: float = typer.Option(0.02, "--beta", callback=positive, help="Temperature of the softmax over neighbour "
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
    from odis.eval.settings import DenseSettings

    check_out_path(out, "--out")
    _run(run_dense, DenseSettings(backbone, dataset, root, train_split, val_split, size, tuple(factors), k, beta,
                                  max_train, max_val, arch, batch_size, device, seed), out, compare)
