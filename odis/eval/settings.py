"""The settings of each evaluator, with their defaults and checks in one place (the CLI only parses and prints).

    KnnSettings, LinearSettings   frozen features of two shard sets (FeatureSettings) + the protocol's own
    DenseSettings                 a segmentation dataset in one of segdata's layouts
    LinearSegSettings             the same datasets, a linear head trained on frozen patch tokens
    RetrievalSettings             revisited Oxford/Paris: a ground truth and its jpg/ folder

`validate()` raises ValueError naming the option; the run_* functions of odis.eval.protocols call it first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BOX_MODES = ("none", "mask", "crop", "blackout")
BOX_SELECT = ("largest", "score", "union")
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # iBOT's linear-probe sweep
DENSE_SPLITS = {"coco": ("train2017", "val2017"), "voc": ("train", "val"), "ade20k": ("training", "validation")}


def _one_of(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _all(option: str, values, ok, expected: str) -> None:
    bad = [v for v in values if not ok(v)]
    if bad:
        raise ValueError(f"{option}: every value must be {expected}, got {bad[0]!r}")


@dataclass
class FeatureSettings:
    """Which backbone, which shards, and how one feature per image is taken (the box mode)."""
    backbone: str | Path
    train: str                      # the bank / training shards
    val: str                        # the queries / validation shards
    mode: str = "none"              # BOX_MODES
    boxes: str | Path | None = None  # a box manifest; None: the boxes in the shards' json
    box_select: str = "largest"     # BOX_SELECT: which box of several
    size: int | None = None         # input size; None: the backbone's training size
    arch: str | None = None         # timm architecture, for checkpoints without odis metadata
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    cache: str | Path | None = None  # a folder to keep extracted features in
    progress: bool = True
    masks: str | Path | None = None  # a COCO instances JSON: OBJ masks from segmentations (mode `mask` only)

    def validate(self) -> "FeatureSettings":
        _one_of("--boxes-mode", self.mode, BOX_MODES)
        _one_of("--box-select", self.box_select, BOX_SELECT)
        if self.masks is not None:
            if self.mode != "mask":
                raise ValueError(f"--masks needs --boxes-mode mask (the segmentation replaces the box in the OBJ "
                                 f"token's attention mask), got --boxes-mode {self.mode}")
            if not Path(self.masks).is_file():
                raise ValueError(f"--masks {self.masks}: no such file (a COCO instances JSON, e.g. "
                                 "annotations/instances_val2017.json)")
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size must be >= 1, got {self.size}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {self.batch_size}, {self.workers}")
        return self


@dataclass
class KnnSettings(FeatureSettings):
    """DINO's weighted k-NN: the votes of the ks nearest bank features, weighted exp(cos / T)."""
    ks: tuple[int, ...] = (10, 20, 100, 200)
    T: float = 0.07

    def validate(self) -> "KnnSettings":
        super().validate()
        _all("--k", self.ks, lambda v: v >= 1, ">= 1")
        if not self.ks or not self.T > 0:
            raise ValueError(f"--k needs at least one value and --temperature must be > 0, got {self.ks}, {self.T}")
        return self


@dataclass
class LinearSettings(FeatureSettings):
    """Linear probes on cached features: an lr sweep, full data and few-shot settings averaged over seeds."""
    n_last_blocks: int = 4           # concatenate the OBJ/CLS of the last N blocks (DINO/iBOT: 4 for ViT-S)
    lrs: tuple[float, ...] = DEFAULT_LRS
    epochs: int = 100
    probe_batch: int = 256           # the probe's own batch, over cached features
    shots: tuple[int, ...] = ()      # images per class
    fractions: tuple[float, ...] = ()  # class-stratified fractions of the training set
    seeds: tuple[int, ...] = (0, 1, 2)
    full: bool = True                # also the probe on the whole training set

    def validate(self) -> "LinearSettings":
        super().validate()
        _all("--lrs", self.lrs, lambda v: v > 0, "> 0")
        _all("--shots", self.shots, lambda v: v >= 1, ">= 1")
        _all("--fraction", self.fractions, lambda v: 0 < v <= 1, "in (0, 1]")
        if self.n_last_blocks < 1 or self.epochs < 1 or not self.seeds or not self.lrs:
            raise ValueError("--n-last-blocks and --epochs must be >= 1, with at least one seed and one lr")
        return self


