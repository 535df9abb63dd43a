"""The per-worker stream of training batches: which samples each DataLoader worker reads, in what order, and
how they become one batch assembled in place.

Per DataLoader worker: its range of each pass over the shards (`PassPlan`: an epoch shows each image at most once,
split between all ranks' workers) -> tar (entered by a seek) -> chunks of `data.shuffle_buffer` samples, each
permuted -> `odis.samples.read_sample` (decode, boxes by its one rule) -> `odis.views.ViewMaker`.
Workers send uint8 crops and masks; photometric augmentation runs batched on the training device (odis.augment.augment_batch).

Batch layout (view-major: `flatten(0, 1)` gives iBOT's order view 0 of every image, then view 1, ...):
    global uint8 [2, B, 3, G, G], local uint8 [n_local, B, 3, L, L]   (channels-last strides; augment_batch
                                                                       returns contiguous floats)
    obj_mask bool [2, B, gh, gw], obj_valid bool [2, B], mim_mask bool [2, B, gh, gw], obj_box float32 [2, B, 4]
    label int64 [B] (-1 unknown), fallbacks int64 [B], bad int64 [B], has_box bool [B], key list[str]; worker
    (int), position (the worker's stream position after the batch, for TrainLoader's state).

Determinism: every random choice derives from (seed, rank, logical worker, pass, chunk, index in the chunk), so
the stream depends only on the seed, world size, num_workers, batch size, shuffle_buffer and the shards. The
DataLoader takes batches from its workers round-robin, so logical worker l makes batches l, l+W, l+2W, ... Resuming
at step k rotates the workers (physical worker p plays logical worker (p + k) % W) and each logical worker starts at
the position its last batch before k left it (TrainLoader.state_dict(), saved in the checkpoint): it seeks to that
chunk's first sample, reads the chunk again (without decoding what was used), so the batch stream from step k
equals the uninterrupted stream with its first k batches dropped, bad samples included. Without a saved position
(another number of processes or workers) each worker starts where it would be had no sample been bad: computed,
not read, and exact on clean data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from odis.samples import BadSample, BoxTable, read_sample
from odis.views import ViewMaker

log = logging.getLogger("odis.data")

# cv2 single-threaded in this process too: DataLoader workers are forked, and a child that inherits a started cv2
# thread pool (from cv2 work in the parent, e.g. num_workers=0 runs or tools) deadlocks in its first cv2 call.
cv2.setNumThreads(1)

MAX_WARNINGS_PER_WORKER = 20
# A worker that meets this many unusable samples in a row stops with the last reason instead of spinning forever
# (wrong shard format, a bug); isolated bad samples are skipped and counted.
MAX_BAD_IN_A_ROW = 1000


@dataclass
class PassPlan:
    """Which samples each stream reads in each pass over the shards; a pass is an epoch of the schedules.

    Pass p lays the shards end to end in a seeded order (their samples in file order) and cuts that sequence into
    contiguous ranges, one per (rank, logical worker) stream, each as long as the samples the stream uses in epoch
    p: batch_size x the batches that worker makes in that epoch (it makes batches w, w+W, ...). So one epoch shows
    each image at most once, and exactly world x steps_per_epoch x batch_size of them when no sample is bad; a
    stream's position is (pass, index in its range), computable without reading anything.
    """

    counts: np.ndarray  # samples per shard: index.json's, else the tar headers'
    seed: int
    batch_size: int
    num_workers: int  # logical workers per rank (>= 1)
    world_size: int
    steps_per_epoch: int

    def __post_init__(self):
        self.counts = np.asarray(self.counts, np.int64)
        self.total = int(self.counts.sum())
        self.nonempty = int((self.counts > 0).sum())
        self._layout_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def quota(self, w: int, p: int) -> int:
        """Samples logical worker w uses in pass p."""
        spe, nw = self.steps_per_epoch, self.num_workers
        return self.batch_size * (batches_before((p + 1) * spe, w, nw) - batches_before(p * spe, w, nw))

    def _layout(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        if p not in self._layout_of:
            self._layout_of.clear()  # passes are visited in order: keep one
            order = np.random.default_rng([self.seed, p]).permutation(len(self.counts))
            self._layout_of[p] = order, np.concatenate([[0], np.cumsum(self.counts[order])])
        return self._layout_of[p]

    def pieces(self, rank: int, w: int, p: int, q: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard, first, end, q of the first): stream (rank, w)'s samples q, q+1, ... of pass p as runs of
        samples first..end-1 of one shard. A range past the pass's end (epoch_samples > the shards') wraps."""
        order, cum = self._layout(p)
        per_rank = sum(self.quota(v, p) for v in range(self.num_workers))
        base = rank * per_rank + sum(self.quota(v, p) for v in range(w))
        end = self.quota(w, p)
        while q < end:
            s = (base + q) % self.total
            k = int(np.searchsorted(cum, s, side="right")) - 1
            first = s - int(cum[k])
            stop = min(int(self.counts[order[k]]), first + end - q)
            yield int(order[k]), first, stop, q
            q += stop - first

    def locate(self, w: int, n: int) -> tuple[int, int]:
        """(pass, index) of the n-th sample logical worker w uses."""
        p = 0
        while n >= self.quota(w, p):
            n -= self.quota(w, p)
            p += 1
        return p, n

    def position(self, w: int, step: int, chunk: int) -> list[int]:
        """[pass, chunk, index in it] of logical worker w at `step`, if every batch used batch_size samples (no
        bad ones): the exact position on clean data, computed, not read."""
        p, q = self.locate(w, batches_before(step, w, self.num_workers) * self.batch_size)
        return [p, q // chunk, q % chunk]


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
    positions: list[list[int]] | None = None  # per logical worker [pass, chunk, index], TrainLoader.state_dict()
    draft: bool = True
    plan: PassPlan | None = None
    counts_known: bool = True  # samples per shard read from an index or the tars (not assumed): losses are counted

    @property
    def chunk(self) -> int:
        return max(1, self.shuffle_buffer)


def batches_before(step: int, worker: int, num_workers: int) -> int:
    """How many of the first `step` batches logical worker `worker` made (it makes batches w, w+W, ...)."""
    return len(range(worker, step, num_workers))


class TrainStream(IterableDataset):
    """Infinite stream of batches for one rank, assembled in place (each DataLoader worker runs its own copy).

    A worker reads its range of each pass (PassPlan) in chunks of `shuffle_buffer` samples, each chunk permuted
    whole (seeded by its pass and number) and never spanning two passes; a thread reads the next chunk while this
    one is used. `odis shard` shuffles images before packing them, so a chunk of consecutive samples is already a
    random draw. The position [pass, chunk, index in it] is all a resume needs: it seeks to the chunk's first
    sample (local tars; others are read up to it), reads the chunk again and skips what was used.
    """

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self._offsets: dict[int, np.ndarray | None] = {}

    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        info = get_worker_info()
        phys, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        w = (phys + s.start_step) % nw  # logical worker: batch k of the run comes from logical worker k % W
        counter = {"bad": 0, "warned": 0, "in_a_row": 0}
        p, c, i = s.positions[w] if s.positions is not None else s.plan.position(w, s.start_step, s.chunk)
        reduction = s.views.max_reduction if s.draft else None
        batch = _Batch(s.views, s.batch_size, shared=info is not None)
        for p, c, i, sample in self._chunks(self._raw(w, p, c * s.chunk), p, c, i, w, counter):
            try:
                out = self.process(sample, np.random.default_rng([s.seed, s.rank, w, p, c, i]), reduction,
                                   batch.slot())
            except Exception as e:  # noqa: BLE001 -- a bad sample must never kill the worker; it is counted
                if not isinstance(e, BadSample):
                    e = BadSample(f"{sample.get('__key__', '?')}: {type(e).__name__}: {e}")
                self._count(e, counter, w)
                continue
            batch.add(out, bad=counter["bad"])
            counter["bad"] = counter["in_a_row"] = 0
            if batch.full:
                yield batch.finish(worker=w, position=[p, c, i + 1])
                batch = _Batch(s.views, s.batch_size, shared=info is not None)

    def _chunks(self, raw, p: int, c: int, i: int, w: int, counter: dict) -> Iterator[tuple[int, int, int, dict]]:
        """(pass, chunk, index, sample) from chunk c of pass p, its i-th sample on. A chunk's unreadable tars are
        counted when it starts, except in the chunk a resume starts inside (counted before the checkpoint)."""
        from concurrent.futures import ThreadPoolExecutor

        reader = _ChunkReader(raw, self.spec.chunk)
        with ThreadPoolExecutor(1, thread_name_prefix="odis-chunk") as pool:  # reads chunk c+1 while c is used
            ahead = pool.submit(reader.next)
            while True:
                cp, cc, samples, errors = ahead.result()
                ahead = pool.submit(reader.next)
                if (cp, cc) != (p, c):
                    i = 0  # the chunk asked for had no readable sample
                for e in errors if i == 0 else ():
                    self._count(e, counter, w)
                order = np.random.default_rng([self.spec.seed, self.spec.rank, w, cp, cc]).permutation(len(samples))
                for k in order[i:]:
                    yield cp, cc, i, samples[k]
                    i += 1
                p, c, i = cp, cc + 1, 0

    def _raw(self, w: int, p: int, q: int) -> Iterator[tuple[int, int, dict | Exception]]:
        """(pass, index, sample) of logical worker w's ranges from index q of pass p on. A tar that cannot be read
        gives an Exception in place of a sample, at the index of the sample it failed before."""
        s, plan = self.spec, self.spec.plan
        empty: set[int] = set()  # shards that gave nothing since the last sample
        while True:
            for shard, first, end, q0 in plan.pieces(s.rank, w, p, q):
                errors: list[Exception] = []
                got = 0
                for n, sample in self._read(shard, first, end, errors):
                    while errors:
                        yield p, q0 + got, errors.pop(0)
                    yield p, q0 + n - first, sample
                    got = n - first + 1
                lost = end - first - got
                if lost > 0 and s.counts_known:  # a tar that ends early: every sample it lost is counted
                    if errors:
                        errors[-1] = BadSample(f"{errors[-1]}; {lost} sample(s) lost", count=lost)
                    else:
                        errors.append(BadSample(f"{s.urls[shard]}: ends after {first + got} sample(s), the index "
                                                f"lists more: {lost} sample(s) lost", count=lost))
                while errors:
                    yield p, q0 + got, errors.pop(0)
                if got:
                    empty.clear()
                else:
                    empty.add(shard)
                    if len(empty) >= plan.nonempty:  # every shard, unreadable or empty: nothing will ever come
                        raise RuntimeError(f"data worker {w}: not one sample in any of the {len(s.urls)} shard(s) "
                                           f"{s.urls[0]} ... Check the shards (odis verify)")
            p, q = p + 1, 0

    def _read(self, shard: int, first: int, end: int, errors: list) -> Iterator[tuple[int, dict]]:
        """(n, sample) for samples first..end-1 of a shard. A local tar of plain headers is entered at sample
        `first` by a seek; anything else is read from its start (webdataset's openers: pipe:, https:, ...)."""
        from webdataset import tariterators

        from odis.shards import is_remote, local_path
        from odis.tarscan import sample_offsets

        url = self.spec.urls[shard]

        def handler(e: Exception) -> bool:
            errors.append(BadSample(f"{url}: unreadable ({type(e).__name__}: {e})"))
            return True  # go on: the tar ends here

        start, stream = 0, None
        if first > 0 and not is_remote(url):
            if shard not in self._offsets:
                try:
                    offsets = sample_offsets(local_path(url))
                except OSError:
                    offsets = None
                self._offsets[shard] = None if offsets is None else np.asarray(offsets, np.int64)  # 8 B a sample
            offsets = self._offsets[shard]
            if offsets is not None:
                if first >= len(offsets):
                    return  # the index counted more samples than the tar holds
                stream = open(local_path(url), "rb")
                stream.seek(int(offsets[first]))
                start = first
        try:
            if stream is not None:
                files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
                samples = tariterators.group_by_keys(files, handler=handler)
            else:
                samples = tariterators.tarfile_samples([{"url": url}], handler=handler)
            for n, sample in enumerate(samples, start):
                if n >= end:
                    break
                if n >= first:
                    yield n, sample
        finally:
            if stream is not None:
                stream.close()

    def _count(self, exc: Exception, counter: dict, worker: int) -> None:
        """Count a bad sample or an unreadable tar; stop the worker when nothing usable comes any more (the
        stream is endless: skipping forever would hang the run)."""
        counter["bad"] += getattr(exc, "count", 1)
        counter["in_a_row"] += 1
        if counter["in_a_row"] >= MAX_BAD_IN_A_ROW:
            raise RuntimeError(f"data worker {worker}: {MAX_BAD_IN_A_ROW} unusable samples in a row in "
                               f"{self.spec.urls[0]} ...; last: {exc}. Check the shards (odis verify --decode)")
        if counter["warned"] < MAX_WARNINGS_PER_WORKER:
            counter["warned"] += 1
            log.warning("data worker %d: skipped a bad sample: %s", worker, exc)

    def process(self, raw: dict, rng: np.random.Generator, reduction=None, out: dict | None = None) -> dict:
        """One raw sample -> its views (written into `out`'s buffers if given). Raises BadSample."""
        sample = read_sample(raw, self.spec.boxes, reduction)
        boxes = sample.boxes
        views = self.spec.views(sample.image, boxes, rng, out)
        del views["crops"], views["local_crops"]
        views["label"], views["key"], views["has_box"] = sample.label, sample.key, bool(len(boxes))
        views["boxes_clipped"], views["boxes_dropped"] = sample.clipped, sample.dropped
        return views


class _ChunkReader:
    """Cuts a stream's (pass, index, sample) sequence into chunks: (pass, chunk, samples, errors). One item is read
    ahead (the first of the next chunk): a chunk ends where the next begins."""

    def __init__(self, raw: Iterator, size: int):
        self.raw, self.size, self.peek = raw, size, None

    def next(self) -> tuple[int, int, list[dict], list[Exception]]:
        if self.peek is None:
            self.peek = next(self.raw)
        p, c = self.peek[0], self.peek[1] // self.size
        samples, errors = [], []
        while self.peek[0] == p and self.peek[1] // self.size == c:
            (errors if isinstance(self.peek[2], Exception) else samples).append(self.peek[2])
            self.peek = next(self.raw)
        return p, c, samples, errors


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
        self.boxes_clipped = np.zeros(size, np.int64)
        self.boxes_dropped = np.zeros(size, np.int64)
        self.keys: list[str] = []
        self.local_masks = _local_mask_buffers(vm, size)  # the Table 5 switches' masks, when they are on

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
        self.boxes_clipped[i], self.boxes_dropped[i] = v.get("boxes_clipped", 0), v.get("boxes_dropped", 0)
        for name, buf in self.local_masks.items():
            buf[:, i] = v[name]
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
            "boxes_clipped": t(self.boxes_clipped),            # int64 [B] shard-json boxes clipped to the image
            "boxes_dropped": t(self.boxes_dropped),            # int64 [B] shard-json boxes not finite or empty
            "key": self.keys,                                  # list[str] image ids
            "worker": worker,                                  # logical worker that made the batch
            "position": position,                              # that worker's stream position after it
            # with the switches on: local_obj_mask bool [n_local, B, lg, lg], local_obj_hit bool [n_local, B],
            # local_mim_mask bool [n_local, B, lg, lg]
            **{name: t(buf) for name, buf in self.local_masks.items()},
        }


def _local_mask_buffers(vm: ViewMaker, size: int) -> dict[str, np.ndarray]:
    lg = vm.local_size // vm.patch_size
    bufs = {}
    if vm.local_obj_masks:
        bufs["local_obj_mask"] = np.zeros((vm.n_local, size, lg, lg), bool)
        bufs["local_obj_hit"] = np.zeros((vm.n_local, size), bool)
    if vm.local_masker is not None:
        bufs["local_mim_mask"] = np.zeros((vm.n_local, size, lg, lg), bool)
    return bufs


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
    b.boxes_clipped, b.boxes_dropped = np.zeros(len(samples), np.int64), np.zeros(len(samples), np.int64)
    b.local_masks = {name: np.zeros((len(samples[0][name]), len(samples)) + samples[0][name].shape[1:], bool)
                     for name in ("local_obj_mask", "local_obj_hit", "local_mim_mask") if name in samples[0]}
    for s in samples:
        b.add(s, s.get("bad", 0))
    return b.finish(worker=samples[-1].get("worker", 0), position=samples[-1].get("position", [0, 0, 0]))
