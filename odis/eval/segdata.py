"""Semantic-segmentation data for the dense evaluations: COCO (masks built from instance annotations), PASCAL VOC
and ADE20K in their usual folder layouts.

Every dataset yields `(image_id, PIL image, mask)` with `mask` an int64 [H, W] array of labels in [0, num_classes)
and 255 for pixels to ignore:
- COCO: 0 = background, 1..80 = the categories in id order; crowd regions 255. Larger instances are painted first
  so that a small object on a large one stays visible.
- VOC (`VOCdevkit/VOC2012`: JPEGImages/, SegmentationClass/*.png palette PNGs, ImageSets/Segmentation/SPLIT.txt):
  0 = background, 1..20, 255 = the object borders VOC marks as void.
- ADE20K (`ADEChallengeData2016`: images/{training,validation}/*.jpg, annotations/{...}/*.png): the 150 classes
  become 0..149; ADE's 0 ("other") becomes 255, as the benchmark ignores it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from odis.imageio import DEFAULT_MAX_PIXELS, load_image
from odis.names import plain_name

IGNORE = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

def open_label_png(path: Path) -> Image.Image:
    """A label PNG as stored (palette / grey), refused before decoding when over the pixel cap."""
    img = Image.open(path)
    if img.width * img.height > DEFAULT_MAX_PIXELS:
        raise ValueError(f"{path}: image of {img.width}x{img.height} pixels is over the {DEFAULT_MAX_PIXELS} cap")
    img.load()
    return img

@dataclass
class SegDataset:
    """A list of (image_id, image path) with a function that makes each mask."""

    name: str
    class_names: list[str]
    items: list[tuple[str, Path]]
    make_mask: Callable[[int], np.ndarray] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, Image.Image, np.ndarray]:
        image_id, path = self.items[i]
        img = load_image(path, max_pixels=DEFAULT_MAX_PIXELS)
        mask = self.make_mask(i)
        if mask.shape != (img.height, img.width):
            raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, image {img.width}x{img.height}")
        return image_id, img, mask

    def subset(self, n: int | None) -> "SegDataset":
        if n is None or n >= len(self.items):
            return self
        keep = self.items[:n]
        return SegDataset(self.name, self.class_names, keep, self.make_mask)

def _mask_image_problem(img: dict) -> str | None:
    """The [H, W] label mask is allocated from the JSON's size before the image is read: cap it like the image."""
    if img["width"] * img["height"] > DEFAULT_MAX_PIXELS:
        return f"{img['width']}x{img['height']} pixels is over the {DEFAULT_MAX_PIXELS} cap"
    return None

def _mask_annotation_problem(ann: dict) -> str | None:
    """Every annotation is painted, larger areas first: it needs a mask and a numeric area."""
    if not ann.get("segmentation"):
        return "no segmentation (every annotation is painted into the mask)"
    area = ann.get("area", 0)
    if not isinstance(area, (int, float)) or isinstance(area, bool):
        return f"area must be a number, got {area!r}"
    return None

def load_coco_masks(ann_file: str | Path):
    """A pycocotools COCO over the instances JSON, checked up front (odis.importers.load_coco: every image, polygon
    and RLE) because pycocotools trusts it: a NaN polygon point makes it rasterise gigabytes."""
    from pycocotools.coco import COCO

    import contextlib
    import io

    from odis.importers import check_coco_section, load_coco

    data = load_coco(Path(ann_file), from_segmentation=True)
    check_coco_section(Path(ann_file), data, "images", _mask_image_problem)
    check_coco_section(Path(ann_file), data, "annotations", _mask_annotation_problem)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco

def coco_semantic(ann_file: str | Path, images_dir: str | Path) -> SegDataset:
    """Semantic masks from a COCO instances JSON (pycocotools decodes polygons and RLE alike)."""
    coco = load_coco_masks(ann_file)
    cat_ids = sorted(coco.getCatIds())
    label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
    names = ["background"] + [coco.cats[c]["name"] for c in cat_ids]
    img_ids = sorted(coco.getImgIds())
    images_dir = Path(images_dir)
    items = [(f"{i:012d}", images_dir / coco.imgs[i]["file_name"]) for i in img_ids]

    def make_mask(k: int) -> np.ndarray:
        info = coco.imgs[img_ids[k]]
        mask = np.zeros((info["height"], info["width"]), np.int64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_ids[k], iscrowd=None))
        for a in sorted(anns, key=lambda a: -a.get("area", 0)):
            m = coco.annToMask(a).astype(bool)
            mask[m] = IGNORE if a.get("iscrowd", 0) else label_of[a["category_id"]]
        return mask

    return SegDataset("coco", names, items, make_mask)

def _png_labels(path: Path) -> np.ndarray:
    """Label indices of an annotation PNG (palette indices for VOC, grey levels for ADE20K)."""
    img = open_label_png(path)
    if img.mode not in ("P", "L", "I", "I;16"):
        raise ValueError(f"{path}: expected a palette or greyscale label PNG, got mode {img.mode}")
    return np.asarray(img, dtype=np.int64)

def voc_semantic(root: str | Path, split: str = "val") -> SegDataset:
    """PASCAL VOC (2012 or SBD-augmented) from `root` = the folder with JPEGImages/ and SegmentationClass/."""
    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"VOC split file not found: {split_file}")
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    for k, i in enumerate(ids):  # names from a file others made: plain names in their folder (odis.names)
        plain_name(i, f"{split_file}: line {k + 1}")
    items = [(i, root / "JPEGImages" / f"{i}.jpg") for i in ids]
    masks = [root / "SegmentationClass" / f"{i}.png" for i in ids]
    missing = [str(p) for (_, p) in items if not p.is_file()] + [str(m) for m in masks if not m.is_file()]
    if missing:
        raise FileNotFoundError(f"VOC {split}: {len(missing)} files missing, e.g. {missing[0]}")
    return SegDataset("voc", list(VOC_CLASSES), items, lambda k: _png_labels(masks[k]))

def ade20k_semantic(root: str | Path, split: str = "validation") -> SegDataset:
    """ADE20K (SceneParsing `ADEChallengeData2016`): 150 classes -> 0..149, ADE's 0 ('other') -> ignored."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise FileNotFoundError(f"ADE20K {split}: expected {img_dir} and {ann_dir}")
    paths = sorted(img_dir.glob("*.jpg"))
    items = [(p.stem, p) for p in paths]
    masks = [ann_dir / f"{p.stem}.png" for p in paths]
    missing = [str(m) for m in masks if not m.is_file()]
    if missing:
        raise FileNotFoundError(f"ADE20K {split}: {len(missing)} annotation PNGs missing, e.g. {missing[0]}")

    def make_mask(k: int) -> np.ndarray:
        m = _png_labels(masks[k])
        return np.where(m == 0, IGNORE, m - 1)

    return SegDataset("ade20k", [f"class{i}" for i in range(1, 151)], items, make_mask)

def open_dataset(kind: str, root: str | Path, split: str) -> SegDataset:
    """`coco` (root = the folder with annotations/ and SPLIT2017/), `voc` or `ade20k`."""
    root = Path(root)
    if kind == "coco":
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            raise FileNotFoundError(f"{root}: no annotations/instances_{split}.json (the COCO layout: "
                                    f"ROOT/annotations/instances_{split}.json beside ROOT/{split}/)")
        return coco_semantic(ann, root / split)
    if kind == "voc":
        return voc_semantic(root, split)
    if kind == "ade20k":
        return ade20k_semantic(root, split)
    raise ValueError(f"dataset must be coco, voc or ade20k, got {kind!r}")
