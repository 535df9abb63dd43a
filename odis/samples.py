"""A shard sample as training and evaluation read it: key, RGB image, boxes in its pixels, label, box source.

    read_sample(raw, table=None, reduction=None) -> Sample     (raises BadSample naming the key)
    BoxTable.from_manifest(path)                               the manifest join, by image id

The one rule for boxes: given a manifest, it is the only box source (an image it does not list has no box, and is
counted as `not_in_manifest`); without one, the boxes in the sample's json. No box means the whole image.
Boxes are checked and counted by odis.boxes.account_boxes, wherever they come from.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from odis.boxes import account_boxes
from odis.imageio import ImageDecodeError, decode_rgb
from odis.names import sample_key_problem
from odis.shards import IMAGE_EXTS

log = logging.getLogger("odis.samples")

SOURCES = ("manifest", "not_in_manifest", "json")


class BadSample(ValueError):
    """A sample that cannot be used; the message names its key and the reason. Counted, never fatal. `count`:
    how many samples it stands for (the samples a truncated tar lost)."""

    def __init__(self, message: str, count: int = 1):
        super().__init__(message)
        self.count = count


@dataclass
class Sample:
    key: str              # the tar key, which is the image id (the shard contract)
    image: np.ndarray     # uint8 [H, W, 3] RGB, upright (maybe decoded at a reduced size: `reduction`)
    boxes: np.ndarray     # float64 [K, 4] x0 y0 x1 y1 in `image`'s pixels, inside it, non-empty
    scores: np.ndarray    # float64 [K]
    label: int            # -1: unknown
    source: str           # one of SOURCES
    clipped: int = 0      # boxes clipped to the image
    dropped: int = 0      # boxes dropped (not finite, or empty once clipped)
    meta: dict = field(default_factory=dict)


def read_sample(raw: dict, table: "BoxTable | None" = None, reduction=None) -> Sample:
    """One raw webdataset sample -> Sample. `reduction`: decode a large JPEG at 1/2, 1/4 or 1/8 of its size when
    it stays above this (width, height) (odis.imageio.decode_rgb)."""
    key = raw.get("__key__", "?")
    problem = sample_key_problem(key)
    if problem:  # a tar member named `../x.jpg`, `/abs/x.jpg` or `a/b.jpg`: not a sample of the contract
        raise BadSample(f"{raw.get('__url__', '?')}: {problem}")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise BadSample(f"{key}: no image ({'/'.join(IMAGE_EXTS)}) in the sample (has {sorted(raw)})")
    meta = read_meta(raw, key)
    try:
        image, (sw, sh) = decode_rgb(raw[ext], name=f"{key}.{ext}", max_reduction=reduction)
    except ImageDecodeError as e:
        raise BadSample(str(e)) from None
    jw, jh = meta.get("width"), meta.get("height")
    if isinstance(jw, int) and isinstance(jh, int) and jw > 0 and jh > 0:
        if abs(jw / jh - sw / sh) > 0.02 * sw / sh:
            raise BadSample(f"{key}: json size {jw}x{jh} does not match the image's {sw}x{sh}")
        sw, sh = jw, jh  # boxes are in pixels of the stored image as the json describes it
    boxes, scores, source, counts = sample_boxes(table, key, meta, sw, sh)
    h, w = image.shape[:2]
    if len(boxes):  # to the decoded size (a reduced decode), clipped, empty ones left out
        boxes = np.clip(boxes * np.array([w / sw, h / sh, w / sw, h / sh]), 0, [w, h, w, h])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[keep], scores[keep]
    label = meta.get("label")
    label = label if isinstance(label, int) and not isinstance(label, bool) else -1
    return Sample(key, image, boxes, scores, label, source, counts.get("clipped", 0),
                  counts.get("dropped_not_finite", 0) + counts.get("dropped_empty", 0), meta)


def read_meta(raw: dict, key: str) -> dict:
    try:
        meta = json.loads(raw["json"])
    except KeyError:
        raise BadSample(f"{key}: no json in the sample (has {sorted(k for k in raw if not k.startswith('_'))})")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(f"{key}: bad json ({e})") from None
    if not isinstance(meta, dict):
        raise BadSample(f"{key}: json is not an object")
    return meta


def sample_boxes(table: "BoxTable | None", image_id: str, meta: dict, width: float,
                 height: float) -> tuple[np.ndarray, np.ndarray, str, dict]:
    """(boxes [K,4] in pixels of a width x height image, scores [K], source, counts) by the module's rule."""
    if table is not None:
        found = table.lookup(image_id, width, height, with_scores=True)
        if found is None:
            return np.zeros((0, 4)), np.zeros(0), "not_in_manifest", {}
        return found[0], found[1], "manifest", {}
    try:
        raw = np.asarray(meta.get("boxes") or [], np.float64).reshape(-1, 4)
    except (ValueError, TypeError):
        raise BadSample(f"{image_id}: json 'boxes' is not a list of [x0, y0, x1, y1]") from None
    scores = meta.get("scores")
    scores = np.asarray(scores if isinstance(scores, list) and len(scores) == len(raw) else [1.0] * len(raw),
                        np.float64)
    boxes, used, _, counts = account_boxes(raw, width, height)  # checked and counted as a manifest's are
    return boxes[used], scores[used], "json", counts


