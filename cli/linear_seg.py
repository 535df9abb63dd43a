"""Evaluation command: eval linear-seg (a linear segmentation head on frozen patch tokens)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from odis.cli.common import check_out_path, eval_app, positive
from odis.cli.evaluate import _BACKBONE_HELP, _run


@eval_app.command("linear-seg")
def eval_linear_seg_cmd(
    backbone: Path = typer.Option(..., "--backbone", help=_BACKBONE_HELP),
    dataset: str = typer.Option(..., "--dataset", help="coco (masks from instance annotations) | voc | ade20k."),
    root: Path = typer.Option(..., "--root", help="coco: the folder with annotations/ and SPLIT/; voc: VOC2012 "
                              "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/); ade20k: "
                              "ADEChallengeData2016."),
    train_split: str = typer.Option("", "--train-split", help="Split the head trains on (default: train2017 | "
                                    "train | training; VOC as in the papers: trainaug)."),
    val_split: str = typer.Option("", "--val-split", help="Split it is scored on (default: val2017 | val | "
                                  "validation)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without odis metadata."),
    size: int = typer.Option(448, "--size", min=1, help="Input size, a multiple of the patch size (the protocol: "
                             "448; training views RandomResizedCrop(size, 0.8-1), validation resized to size x size)."),
    mask_size: int = typer.Option(100, "--mask-size", min=0, help="Logits are upsampled to, and labels "
                                  "nearest-resized to, mask-size x mask-size (the protocol: 100); 0: the input size."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Epochs of head training."),
    lr: float = typer.Option(0.01, "--lr", callback=positive, help="SGD learning rate (momentum 0.9)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", min=0.0, help="SGD weight decay."),
    drop_at: int = typer.Option(20, "--drop-at", min=1, help="StepLR: lr x 0.1 every N epochs (20 of 20: never)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    no_augment: bool = typer.Option(False, "--no-augment", help="Extract the training features once (plain "
                                    "resize, no crop/flip) and train the head on them: one backbone pass instead "
                                    "of one per epoch (a deviation from the protocol, stated in the JSON)."),
    max_train: Optional[int] = typer.Option(None, "--max-train", min=1, help="Use the first N training images."),
    max_val: Optional[int] = typer.Option(None, "--max-val", min=1, help="Use the first N validation images."),
    workers: int = typer.Option(2, "--workers", min=0, help="Data-loading processes for the training views."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    seed: int = typer.Option(0, "--seed", help="Seed of the head's initialisation, the order and the views."),
    out: Optional[Path] = typer.Option(None, "--out", help="Result JSON."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Another result JSON to print side by side."),
) -> None:
    """Linear segmentation (Leopart / NeCo protocol): a 1x1 convolution on the frozen teacher's last-block patch
    tokens, logits bilinearly upsampled to 100 x 100, cross-entropy (255 ignored), SGD lr 0.01 / momentum 0.9 /
    weight decay 1e-4, 20 epochs, batch 128, input 448; mIoU on the validation split.

    \b
    odis eval linear-seg --backbone runs/odis-s16 --dataset voc --root data/VOCdevkit/VOC2012 --train-split trainaug
    odis eval linear-seg --backbone runs/odis-s16 --dataset coco --root data/coco --max-train 10000 --no-augment
    """
    from odis.eval.protocols import run_linear_seg
    from odis.eval.settings import LinearSegSettings

    check_out_path(out, "--out")
    _run(run_linear_seg, LinearSegSettings(backbone, dataset, root, train_split, val_split, size, epochs, lr,
                                           weight_decay=weight_decay, drop_at=drop_at, batch_size=batch_size,
                                           mask_size=mask_size, augment=not no_augment, max_train=max_train,
                                           max_val=max_val, arch=arch, workers=workers, device=device, seed=seed),
         out, compare)
