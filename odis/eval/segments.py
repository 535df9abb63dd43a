"""Segmentation masks instead of boxes for the [OBJ] token at evaluation (`--boxes-mode mask --masks COCO_JSON`,
the paper's Table 5 "Use Masks"): the selected box takes the segmentation of the COCO annotation that matches it,
carried into the evaluation view and reduced to patches by the box rule (a patch is in when any pixel is)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odis.boxes import Crop, box_iou, box_to_patch_mask, scale_boxes
from odis.image_ids import coco_image_id

MASK_IOU = 0.5  # the selected box takes the segmentation of the annotation whose box overlaps it best, from this IoU
# Counts of a `--masks` run (mode `mask`): images whose OBJ mask is a segmentation, images that used their box mask
# instead, and why: the image is not in the annotation file (by key), its size there has another aspect than the
# stored image (not the same picture), no annotation's box matches the selected box, the matching annotation has no
# (or an empty) segmentation, or the centre crop cuts the segmentation away while keeping some of the box.
MASK_REASONS = ("mask_not_in_annotations", "mask_size_mismatch", "mask_no_matching_annotation",
                "mask_no_segmentation", "mask_segmentation_cropped_away")
MASK_COUNTS = ("mask_segmentation", "mask_fallback_box") + MASK_REASONS


def decode_segmentation(segm, width: int, height: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE with a list of counts, e.g. crowds, or compressed RLE) as bool [height,
    width], by pycocotools as `COCO.annToMask` does. The segmentation must have been checked (odis.importers)."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(bool)


def mask_to_view(mask: np.ndarray, crop: Crop, width: float, height: float) -> np.ndarray:
    """A pixel mask of a width x height image (the mask at any resolution: it is scaled to the image) carried into
    the view `crop` describes: bool [out_h, out_w], nearest, sampled at the view's pixel centres. For `eval_crop`
    this is a nearest Resize (PIL's rule: pixel centres) + CenterCrop of a mask at the image's own size (up to a
    row or column where a centre falls exactly on a pixel edge, a float tie), and a mask at another size (an
    annotation of the full-size image, the stored image resized) is sampled once rather than resized twice."""
    m = np.asarray(mask, bool)
    mh, mw = m.shape
    xs = crop.left + (np.arange(crop.out_w) + 0.5) * (crop.width / crop.out_w)   # image pixels
    ys = crop.top + (np.arange(crop.out_h) + 0.5) * (crop.height / crop.out_h)
    cols = np.clip(np.floor(xs * (mw / width)).astype(np.int64), 0, mw - 1)
    rows = np.clip(np.floor(ys * (mh / height)).astype(np.int64), 0, mh - 1)
    inside = ((xs >= 0) & (xs < width))[None, :] & ((ys >= 0) & (ys < height))[:, None]
    view = m[rows[:, None], cols[None, :]] & inside
    return view[:, ::-1] if crop.flip else view


def pixels_to_patch_mask(mask: np.ndarray, patch: int) -> np.ndarray:
    """bool [H // patch, W // patch]: a patch is in when any of its pixels is (the rule box_to_patch_mask uses)."""
    m = np.asarray(mask, bool)
    gh, gw = m.shape[0] // patch, m.shape[1] // patch
    return m[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch).any(axis=(1, 3))


@dataclass
class SegmentTable:
    """The instance segmentations of a COCO JSON by shard key (`odis.image_ids.coco_image_id`): key -> (width, height of the annotated
    image, boxes [n, 4] x0 y0 x1 y1 in its pixels, segmentations [n], None where an annotation has none)."""

    images: dict
    path: str = ""

    @classmethod
    def from_coco(cls, path) -> "SegmentTable":
        """Every image and annotation checked up front (odis.importers.load_coco, as the dense evaluation reads
        COCO: polygons and RLE against their image, since pycocotools trusts them); a file that is not a readable
        instances JSON is a ValueError naming it and the entry."""
        from odis.eval.segdata import _mask_image_problem
        from odis.importers import check_coco_section, load_coco

        data = load_coco(Path(path), from_segmentation=True)
        check_coco_section(Path(path), data, "images", _mask_image_problem)
        anns: dict[int, list] = {img["id"]: [] for img in data["images"]}
        for a in data["annotations"]:
            if a["image_id"] in anns:
                anns[a["image_id"]].append(a)
        images = {}
        for img in data["images"]:
            w, h = int(img["width"]), int(img["height"])
            boxes, segms = [], []
            for a in anns[img["id"]]:
                segm = a.get("segmentation") or None
                if "bbox" in a:
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                elif segm is not None:  # no bbox (allowed with segmentations): the mask's own
                    ys, xs = np.nonzero(decode_segmentation(segm, w, h))
                    if not len(xs):
                        continue
                    x, y, bw, bh = xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
                else:
                    continue
                boxes.append([x, y, x + bw, y + bh])
                segms.append(segm)
            images[coco_image_id(img["id"])] = (w, h, np.asarray(boxes, np.float64).reshape(-1, 4), segms)
        return cls(images, str(path))

    def subset(self, keys) -> "SegmentTable":
        """Only the images of these keys (what a shard set holds: less to hand to each loader worker)."""
        return SegmentTable({k: self.images[k] for k in set(keys) if k in self.images}, self.path)

    def check_match(self, shards: str, keys: list[str]) -> int:
        """How many of the shards' keys are in the annotation file; refuses a file that shares none with them."""
        found = len({k for k in keys if k in self.images})
        if keys and not found:
            from odis.shards import read_index

            try:
                scheme = read_index(shards).get("id_scheme") or "?"
            except (OSError, ValueError):
                scheme = "?"
            example = next(iter(self.images), "(no images)")
            raise ValueError(f"--masks {self.path}: none of the shards' image ids is in this annotation file "
                             f"(shards {shards}: id scheme {scheme}, e.g. {keys[0]!r}; the file's images are "
                             f"keyed by their COCO id, e.g. {example!r}). Shard the COCO images with "
                             "--id-scheme coco (the default of odis shard --labels coco).")
        return found

    def patch_mask(self, key: str, width: int, height: int, boxes: np.ndarray, selected: np.ndarray,
                   how: str, crop: Crop, patch: int) -> tuple[np.ndarray | None, str]:
        """(the OBJ patch mask [out_h // patch, out_w // patch] of the segmentation, "segmentation") for the image
        `key` decoded at width x height, its boxes and the `selected` one (`how`: box_select), in the view `crop`;
        (None, one of MASK_REASONS) when the box mask stays. The selected box takes the segmentation of the
        annotation whose box (scaled to the stored image) has the highest IoU with it, at least MASK_IOU; the
        mask is kept to that annotation's box. `union`: the union over every box of its segmentation, or of the
        box itself for a box no annotation matches (at least one segmentation, else the box mask)."""
        entry = self.images.get(key)
        if entry is None:
            return None, "mask_not_in_annotations"
        aw, ah, aboxes, segms = entry
        if abs(aw / ah - width / height) > 0.02 * width / height:
            return None, "mask_size_mismatch"
        size_h, size_w = crop.out_h, crop.out_w
        ab = scale_boxes(aboxes, width / aw, height / ah)
        targets = np.asarray(boxes, np.float64).reshape(-1, 4) if how == "union" else [selected]
        out = np.zeros((size_h // patch, size_w // patch), bool)
        used, reason = False, "mask_no_matching_annotation"
        for t in targets:
            iou = box_iou(np.asarray(t)[None], ab)[0] if len(ab) else np.zeros(0)
            i = int(np.argmax(iou)) if len(iou) else -1
            pm = None
            if i < 0 or iou[i] < MASK_IOU:
                reason = "mask_no_matching_annotation"
            elif segms[i] is None:
                reason = "mask_no_segmentation"
            else:
                m = decode_segmentation(segms[i], aw, ah)
                if not m.any():
                    reason = "mask_no_segmentation"
                else:
                    pm = (pixels_to_patch_mask(mask_to_view(m, crop, width, height), patch)
                          & box_to_patch_mask(crop.apply(ab[i]), size_h, size_w, patch))
                    if not pm.any():
                        pm, reason = None, "mask_segmentation_cropped_away"
            if pm is not None:
                out |= pm
                used = True
            elif how == "union":
                out |= box_to_patch_mask(crop.apply(t), size_h, size_w, patch)
        return (out, "segmentation") if used else (None, reason)