def id_hashes(ids) -> np.ndarray:
    """Stable 64-bit hashes of image ids (blake2b; the same in every process, unlike Python's hash())."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                        for s in ids), dtype=np.uint64, count=len(ids))


@dataclass
class BoxTable:
    """The boxes of a manifest by image_id, in flat arrays: 16 B per box + 24 B per image (+4 B per box score).

    keys: uint64 [n] sorted id hashes; offsets: int64 [n+1]; boxes: float32 [m,4] in the manifest's pixels;
    scores: float32 [m]; sizes: int32 [n,2] the manifest's (width, height) per image. An image listed with no
    box (detector found none, or an error row) has an empty range: it is used with the whole image as its box.
    """

    keys: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    sizes: np.ndarray
    stats: dict = field(default_factory=dict)
    path: str = ""

    @classmethod
    def from_manifest(cls, path) -> "BoxTable":
        """The used boxes of a manifest (odis.manifest_boxes: ids checked, every row accounted for in `stats`)."""
        from odis.manifest_boxes import read_box_rows

        r = read_box_rows(path)
        table = cls._assemble(r.image_id, r.width, r.height, r.used, r.boxes, r.score, str(path))
        table.stats["manifest_error_rows"] = r.counts["error_rows"]
        table.stats["manifest_rows"] = r.counts
        return table

    @classmethod
    def from_images(cls, images: dict, name: str = "(in memory)") -> "BoxTable":
        """A table from {image_id: (width, height, boxes [K,4], scores [K])}: boxes made by odis itself."""
        ids, w, h, used, boxes, scores = [], [], [], [], [], []
        for iid, (width, height, b, sc) in images.items():
            b = np.asarray(b, np.float64).reshape(-1, 4)
            n = max(1, len(b))  # an image without a box keeps one unused row
            ids += [iid] * n
            w += [width] * n
            h += [height] * n
            used += [True] * len(b) or [False]
            boxes.append(b if len(b) else np.zeros((1, 4)))
            scores.append(np.asarray(sc, np.float64).reshape(-1) if len(b) else np.zeros(1))
        cat = (lambda a: np.concatenate(a)) if images else (lambda a: np.zeros((0, 4)))
        return cls._assemble(ids, np.asarray(w), np.asarray(h), np.asarray(used, bool), cat(boxes),
                             np.concatenate(scores) if images else np.zeros(0), name)

    @classmethod
    def _assemble(cls, row_ids, widths, heights, used, boxes, scores, path: str) -> "BoxTable":
        """Rows (one per box, or one unused row for an image without a box) -> the sorted flat arrays."""
        uniq, row_img = np.unique(np.asarray(row_ids, dtype=object), return_inverse=True)
        uniq = uniq.tolist()
        hashes = id_hashes(uniq)
        order_img = np.argsort(hashes, kind="stable")
        keys = hashes[order_img]
        if len(keys) > 1 and (np.diff(keys) == 0).any():
            i = int(np.nonzero(np.diff(keys) == 0)[0][0])
            raise ValueError(f"{path}: image ids {uniq[order_img[i]]!r} and {uniq[order_img[i + 1]]!r} share a "
                             "64-bit hash; rename one")
        rank_of_img = np.empty(len(uniq), np.int64)
        rank_of_img[order_img] = np.arange(len(uniq))
        sizes = np.zeros((len(uniq), 2), np.int32)
        sizes[rank_of_img[row_img], 0] = widths  # rows of one image agree on its size (checked on reading)
        sizes[rank_of_img[row_img], 1] = heights
        rows = np.nonzero(used)[0]
        rows = rows[np.argsort(rank_of_img[row_img[rows]], kind="stable")]
        counts = np.bincount(rank_of_img[row_img[rows]], minlength=len(uniq))
        offsets = np.zeros(len(uniq) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        stats = {"manifest": path, "manifest_images": len(uniq), "manifest_boxes": int(len(rows)),
                 "manifest_images_without_box": int((counts == 0).sum())}
        return cls(keys, offsets, np.asarray(boxes)[rows].astype(np.float32),
                   np.asarray(scores)[rows].astype(np.float32), sizes, stats, path)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.offsets, self.boxes, self.scores, self.sizes))

    def _find(self, hashes: np.ndarray) -> np.ndarray:
        """Row of each hash in the table, -1 where absent."""
        i = np.searchsorted(self.keys, hashes)
        i = np.minimum(i, max(len(self.keys) - 1, 0))
        hit = (self.keys[i] == hashes) if len(self.keys) else np.zeros(len(hashes), bool)
        return np.where(hit, i, -1)

    def lookup(self, image_id: str, width: float, height: float, with_scores: bool = False):
        """Boxes [K,4] float64 scaled to an image stored at width x height (and their scores [K] with
        `with_scores`); None when the id is not listed."""
        i = int(self._find(id_hashes([image_id]))[0])
        if i < 0:
            return None
        lo, hi = self.offsets[i], self.offsets[i + 1]
        b = self.boxes[lo:hi].astype(np.float64)
        mw, mh = self.sizes[i]
        if len(b) and mw > 0 and mh > 0:
            b = b * np.array([width / mw, height / mh, width / mw, height / mh])
        return (b, self.scores[lo:hi].astype(np.float64)) if with_scores else b

    def match(self, shard_keys) -> dict:
        """Counts of the join against the shards' keys (`shard_keys` may hold duplicates)."""
        h = np.unique(id_hashes(list(shard_keys)))
        row = self._find(h)
        found = row >= 0
        nbox = np.zeros(len(h), np.int64)
        nbox[found] = self.offsets[row[found] + 1] - self.offsets[row[found]]
        return {"shard_images": int(len(h)),
                "shard_images_with_manifest_boxes": int((nbox > 0).sum()),
                "shard_images_in_manifest_without_box": int((found & (nbox == 0)).sum()),
                "shard_images_not_in_manifest": int((~found).sum()),
                "manifest_ids_not_in_shards": int(len(self.keys) - found.sum())}

    def check_match(self, shards: str, keys: list[str]) -> dict:
        """The join's counts against the shards' keys; refuses a manifest that shares no id with the shards, warns
        when it lists less than half of their images (the others are used whole)."""
        from odis.manifest import read_manifest
        from odis.shards import no_box_match_error

        report = self.match(keys)
        matched = report["shard_images_with_manifest_boxes"] + report["shard_images_in_manifest_without_box"]
        if keys and not matched:
            ids = read_manifest(self.path, columns=["image_id"]).column("image_id")
            raise ValueError(no_box_match_error(shards, self.path, keys[0], str(ids[0]) if len(ids) else "(empty)"))
        if matched < report["shard_images"] / 2:
            log.warning("--boxes %s: only %d of %d shard images are in this manifest; the others are used whole "
                        "(no box)", self.path, matched, report["shard_images"])
        return report