@dataclass
class SegDataSettings:
    """A backbone and a segmentation dataset in one of segdata's layouts, with its two splits."""
    backbone: str | Path
    dataset: str                     # DENSE_SPLITS' keys: segdata's layouts
    root: str | Path
    train_split: str = ""            # "": the layout's default (DENSE_SPLITS)
    val_split: str = ""

    def validate(self) -> "SegDataSettings":
        _one_of("--dataset", self.dataset, DENSE_SPLITS)
        self.train_split = self.train_split or DENSE_SPLITS[self.dataset][0]
        self.val_split = self.val_split or DENSE_SPLITS[self.dataset][1]
        return self


@dataclass
class DenseSettings(SegDataSettings):
    """Hummingbird's dense nearest-neighbour retrieval: a patch memory, k neighbours, softmax(cos / beta)."""
    size: int = 512
    factors: tuple[int, ...] = (1, 8, 64, 128)  # memory subsampling: each image gives 1/f of its patches
    k: int = 30
    beta: float = 0.02
    max_train: int | None = None
    max_val: int | None = None
    arch: str | None = None
    batch_size: int = 16
    device: str = "auto"
    seed: int = 0

    def validate(self) -> "DenseSettings":
        super().validate()
        _all("--factors", self.factors, lambda v: v >= 1, ">= 1")
        if self.size < 1 or self.k < 1 or not self.beta > 0 or self.batch_size < 1:
            raise ValueError("--size, --k and --batch-size must be >= 1 and --beta > 0")
        return self


@dataclass
class LinearSegSettings(SegDataSettings):
    """Linear segmentation (Leopart / NeCo protocol): a 1x1 head on frozen patch tokens, trained with SGD."""
    size: int = 448                  # input size (RandomResizedCrop / resize)
    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    drop_at: int = 20                # StepLR: lr x 0.1 every drop_at epochs (20 of 20: never)
    batch_size: int = 128
    mask_size: int = 100             # logits and labels compared on a mask_size grid; 0: the input size
    augment: bool = True             # RandomResizedCrop + flip every epoch; False: features extracted once
    max_train: int | None = None
    max_val: int | None = None
    arch: str | None = None
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def validate(self) -> "LinearSegSettings":
        super().validate()
        if self.size < 1 or self.epochs < 1 or self.batch_size < 1 or self.drop_at < 1:
            raise ValueError("--size, --epochs, --batch-size and --drop-at must be >= 1")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise ValueError(f"--lr must be > 0, --momentum in [0, 1) and --weight-decay >= 0, got {self.lr}, "
                             f"{self.momentum}, {self.weight_decay}")
        if self.mask_size < 0 or self.workers < 0:
            raise ValueError(f"--mask-size and --workers must be >= 0, got {self.mask_size}, {self.workers}")
        for option, n in (("--max-train", self.max_train), ("--max-val", self.max_val)):
            if n is not None and n < 1:
                raise ValueError(f"{option} must be >= 1, got {n}")
        return self


RETRIEVAL_DATASETS = ("roxford5k", "rparis6k")


@dataclass
class RetrievalSettings:
    """Revisited Oxford/Paris retrieval as DINO's eval_image_retrieval.py: [OBJ]/[CLS] of the whole image (long
    side at most imsize), queries cropped to their bbx, optional 3-scale average, mAP / mP@k Medium and Hard."""
    backbone: str | Path
    dataset: str                     # RETRIEVAL_DATASETS
    root: str | Path                 # holds DATASET/gnd_DATASET.pkl (or .json) and DATASET/jpg/
    gnd: str | Path | None = None    # another ground-truth file (.pkl or .json); None: the one under root
    imsize: int = 224                # DINO's --imsize: the long side after the resize (never enlarged)
    multiscale: bool = False         # DINO's --multiscale: scales 1, 1/sqrt(2), 1/2 averaged
    query_crop: bool = True          # crop the queries to their bbx (revisitop); False: the whole image (DINO)
    arch: str | None = None
    batch_size: int = 32             # images of the same size that run together
    workers: int = 2
    device: str = "auto"
    max_db: int | None = None        # the first N database images (quick checks)
    max_queries: int | None = None
    progress: bool = True

    def validate(self) -> "RetrievalSettings":
        _one_of("--dataset", self.dataset, RETRIEVAL_DATASETS)
        if self.imsize < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"--imsize and --batch-size must be >= 1 and --workers >= 0, got {self.imsize}, "
                             f"{self.batch_size}, {self.workers}")
        for option, v in (("--max-db", self.max_db), ("--max-queries", self.max_queries)):
            if v is not None and v < 1:
                raise ValueError(f"{option} must be >= 1, got {v}")
        return self
