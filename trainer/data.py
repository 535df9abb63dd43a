"""Streaming training loader: webdataset shards -> boxes -> object-aware views -> uint8 batches.

    make_train_loader(cfg, patch_size, rank, world_size, start_step=0, state=None) -> TrainLoader
    augment_batch(batch, device, generator) -> (global views [2B,3,G,G], local views [L*B,3,Ls,Ls]) float, normalised

Per DataLoader worker: its shards (`stream_shards`: each pass over the shard set reads every shard once, split
between all ranks' workers) -> tar -> chunks of `data.shuffle_buffer` samples, each permuted -> decode -> boxes
(manifest join, else the shard's json, else the whole image) -> `odis.views.ViewMaker`. Workers send uint8 crops
and masks; photometric augmentation runs batched on the training device (`augment_batch`).

Batch layout (view-major: `flatten(0, 1)` gives iBOT's order view 0 of every image, then view 1, ...):
    global uint8 [2, B, 3, G, G], local uint8 [n_local, B, 3, L, L]   (channels-last strides; augment_batch
                                                                       returns contiguous floats)
    obj_mask bool [2, B, gh, gw], obj_valid bool [2, B], mim_mask bool [2, B, gh, gw], obj_box float32 [2, B, 4]
    label int64 [B] (-1 unknown), fallbacks int64 [B], bad int64 [B], has_box bool [B], key list[str]; worker
    (int), position (the worker's stream position after the batch, for TrainLoader's state).

Determinism: every random choice derives from (seed, rank, logical worker, sample number in that worker's
stream), so the stream depends only on the seed, world size, num_workers, shuffle_buffer and the shard list. The
DataLoader takes batches from its workers round-robin, so logical worker l makes batches l, l+W, l+2W, ... Resuming
at step k rotates the workers (physical worker p plays logical worker (p + k) % W) and each logical worker starts at
the position its last batch before k left it (TrainLoader.state_dict(), saved in the checkpoint): it opens that
shard, reads (without decoding) up to the chunk's first sample and the chunk again, so the batch stream from step
k equals the uninterrupted stream with its first k batches dropped, bad samples included. Without the saved
position each batch is assumed to have used exactly batch_size raw samples, and the worker reads its way there.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from odis.augment import GLOBAL1, GLOBAL2, LOCAL, photometric
from odis.views import ViewMaker

log = logging.getLogger("odis.data")

# cv2 single-threaded in this process too: DataLoader workers are forked, and a child that inherits a started cv2
# thread pool (from cv2 work in the parent, e.g. num_workers=0 runs or tools) deadlocks in its first cv2 call.
cv2.setNumThreads(1)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 64_000_000  # refuse larger images before decoding (decompression bombs); as odis.imageio
MAX_WARNINGS_PER_WORKER = 20
# A worker that meets this many unusable samples in a row stops with the last reason instead of spinning forever
# (wrong shard format, a bug); isolated bad samples are skipped and counted.
MAX_BAD_IN_A_ROW = 1000
STATE_VERSION = 2  # the data position in checkpoints: 2 = (chunk, index in it, shard of the worker, offset)


class BadSample(ValueError):
    """A sample that cannot be used; the message names its key and the reason. Counted, never fatal."""


# ---- the box join ----------------------------------------------------------------------------------------------

def id_hashes(ids) -> np.ndarray:
    """Stable 64-bit hashes of image ids (blake2b; the same in every process, unlike Python's hash())."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                        for s in ids), dtype=np.uint64, count=len(ids))


@dataclass
class BoxTable:
    """The boxes of a manifest by image_id, in flat arrays: 16 B per box + 24 B per image (+4 B per box score).

    keys: uint64 [n] sorted id hashes; offsets: int64 [n+1]; boxes: float32 [m,4] in the manifest's pixels;
    scores: float32 [m]; sizes: int32 [n,2] the manifest's (width, height) per image. An image listed with no
    box (detector found none, or an error row) has an empty range: it is trained with the whole image as its box.
    """

    keys: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    sizes: np.ndarray
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, path) -> "BoxTable":
        table = _read_manifest(path)
        ids = table.column("image_id").combine_chunks().dictionary_encode()
        uniq = ids.dictionary.to_pylist()
        row_img = ids.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        hashes = id_hashes(uniq)
        order_img = np.argsort(hashes, kind="stable")
        keys = hashes[order_img]
        if len(keys) > 1 and (np.diff(keys) == 0).any():
            i = int(np.nonzero(np.diff(keys) == 0)[0][0])
            raise ValueError(f"{path}: image ids {uniq[order_img[i]]!r} and {uniq[order_img[i + 1]]!r} share a "
                             "64-bit hash; rename one")
        rank_of_img = np.empty(len(uniq), np.int64)
        rank_of_img[order_img] = np.arange(len(uniq))
        xyxy = np.stack([_np(table, c).astype(np.float64) for c in ("x0", "y0", "x1", "y1")], axis=1)
        err = _np(table, "error", null=True)  # True: no error on this row
        has = ~np.isnan(xyxy).any(axis=1) & err
        good = has & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        sizes = np.zeros((len(uniq), 2), np.int32)
        w, h = _np(table, "width"), _np(table, "height")
        sizes[rank_of_img[row_img], 0] = w  # rows of one image agree on its size (manifest validation)
        sizes[rank_of_img[row_img], 1] = h
        rows = np.nonzero(good)[0]
        rows = rows[np.argsort(rank_of_img[row_img[rows]], kind="stable")]
        counts = np.bincount(rank_of_img[row_img[rows]], minlength=len(uniq))
        offsets = np.zeros(len(uniq) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        score = _np(table, "score")
        stats = {"manifest": str(path), "manifest_images": len(uniq), "manifest_boxes": int(len(rows)),
                 "manifest_images_without_box": int((counts == 0).sum()),
                 "manifest_error_rows": int((~err).sum()), "degenerate_boxes_dropped": int((has & ~good).sum())}
        return cls(keys, offsets, xyxy[rows].astype(np.float32), np.asarray(score, np.float32)[rows], sizes, stats)

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

    def lookup(self, image_id: str, width: float, height: float) -> np.ndarray | None:
        """Boxes [K,4] float32 scaled to an image stored at width x height; None when the id is not listed."""
        i = int(self._find(id_hashes([image_id]))[0])
        if i < 0:
            return None
        b = self.boxes[self.offsets[i]:self.offsets[i + 1]].astype(np.float64)
        mw, mh = self.sizes[i]
        if len(b) and mw > 0 and mh > 0:
            b = b * np.array([width / mw, height / mh, width / mw, height / mh])
        return b

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


def _np(table, name: str, null: bool = False) -> np.ndarray:
    """A column as numpy (nulls -> NaN for floats); with null=True, whether each value is null."""
    col = table.column(name).combine_chunks()
    if null:
        return col.is_null().to_numpy(zero_copy_only=False)
    return col.to_numpy(zero_copy_only=False)


def _read_manifest(path):
    from odis.manifest import read_manifest

    return read_manifest(path, columns=["image_id", "width", "height", "x0", "y0", "x1", "y1", "score", "error"])


# ---- decoding ---------------------------------------------------------------------------------------------------

def decode_image(data: bytes, name: str, max_reduction=None) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> (RGB uint8 HWC array, the stored (width, height) as displayed).

    The header is read first (PIL, no pixels) and images over MAX_PIXELS are refused before decoding. Plain
    JPEGs decode with cv2 (libjpeg-turbo straight into numpy, EXIF orientation applied; ~20% faster than PIL plus
    its array copy); anything else, or a JPEG without its end marker (truncated: PIL names the error), with PIL.
    JPEGs much larger than any crop needs decode at 1/2, 1/4 or 1/8 scale (PIL draft, DCT-domain scaling) when
    `max_reduction(width, height)` (ViewMaker's) allows it: every crop any view can draw is then still shrunk,
    never enlarged, so the views change only by the resampling filter, not in content or geometry.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadSample(f"{name}: empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # header only
    except UnidentifiedImageError:
        raise BadSample(f"{name}: not an image (format not recognised)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample(f"{name}: cannot read the image header ({e})") from None
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
        raise BadSample(f"{name}: refused, {w}x{h} image exceeds {MAX_PIXELS} pixels or is empty")
    r = max_reduction(w, h) if max_reduction is not None and img.format == "JPEG" else 1.0
    if img.format == "JPEG" and img.mode in ("RGB", "L") and r < 2 and data.rstrip(b"\0").endswith(b"\xff\xd9"):
        arr = _cv2_decode_rgb(data)
        if arr is not None:
            return arr, (arr.shape[1], arr.shape[0])
    return _decode_pil(img, name, r)


def _cv2_decode_rgb(data: bytes) -> np.ndarray | None:
    buf = np.frombuffer(data, np.uint8)
    if hasattr(cv2, "IMREAD_COLOR_RGB"):  # OpenCV >= 4.11 decodes straight to RGB
        return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    arr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return None if arr is None else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _decode_pil(img, name: str, reduction: float) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image, ImageOps

    w, h = img.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if reduction >= 2:
                img.draft("RGB", (math.ceil(w / reduction), math.ceil(h / reduction)))
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap width and height
                w, h = h, w
            ImageOps.exif_transpose(img, in_place=True)  # a no-op for odis shards (stored pixels are upright)
            if img.mode != "RGB":
                img = img.convert("RGB")
            arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample(f"{name}: cannot decode image ({e})") from None
    return arr, (w, h)


def _meta(raw: dict, key: str) -> dict:
    try:
        meta = json.loads(raw["json"])
    except KeyError:
        raise BadSample(f"{key}: no json in the sample (has {sorted(k for k in raw if not k.startswith('_'))})")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(f"{key}: bad json ({e})") from None
    if not isinstance(meta, dict):
        raise BadSample(f"{key}: json is not an object")
    return meta


def _json_boxes(meta: dict, key: str) -> np.ndarray:
    boxes = meta.get("boxes") or []
    try:
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
    except (ValueError, TypeError):
        raise BadSample(f"{key}: json 'boxes' is not a list of [x0, y0, x1, y1]") from None
    if not np.isfinite(b).all():
        raise BadSample(f"{key}: json 'boxes' has non-finite values")
    return b


# ---- the per-worker stream -------------------------------------------------------------------------------------

@dataclass
class StreamSpec:
    urls: list[str]
    views: ViewMaker
    boxes: BoxTable | None
    seed: int
    rank: int
    batch_size: int
    shuffle_buffer: int
    start_step: int = 0
    positions: list[list[int]] | None = None  # per logical worker, from TrainLoader.state_dict()
    draft: bool = True
    world_size: int = 1


def batches_before(step: int, worker: int, num_workers: int) -> int:
    """How many of the first `step` batches logical worker `worker` made (it makes batches w, w+W, ...)."""
    return len(range(worker, step, num_workers))


def stream_shards(n_shards: int, seed: int, stream: int, n_streams: int,
                  start: int = 0) -> Iterator[tuple[int, int, int]]:
    """(j, pass, shard) for j = start, start+1, ...: the j-th shard that stream `stream` of `n_streams` reads.

    The shard sequence of the whole run is S = perm_0 + perm_1 + ..., perm_p a permutation of the shards seeded by
    (seed, p), and stream g reads S[g], S[g + G], S[g + 2G], ... So every block of n_shards consecutive entries
    of S, read by all G streams together, is one pass that reads each shard exactly once (whatever n_shards and G),
    and a stream's j-th shard is known without reading anything: a resume starts at its shard directly.
    """
    perms: dict[int, np.ndarray] = {}
    j = start
    while True:
        p, i = divmod(stream + j * n_streams, n_shards)
        if p not in perms:
            perms.clear()  # passes are visited in order: keep one
            perms[p] = np.random.default_rng([seed, p]).permutation(n_shards)
        yield j, p, int(perms[p][i])
        j += 1


class TrainStream(IterableDataset):
    """Infinite stream of batches for one rank, assembled in place (each DataLoader worker runs its own copy).

    A worker reads its shards (`stream_shards`) in chunks of `shuffle_buffer` raw samples, each chunk permuted
    whole (seeded by its number), so its position is (chunk c, samples of it used i, the chunk's first sample
    as (j-th shard of the worker, offset in it)): a resume reads at most one shard up to that offset and
    one chunk again, without decoding. `odis shard` shuffles images before packing them, so a chunk of
    consecutive samples is already a random draw; the permutation only mixes neighbours of different shards.
    """

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        info = get_worker_info()
        phys, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (phys + s.start_step) % nw  # logical worker: batch k of the run comes from logical worker k % W
        counter = {"bad": 0, "warned": 0, "in_a_row": 0}
        size = max(1, s.shuffle_buffer)
        stream, n_streams = s.rank * nw + w, s.world_size * nw
        if s.positions is not None:  # exact: from the checkpoint
            c, i, j, off = (int(x) for x in s.positions[w])
            raw = self._raw(stream, n_streams, counter, w, j, off)
        else:  # no saved position: assume every batch before start_step used batch_size raw samples (clean data)
            c, i = divmod(batches_before(s.start_step, w, nw) * s.batch_size, size)
            # read (not decoded) up to chunk c: slow late in a run, which the saved position avoids
            raw = itertools.islice(self._raw(stream, n_streams, counter, w), c * size, None)
        reduction = s.views.max_reduction if s.draft else None
        batch = _Batch(s.views, s.batch_size, shared=info is not None)
        for c, i, start, sample in self._chunks(raw, size, c, i, [s.seed, s.rank, w]):
            n = c * size + i  # the sample's number in this worker's stream: its views' random seed
            try:
                out = self.process(sample, np.random.default_rng([s.seed, s.rank, w, n]), reduction, batch.slot())
            except Exception as e:  # noqa: BLE001 -- a bad sample must never kill the worker; it is counted
                if not isinstance(e, BadSample):
                    e = BadSample(f"{sample.get('__key__', '?')}: {type(e).__name__}: {e}")
                self._count(e, counter, w)
                continue
            batch.add(out, bad=counter["bad"])
            counter["bad"] = counter["in_a_row"] = 0
            if batch.full:
                yield batch.finish(worker=w, position=[c, i + 1, *start])
                batch = _Batch(s.views, s.batch_size, shared=info is not None)

    def _raw(self, stream: int, n_streams: int, counter: dict, w: int, j0: int = 0,
             skip: int = 0) -> Iterator[tuple[tuple[int, int], int, dict]]:
        """((j, offset), pass, raw sample) from the j0-th shard of this stream on, its first `skip` samples left
        out."""
        import webdataset as wds

        urls = self.spec.urls
        read = wds.tarfile_to_samples(handler=lambda e: self._count(e, counter, w))  # unreadable tars count too
        empty_in_a_row = 0
        for j, p, shard in stream_shards(len(urls), self.spec.seed, stream, n_streams, j0):
            n = -1
            for n, sample in enumerate(read([{"url": urls[shard]}])):
                if j > j0 or n >= skip:
                    yield (j, n), p, sample
            empty_in_a_row = empty_in_a_row + 1 if n < 0 else 0
            if empty_in_a_row > len(urls):  # a whole pass gave nothing (unreadable or empty tars)
                last = f"; last error: {counter['last']}" if "last" in counter else ""
                raise RuntimeError(f"data worker {w}: not one sample in a whole pass over the {len(urls)} "
                                   f"shard(s) {urls[0]} ...{last}. Check the shards (odis verify)")

    @staticmethod
    def _chunks(raw, size: int, c: int, i: int, seed: list[int]) -> Iterator[tuple[int, int, tuple[int, int], dict]]:
        """(chunk c, index i in it, the chunk's first raw position, sample), from chunk c's i-th sample on: chunks
        of `size` raw samples, each permuted whole by a generator seeded with (seed, c). A chunk never spans two
        passes over the shards (it ends early instead), so that a pass shows each image once."""
        item = next(raw)
        while True:
            chunk = [item]
            item = next(raw)
            while len(chunk) < size and item[1] == chunk[0][1]:  # (item[1]: the pass)
                chunk.append(item)
                item = next(raw)
            for k in np.random.default_rng([*seed, c]).permutation(len(chunk))[i:]:
                yield c, i, chunk[0][0], chunk[k][2]
                i += 1
            c, i = c + 1, 0

    def _count(self, exc: Exception, counter: dict, worker: int) -> bool:
        """Count a bad sample or an unreadable shard; stop the worker when nothing usable comes any more (the
        stream is endless: skipping forever would hang the run)."""
        counter["bad"] += 1
        counter["in_a_row"] += 1
        counter["last"] = exc
        if counter["in_a_row"] >= MAX_BAD_IN_A_ROW:
            raise RuntimeError(f"data worker {worker}: {MAX_BAD_IN_A_ROW} unusable samples in a row in "
                               f"{self.spec.urls[0]} ...; last: {exc}. Check the shards (odis verify --decode)")
        if counter["warned"] < MAX_WARNINGS_PER_WORKER:
            counter["warned"] += 1
            log.warning("data worker %d: skipped a bad sample: %s", worker, exc)
        return True  # webdataset handler protocol: continue

    def process(self, raw: dict, rng: np.random.Generator, reduction=None, out: dict | None = None) -> dict:
        """One raw sample -> its views (written into `out`'s buffers if given). Raises BadSample."""
        key = raw.get("__key__", "?")
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise BadSample(f"{key}: no image (jpg/png/webp) in the sample (has {sorted(raw)})")
        meta = _meta(raw, key)
        image, (sw, sh) = decode_image(raw[ext], f"{key}.{ext}", reduction)
        jw, jh = meta.get("width"), meta.get("height")
        if isinstance(jw, int) and isinstance(jh, int) and jw > 0 and jh > 0:
            if abs(jw / jh - sw / sh) > 0.02 * sw / sh:
                raise BadSample(f"{key}: json size {jw}x{jh} does not match the image's {sw}x{sh}")
            sw, sh = jw, jh  # boxes are in pixels of the stored image as the json describes it
        boxes = self.spec.boxes.lookup(key, sw, sh) if self.spec.boxes is not None else None
        if boxes is None:
            boxes = _json_boxes(meta, key)
        h, w = image.shape[:2]
        if len(boxes):
            boxes = boxes * np.array([w / sw, h / sh, w / sw, h / sh])  # to the decoded size (draft)
            boxes = np.clip(boxes, 0, [w, h, w, h])
            boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        views = self.spec.views(image, boxes, rng, out)
        del views["crops"]
        label = meta.get("label")
        views["label"] = label if isinstance(label, int) and not isinstance(label, bool) else -1
        views["key"] = key
        views["has_box"] = bool(len(boxes))
        return views


class _Batch:
    """A batch assembled in place: the views are rendered straight into its uint8 buffers, which live in shared
    memory inside a DataLoader worker, so the batch reaches the training process without another copy."""

    def __init__(self, vm: ViewMaker, size: int, shared: bool):
        g, ls, gh = vm.global_size, vm.local_size, vm.grid

        def buf(shape, dtype):
            t = torch.empty(shape, dtype=dtype)
            return t.share_memory_() if shared else t

        self.size, self.n = size, 0
        self.t_global = buf((2, size, g, g, 3), torch.uint8)
        self.t_local = buf((vm.n_local, size, ls, ls, 3), torch.uint8)
        self.np_global, self.np_local = self.t_global.numpy(), self.t_local.numpy()
        self.obj_mask = np.zeros((2, size, gh, gh), bool)
        self.obj_valid = np.zeros((2, size), bool)
        self.mim_mask = np.zeros((2, size, gh, gh), bool)
        self.obj_box = np.zeros((2, size, 4), np.float32)
        self.label = np.zeros(size, np.int64)
        self.fallbacks = np.zeros(size, np.int64)
        self.bad = np.zeros(size, np.int64)
        self.has_box = np.zeros(size, bool)
        self.keys: list[str] = []

    @property
    def full(self) -> bool:
        return self.n == self.size

    def slot(self) -> dict:
        return {"global": self.np_global[:, self.n], "local": self.np_local[:, self.n]}

    def add(self, v: dict, bad: int) -> None:
        i = self.n
        for name in ("obj_mask", "obj_valid", "mim_mask", "obj_box"):
            getattr(self, name)[:, i] = v[name]
        self.label[i], self.fallbacks[i], self.bad[i] = v["label"], v["fallbacks"], bad
        self.has_box[i] = v.get("has_box", True)
        self.keys.append(v["key"])
        self.n += 1

    def finish(self, worker: int, position: list[int]) -> dict:
        t = torch.from_numpy
        return {
            "global": self.t_global.permute(0, 1, 4, 2, 3),  # uint8 [2, B, 3, G, G] (channels-last strides)
            "local": self.t_local.permute(0, 1, 4, 2, 3),    # uint8 [n_local, B, 3, L, L] (channels-last strides)
            "obj_mask": t(self.obj_mask),                      # bool [2, B, gh, gw]
            "obj_valid": t(self.obj_valid),                    # bool [2, B]
            "mim_mask": t(self.mim_mask),                      # bool [2, B, gh, gw]
            "obj_box": t(self.obj_box),                        # float32 [2, B, 4] the box in each global view
            "label": t(self.label),                            # int64 [B], -1 unknown
            "fallbacks": t(self.fallbacks),                    # int64 [B] object-aware crop fallbacks (0..2)
            "bad": t(self.bad),                                # int64 [B] bad samples skipped just before each
            "has_box": t(self.has_box),                        # bool [B] False: no box, the whole image was used
            "key": self.keys,                                  # list[str] image ids
            "worker": worker,                                  # logical worker that made the batch
            "position": position,                              # that worker's stream position after it
        }


def collate(samples: list[dict]) -> dict:
    """Per-sample ViewMaker dicts (+ label, key) -> the batch layout (for tools and benchmarks; the loader
    assembles batches in place)."""
    b = _Batch.__new__(_Batch)
    b.size, b.n, b.keys = len(samples), 0, []
    b.t_global = torch.from_numpy(np.stack([s["global"].transpose(0, 2, 3, 1) for s in samples], axis=1))
    b.t_local = torch.from_numpy(np.stack([s["local"].transpose(0, 2, 3, 1) for s in samples], axis=1))
    gh = samples[0]["obj_mask"].shape[1:]
    b.obj_mask, b.mim_mask = np.zeros((2, len(samples)) + gh, bool), np.zeros((2, len(samples)) + gh, bool)
    b.obj_valid, b.obj_box = np.zeros((2, len(samples)), bool), np.zeros((2, len(samples), 4), np.float32)
    b.label, b.fallbacks, b.bad = (np.zeros(len(samples), np.int64) for _ in range(3))
    b.has_box = np.zeros(len(samples), bool)
    for s in samples:
        b.add(s, s.get("bad", 0))
    return b.finish(worker=samples[-1].get("worker", 0), position=samples[-1].get("position", [0, 0, 0, 0]))


# ---- the loader ------------------------------------------------------------------------------------------------

class TrainLoader:
    """Iterable over batches (infinite; count steps yourself). Attributes: steps_per_epoch, epoch_samples,
    box_report (rank 0; None elsewhere), stats (running totals: samples, bad_samples, crop_fallbacks, obj_invalid,
    whole_image_box = samples without any box, trained with the whole image as the object),
    state_dict() -> the data position to store in checkpoints (pass back as `state` to resume exactly)."""

    def __init__(self, loader: DataLoader, spec: StreamSpec, num_workers: int, steps_per_epoch: int,
                 epoch_samples: int, box_report: dict | None):
        self.loader, self.spec, self.num_workers = loader, spec, max(1, num_workers)
        self.steps_per_epoch, self.epoch_samples, self.box_report = steps_per_epoch, epoch_samples, box_report
        self.step = spec.start_step
        # None: a worker that has not made a batch since the start; a checkpoint then needs the start's position
        self.positions = list(spec.positions) if spec.positions is not None else \
            [[0, 0, 0, 0] if spec.start_step == 0 else None] * self.num_workers
        self.stats = {"samples": 0, "bad_samples": 0, "crop_fallbacks": 0, "obj_invalid": 0, "whole_image_box": 0}

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.step += 1
            self.positions[batch["worker"]] = batch["position"]
            self.stats["samples"] += len(batch["key"])
            self.stats["bad_samples"] += int(batch["bad"].sum())
            self.stats["crop_fallbacks"] += int(batch["fallbacks"].sum())
            self.stats["obj_invalid"] += int((~batch["obj_valid"]).sum())
            self.stats["whole_image_box"] += int((~batch["has_box"]).sum())
            yield batch

    def state_dict(self) -> dict:
        if None in self.positions:  # too few steps since a stateless start for every worker to have reported
            return {"step": self.step, "num_workers": self.num_workers, "seed": self.spec.seed}
        return {"version": STATE_VERSION, "step": self.step, "num_workers": self.num_workers,
                "seed": self.spec.seed, "positions": [list(map(int, p)) for p in self.positions],
                "shuffle_buffer": self.spec.shuffle_buffer, "shards": len(self.spec.urls)}


def _index_total(spec_str: str, urls: list[str]) -> int | None:
    """Samples in the shard set per its index.json (beside the spec or the first shard), None without one."""
    from odis.shards import INDEX_NAME, _is_remote, _local_path, read_index

    candidates = [spec_str] if not _is_remote(spec_str) else []
    if urls and not _is_remote(urls[0]):
        candidates.append(str(_local_path(urls[0]).parent / INDEX_NAME))
    for c in candidates:
        p = _local_path(c)
        if (p.is_dir() and (p / INDEX_NAME).is_file()) or (p.suffix == ".json" and p.is_file()):
            index = read_index(p)
            return int(index.get("num_samples") or sum(sh["count"] for sh in index["shards"]))
    return None


def make_train_loader(cfg, patch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0,
                      state: dict | None = None, pin_memory: bool | None = None) -> TrainLoader:
    """The training batches of `rank` (see the module docstring). `cfg` is trainer.config.Config."""
    from odis.shards import list_shards, shard_keys

    d = cfg.data
    if not d.shards:
        raise ValueError("data.shards is empty: give --shards (a folder, index.json, brace pattern or URL)")
    urls = list_shards(d.shards)
    if not urls:
        raise FileNotFoundError(f"{d.shards}: no shards")
    table = BoxTable.from_manifest(d.boxes) if d.boxes else None
    total = d.epoch_samples or _index_total(d.shards, urls)
    keys = None
    if (rank == 0 and table is not None) or not total:
        log.info("reading the sample keys of %d shard(s) from their tar headers", len(urls))
        keys = shard_keys(urls)
        total = total or (len(set(keys)) if keys is not None else None)
    report = None
    if table is not None and rank == 0:
        report = dict(table.stats, box_table_bytes=table.nbytes)
        if keys is not None:
            report.update(table.match(keys))
            _require_box_match(report, d, keys)
        else:
            report["shard_keys"] = "unknown (remote shards): shard/manifest overlap not counted"
        log.info("boxes: %s", report)
    if not total:
        raise ValueError(f"{d.shards}: cannot tell the number of images (no index.json); set data.epoch_samples")
    steps = max(1, total // (d.batch_size * world_size))
    nw = max(0, int(d.num_workers))
    spec = StreamSpec(urls, ViewMaker.from_config(d, patch_size, cfg.method), table, cfg.seed, rank,
                      d.batch_size, d.shuffle_buffer, start_step, world_size=world_size)
    if state is not None:
        spec.positions = _saved_positions(state, spec, max(1, nw))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and cfg.device != "cpu"
    # The stream yields whole batches (assembled in place in the worker): batch_size=None here.
    loader = DataLoader(TrainStream(spec), batch_size=None, num_workers=nw, pin_memory=pin_memory,
                        worker_init_fn=_worker_init, persistent_workers=False)
    return TrainLoader(loader, spec, nw, steps, total, report)


def _saved_positions(state: dict, spec: StreamSpec, num_workers: int) -> list[list[int]] | None:
    """The workers' positions saved in a checkpoint, if they continue this stream exactly; else None (with a
    warning: the resumed stream then assumes clean data and reads its way to the step)."""
    saved = {k: state.get(k) for k in ("version", "step", "num_workers", "seed", "shuffle_buffer", "shards")}
    now = {"version": STATE_VERSION, "step": spec.start_step, "num_workers": num_workers, "seed": spec.seed,
           "shuffle_buffer": spec.shuffle_buffer, "shards": len(spec.urls)}
    if saved == now and "positions" in state:
        return [[int(x) for x in p] for p in state["positions"]]
    # The stream is a function of (seed, rank, worker count, shards): another layout cannot continue it exactly.
    diff = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in now if saved[k] != now[k]) or "no worker positions"
    log.warning("the checkpoint's data position does not fit this run (%s): the resumed data stream will differ "
                "from the uninterrupted run's", diff)
    return None


def _require_box_match(report: dict, d, keys: list[str]) -> None:
    """Refuse a manifest that shares no id with the shards; warn when it covers less than half of them."""
    from odis.manifest import read_manifest
    from odis.shards import no_box_match_error

    matched = report["shard_images_with_manifest_boxes"] + report["shard_images_in_manifest_without_box"]
    if keys and not matched:
        ids = read_manifest(d.boxes, columns=["image_id"]).column("image_id")
        raise ValueError(no_box_match_error(d.shards, d.boxes, keys[0], str(ids[0]) if len(ids) else "(empty)"))
    if matched < report["shard_images"] / 2:
        log.warning("--boxes %s: only %d of %d shard images are in this manifest; the others use the boxes in "
                    "their shard json, else the whole image", d.boxes, matched, report["shard_images"])


def _worker_init(_):
    # The workers are the parallelism: cv2's and torch's own thread pools would oversubscribe the cores.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


# ---- on the device ---------------------------------------------------------------------------------------------

def augment_batch(batch: dict, device, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch's crops to `device` and apply the photometric augmentation with DINO's per-view probabilities.

    Returns (global [2B,3,G,G], local [n_local*B,3,Ls,Ls]) float32, ImageNet-normalised, view-major.
    `generator` is a CPU torch.Generator (parameters are drawn on the CPU; see odis.augment).
    """
    g = batch["global"].to(device, non_blocking=True)
    glob = photometric(g.flatten(0, 1), [(g.shape[1], GLOBAL1), (g.shape[1], GLOBAL2)], generator)
    loc = batch["local"].to(device, non_blocking=True).flatten(0, 1)
    return glob.contiguous(), photometric(loc, LOCAL, generator).contiguous()
