"""The plan: which file goes into which shard, fixed before anything is written.

Files are shuffled with the seed and cut into shards by sample count and by a size *estimated from the source
file sizes*, so the plan depends only on the file list, the seed and the settings, never on timing or on which
worker ran first. That is what makes a resumed run byte-identical to an uninterrupted one; the plan's fingerprint
is what a rerun compares to refuse mixing shard sets.
"""
from __future__ import annotations

import hashlib
import json
import random
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from odis.manifest import sha256_of
from odis.pipelines.shard.labels import id_scheme, image_ids, labels_for, manifest_boxes
from odis.pipelines.shard.scan import scan_images
from odis.pipelines.shard.settings import Item, ShardError, ShardSettings


@dataclass
class Plan:
    settings: ShardSettings
    shards: list[list[Item]]
    classes: list[str] | None
    id_scheme: str
    inputs: dict                      # sha256 of the manifest / coco json
    ignored: list[str]                # files under the root that are not images (by extension)
    warnings: list[dict] = field(default_factory=list)
    fingerprint: str = ""
    box_counts: dict | None = None    # the manifest's row accounting (odis.manifest_boxes), None without one


def build_plan(s: ShardSettings) -> Plan:
    """Scan the images root, give every file its key, label and boxes, shuffle with the seed, cut into shards."""
    root = Path(s.images)
    if not root.is_dir():
        raise ShardError(f"--images {root}: not a folder")
    scan = scan_images(s.images)
    if not scan.images:
        raise ShardError(f"--images {root}: no image files (jpg/jpeg/png/webp/bmp/tif/gif) found")
    relpaths = [r for r, _ in scan.images]
    scheme, by_manifest = id_scheme(s)
    ids = image_ids(relpaths, scheme, s.manifest if by_manifest else None)
    labels, classes, warnings = labels_for(s, relpaths)
    boxes, inputs, box_warnings, box_counts = manifest_boxes(s, dict(zip(ids, relpaths)))
    # Item(relpath, image_id, size, label, boxes, scores, manifest (w, h)), built without NamedTuple's Python-level
    # __new__ (the largest cost of planning a set of small images)
    items = [_new_item(Item, (r, i, size, labels.get(r), *boxes.get(i, _NO_BOXES)))
             for (r, size), i in zip(scan.images, ids)]
    random.Random(s.seed).shuffle(items)
    plan = Plan(s, split_items(items, s.max_samples, s.max_size), classes, scheme, inputs, scan.others,
                scan.warnings + warnings + box_warnings, box_counts=box_counts)
    if s.coco_json:
        plan.inputs["coco_json_sha256"] = sha256_of(s.coco_json)
    plan.fingerprint = _fingerprint(plan)
    return plan


_new_item = tuple.__new__
_NO_BOXES = ((), (), None)  # an image the manifest does not list: no boxes, no scores, no manifest size


def estimated_bytes(item: Item) -> int:
    """Tar bytes of a sample as planned: two 512-byte headers, the image and its json, padded to 512."""
    return _estimates([item])[0]


def _estimates(items: list[Item]) -> list[int]:
    """estimated_bytes of each item, in one comprehension (a function call per item is the cost here)."""
    return [1024 + -(-it.size // 512) * 512 + -(-(160 + len(it.image_id) + 60 * len(it.boxes)) // 512) * 512
            for it in items]


def split_items(items: list[Item], max_samples: int | None, max_size: int | None) -> list[list[Item]]:
    """Cut the shuffled items into consecutive shards, greedily: a shard closes when it holds max_samples items or
    the next item would take it over max_size bytes; it holds at least one item even if that is larger.

    The cuts are found by bisection on the running byte total, not by a loop over the items (a Python step per file)."""
    if not max_size:
        step = max_samples or len(items) or 1
        return [items[i:i + step] for i in range(0, len(items), step)]
    ends = list(accumulate(_estimates(items), initial=0))  # ends[k]: bytes of items[:k]
    shards, i = [], 0
    while i < len(items):
        j = max(i + 1, bisect_right(ends, ends[i] + max_size) - 1)  # items[i:j] fit, items[i:j+1] would not
        if max_samples:
            j = min(j, i + max_samples)
        shards.append(items[i:j])
        i = j
    return shards


def _fingerprint(plan: Plan) -> str:
    """SHA-256 of what decides the shards' bytes: settings, key rule, inputs, and each shard's files and sizes.

    The file lists are hashed as NUL-joined paths plus packed sizes, not as json (which is a
    large share of `odis shard`'s cost on small images)."""
    head = {"settings": plan.settings.output_settings(), "id_scheme": plan.id_scheme, "inputs": plan.inputs}
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for shard in plan.shards:
        h.update(b"\1" + "\0".join([it.relpath for it in shard]).encode("utf-8", "surrogateescape"))
        h.update(b"\2" + array("q", [it.size for it in shard]).tobytes())
    return h.hexdigest()
