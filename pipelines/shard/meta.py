"""The json member of a sample: label, stored size, and the manifest's boxes in the stored image's pixels."""
from __future__ import annotations

import json

import numpy as np

from odis.boxes import clip_boxes
from odis.pipelines.shard.image import Prepared
from odis.pipelines.shard.settings import Item


def sample_meta(item: Item, p: Prepared) -> tuple[dict, str | None]:
    """The sample json; boxes go from the manifest's pixel frame to the stored image's. Returns (meta, warning)."""
    boxes, scores, warning = [], [], None
    if item.boxes and item.manifest_wh != (p.src_width, p.src_height):
        warning = (f"manifest size {item.manifest_wh[0]}x{item.manifest_wh[1]} differs from the image's "
                   f"{p.src_width}x{p.src_height}: its {len(item.boxes)} box(es) left out")
    elif item.boxes and (p.width, p.height) == (p.src_width, p.src_height):
        boxes, scores = [list(b) for b in item.boxes], list(item.scores)  # not resized: the manifest's values
    elif item.boxes:
        # x * new / old (not x * (new / old)): exact at the borders, so x1 == width stays == new width.
        fx, fy = (p.width, p.src_width), (p.height, p.src_height)
        boxes = [[b[0] * fx[0] / fx[1], b[1] * fy[0] / fy[1], b[2] * fx[0] / fx[1], b[3] * fy[0] / fy[1]]
                 for b in item.boxes]
        scores = list(item.scores)
    if any(b[0] < 0 or b[1] < 0 or b[2] > p.width or b[3] > p.height for b in boxes):
        # float32 rounding in a manifest can put an edge a hair outside the image: clip, keep non-empty boxes.
        # Beyond a pixel it is a wrong box, clipped too but said (the index lists it with the path).
        far = [b for b in boxes if min(b[0], b[1], p.width - b[2], p.height - b[3]) < -1]
        if far:
            warning = (f"{len(far)} box(es) outside the {p.width}x{p.height} image, e.g. "
                       f"{[round(v, 1) for v in far[0]]}: clipped to it")
        clipped = clip_boxes(np.asarray(boxes, dtype=np.float64), p.width, p.height).tolist()
        keep = [i for i, b in enumerate(clipped) if b[2] > b[0] and b[3] > b[1]]
        boxes, scores = [clipped[i] for i in keep], [scores[i] for i in keep]
    meta = {"image_id": item.image_id, "label": item.label, "width": p.width, "height": p.height,
            "boxes": boxes, "scores": scores}
    return meta, warning



_ENCODE_STR = json.encoder.encode_basestring_ascii  # what json.dumps uses for strings (C, ensure_ascii)
_JSON = '{"boxes": %s, "height": %d, "image_id": %s, "label": %s, "scores": %s, "width": %d}'


def encode_meta(meta: dict) -> bytes:
    """json.dumps(meta, sort_keys=True).encode(), byte for byte, for the dicts sample_meta builds.

    Why not json.dumps: on small images (Tiny-ImageNet's 2 KB files) it is a large share of the per-image cost.
    The keys are fixed, so the template holds them in sorted order; lists go through json.dumps
    only when not empty (most samples have no box)."""
    label = meta["label"]
    if type(label) is not int and label is not None:  # bool, numpy ints, ...: let json decide
        return json.dumps(meta, sort_keys=True).encode()
    boxes, scores = meta["boxes"], meta["scores"]
    return (_JSON % (json.dumps(boxes) if boxes else "[]", meta["height"], _ENCODE_STR(meta["image_id"]),
                     "null" if label is None else label, json.dumps(scores) if scores else "[]",
                     meta["width"])).encode()
