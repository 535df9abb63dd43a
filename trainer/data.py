"""Streaming training loader: webdataset shards -> boxes -> object-aware views -> uint8 batches.

    make_train_loader(cfg, patch_size, rank, world_size, start_step=0, state=None) -> TrainLoader
    odis.augment.augment_batch(batch, device, generator) -> (global views, local views), float and normalised

The stream itself (which worker reads which samples, the batch layout, exact resume) is trainer/stream.py; this
module sets it up from the config, joins the manifest and keeps the position that a checkpoint saves.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterator

import cv2
import torch
from torch.utils.data import DataLoader

from odis.samples import BoxTable
from odis.trainer.stream import PassPlan, StreamSpec, TrainStream
from odis.views import ViewMaker

log = logging.getLogger("odis.data")

STATE_VERSION = 3  # the data position in checkpoints: 3 = [pass, chunk, index in it] per worker


class TrainLoader:
    """Iterable over batches (infinite; count steps yourself). Attributes: steps_per_epoch, epoch_samples,
    box_report (rank 0; None elsewhere), stats (running totals: samples, bad_samples, crop_fallbacks, obj_invalid,
    whole_image_box = samples without any box, trained with the whole image as the object; json_boxes_clipped /
    json_boxes_dropped = boxes of the shards' own json clipped to the image / not finite or empty, when no
    manifest is given),
    state_dict() -> the data position to store in checkpoints (pass back as `state` to resume exactly)."""

    def __init__(self, loader: DataLoader, spec: StreamSpec, epoch_samples: int, box_report: dict | None):
        self.loader, self.spec, self.num_workers = loader, spec, spec.plan.num_workers
        self.steps_per_epoch, self.epoch_samples, self.box_report = spec.plan.steps_per_epoch, epoch_samples, \
            box_report
        self.step = spec.start_step
        self.positions = list(spec.positions) if spec.positions is not None else \
            [spec.plan.position(w, spec.start_step, spec.chunk) for w in range(self.num_workers)]
        self.stats = {"samples": 0, "bad_samples": 0, "crop_fallbacks": 0, "obj_invalid": 0, "whole_image_box": 0,
                      "json_boxes_clipped": 0, "json_boxes_dropped": 0}

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.step += 1
            self.positions[batch["worker"]] = batch["position"]
            self.stats["samples"] += len(batch["key"])
            self.stats["bad_samples"] += int(batch["bad"].sum())
            self.stats["crop_fallbacks"] += int(batch["fallbacks"].sum())
            self.stats["obj_invalid"] += int((~batch["obj_valid"]).sum())
            self.stats["whole_image_box"] += int((~batch["has_box"]).sum())
            self.stats["json_boxes_clipped"] += int(batch["boxes_clipped"].sum())
            self.stats["json_boxes_dropped"] += int(batch["boxes_dropped"].sum())
            if "local_obj_hit" in batch:  # MALC: local crops that missed the box, their OBJ row unmasked
                n = int((~batch["local_obj_hit"]).sum())
                self.stats["local_obj_unmasked"] = self.stats.get("local_obj_unmasked", 0) + n
            yield batch

    def state_dict(self) -> dict:
        return {**_stream_identity(self.spec, self.step),
                "positions": [list(map(int, p)) for p in self.positions]}


def _stream_identity(spec: StreamSpec, step: int) -> dict:
    """What the data stream is a function of: a saved position continues only a stream with all of these."""
    plan = spec.plan
    shards = hashlib.blake2b(json.dumps([[u.rsplit("/", 1)[-1], int(n)] for u, n in zip(spec.urls, plan.counts)])
                             .encode(), digest_size=8).hexdigest()
    return {"version": STATE_VERSION, "step": step, "num_workers": plan.num_workers, "world_size": plan.world_size,
            "seed": spec.seed, "batch_size": spec.batch_size, "shuffle_buffer": spec.shuffle_buffer,
            "steps_per_epoch": plan.steps_per_epoch, "shards": shards}


def make_train_loader(cfg, patch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0,
                      state: dict | None = None, pin_memory: bool | None = None) -> TrainLoader:
    """The training batches of `rank` (see the module docstring). `cfg` is trainer.config.Config."""
    from odis.shards import list_shards, shard_counts, shard_keys

    d = cfg.data
    if not d.shards:
        raise ValueError("data.shards is empty: give --shards (a folder, index.json, brace pattern or URL)")
    urls = list_shards(d.shards)
    if not urls:
        raise FileNotFoundError(f"{d.shards}: no shards")
    table = BoxTable.from_manifest(d.boxes) if d.boxes else None
    counts = shard_counts(d.shards, urls)
    counts_known = counts is not None
    if counts is not None and not sum(counts):
        raise ValueError(f"{d.shards}: not one readable sample in {len(urls)} shard(s) ({urls[0]} ...); check the "
                         "shards (odis verify)")
    total = d.epoch_samples or (sum(counts) if counts is not None else None)
    if not total:
        raise ValueError(f"{d.shards}: cannot tell the number of images (remote shards without an index.json); "
                         "set data.epoch_samples")
    if counts is None:
        log.warning("%s: remote shards without an index.json: the shard order assumes %d samples in each",
                    d.shards, total // len(urls))
        counts = [max(1, total // len(urls))] * len(urls)
    report = None
    if table is not None and rank == 0:
        log.info("reading the sample keys of %d shard(s) from their tar headers", len(urls))
        keys = shard_keys(urls)
        report = dict(table.stats, box_table_bytes=table.nbytes)
        if keys is not None:
            report.update(table.check_match(d.shards, keys))
        else:
            report["shard_keys"] = "unknown (remote shards): shard/manifest overlap not counted"
        log.info("boxes: %s", report)
    plan = PassPlan(counts, cfg.seed, d.batch_size, max(1, int(d.num_workers)), world_size,
                    max(1, total // (d.batch_size * world_size)))
    spec = StreamSpec(urls, ViewMaker(d, patch_size, cfg.method, local_obj_masks=cfg.model.local_obj_attention), table, cfg.seed, rank,
                      d.batch_size, d.shuffle_buffer, start_step, plan=plan, counts_known=counts_known)
    if state is not None:
        spec.positions = _saved_positions(state, spec)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and cfg.device != "cpu"
    # The stream yields whole batches (assembled in place in the worker): batch_size=None here.
    loader = DataLoader(TrainStream(spec), batch_size=None, num_workers=max(0, int(d.num_workers)),
                        pin_memory=pin_memory, worker_init_fn=_worker_init, persistent_workers=False)
    return TrainLoader(loader, spec, total, report)


def _saved_positions(state: dict, spec: StreamSpec) -> list[list[int]] | None:
    """The workers' positions saved in a checkpoint, if they continue this stream exactly; else None, with a
    warning (each worker then starts where it would be had no sample been bad: computed, nothing is read)."""
    now = _stream_identity(spec, spec.start_step)
    if "version" not in state:
        diff = "it was written by an older odis, whose data order differs"
    else:
        diff = ", ".join(f"{k} {state.get(k)} -> {v}" for k, v in now.items() if state.get(k) != v)
    if not diff and len(state.get("positions") or []) == spec.plan.num_workers:
        return [[int(x) for x in p] for p in state["positions"]]
    log.warning("the checkpoint's data position does not fit this run (%s): the resumed data stream differs "
                "from the uninterrupted run's", diff or "no worker positions")
    return None


def _worker_init(_):
    # The workers are the parallelism: cv2's and torch's own thread pools would oversubscribe the cores.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
