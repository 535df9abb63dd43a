"""Frozen features from shards with box-conditioned inference (paper App. D.1).

The evaluation view is DINO's: Resize(shorter side to round(size * 256 / 224), bicubic) then CenterCrop(size)
(256 / 224 for the ViT recipes). The box rides through the same transform as a `boxes.Crop` of the source image.
Box modes (one box per image; the largest unless `box_select` says otherwise):

- `none`     the whole image, plain CLS (the OBJ row unmasked);
- `mask`     the OBJ token with its attention masked to the patches the box touches, in every block (as trained);
- `crop`     the box cut out of the source image and resized to size x size (aspect not kept: the whole box shows);
- `blackout` pixels outside the box set to black (RGB 0, i.e. before normalisation), the OBJ row unmasked.

An image without a box, or whose box the centre crop cuts away, falls back to `none`; both are counted.

With a `SegmentTable` (`--masks COCO_JSON`, mode `mask` only; the paper's Table 5 "Use Masks") the OBJ mask is the
patch mask of the segmentation of the object whose box was selected instead of its box; an image without one uses
its box mask, counted by reason (MASK_COUNTS).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from odis.augment import IMAGENET_MEAN, IMAGENET_STD
from odis.boxes import Crop, box_area, box_to_patch_mask, clip_boxes, is_empty
from odis.eval.segments import SegmentTable
from odis.eval.settings import BOX_MODES, BOX_SELECT
from odis.samples import BoxTable, read_sample, sample_boxes



# ---- the transform ------------------------------------------------------------------------------------------

def eval_crop(width: int, height: int, size: int = 224, resize: int | None = None) -> Crop:
    """Resize(shorter side -> resize) + CenterCrop(size) as one `Crop` of the source image (torchvision rounding)."""
    resize = resize or round(size * 256 / 224)
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sx, sy = new_w / width, new_h / height
    return Crop(top=top / sy, left=left / sx, height=size / sy, width=size / sx, out_h=size, out_w=size)


def eval_view_box(width: int, height: int, box: np.ndarray, size: int = 224,
                  resize: int | None = None) -> np.ndarray | None:
    """A box of the image's pixels in the evaluation view's pixels; None when the centre crop cuts it away (the box
    modes then fall back to `none`: `box_cropped_away`)."""
    vbox = eval_crop(width, height, size, resize).apply(box)
    return None if is_empty(vbox) else vbox


def input_size(model, size: int | None) -> int:
    """The evaluation input size (`--size`; default: the backbone's training size), a multiple of its patch size
    (the patch grid must tile the view)."""
    size = size or model.img_size
    if size % model.patch_size:
        raise ValueError(f"--size {size} is not a multiple of the patch size {model.patch_size} of the backbone")
    return size


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC PIL -> float [3,H,W] in [0,1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def eval_view(img: Image.Image, size: int = 224, resize: int | None = None) -> Image.Image:
    """The DINO evaluation view (torchvision's own Resize + CenterCrop, so numbers match the reference)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    resize = resize or round(size * 256 / 224)
    return TF.center_crop(TF.resize(img, resize, interpolation=InterpolationMode.BICUBIC), [size, size])


def select_box(boxes: np.ndarray, scores: np.ndarray | None = None, how: str = "largest") -> np.ndarray | None:
    """One box out of several: `largest` area, highest `score`, or the `union` (enclosing box) of all."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    keep = ~is_empty(boxes) if len(boxes) else np.zeros(0, bool)
    scores = np.asarray(scores, np.float64)[keep] if scores is not None and len(scores) == len(boxes) else None
    boxes = boxes[keep]
    if len(boxes) == 0:
        return None
    if how == "largest" or (how == "score" and scores is None):
        return boxes[int(np.argmax(box_area(boxes)))]
    if how == "score":
        return boxes[int(np.argmax(scores))]
    if how == "union":
        return np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])
    raise ValueError(f"box_select must be one of {BOX_SELECT}, got {how!r}")


@dataclass
class BoxView:
    """One image made ready for the backbone: a normalised view, its OBJ patch mask, and what happened."""

    image: torch.Tensor                 # [3, size, size], normalised
    obj_mask: torch.Tensor | None       # bool [gh, gw] for mode `mask`, else None
    fallback: str | None = None         # "no_box" | "box_cropped_away" when the mode fell back to `none`


def box_view(img: Image.Image, box: np.ndarray | None, mode: str, size: int = 224, resize: int | None = None,
             patch: int = 16) -> BoxView:
    """Apply one box mode to a PIL image; `box` is in the image's pixels (None: no box)."""
    if mode not in BOX_MODES:
        raise ValueError(f"box mode must be one of {BOX_MODES}, got {mode!r}")
    img = img.convert("RGB")
    w, h = img.size
    if box is not None:
        box = clip_boxes(np.asarray(box, np.float64), w, h)
        if is_empty(box):
            box = None
    fallback = None
    if mode != "none" and box is None:
        mode, fallback = "none", "no_box"
    if mode == "crop":
        # PIL resamples the float region directly: the same region `boxes.Crop` describes.
        view = img.resize((size, size), Image.BICUBIC, box=tuple(float(v) for v in box))
        return BoxView(normalize(_to_tensor(view)), None)
    view = _to_tensor(eval_view(img, size, resize))
    if mode == "none":
        return BoxView(normalize(view), None, fallback)
    vbox = eval_view_box(w, h, box, size, resize)
    if vbox is None:
        return BoxView(normalize(view), None, "box_cropped_away")
    if mode == "blackout":
        # A pixel stays when it overlaps the box: the patch rule at patch size 1.
        keep = torch.from_numpy(box_to_patch_mask(vbox, size, size, 1))
        return BoxView(normalize(view * keep), None)
    return BoxView(normalize(view), torch.from_numpy(box_to_patch_mask(vbox, size, size, patch)))


# ---- shards -------------------------------------------------------------------------------------------------

def list_shard_urls(spec: str) -> list[str]:
    """Shard files of a spec (folder, index.json, brace pattern, URL; see odis.shards.list_shards)."""
    from odis.shards import list_shards

    return list_shards(spec)


def read_classes(spec: str) -> list[str] | None:
    """The class list of a shard folder's index.json, if there is one."""
    from odis.shards import read_index

    p = Path(str(spec))
    for cand in (p, p.parent):
        if (cand / "index.json").is_file() or cand.suffix == ".json":
            return read_index(cand).get("classes")
    return None


def box_for_sample(img: Image.Image, meta: dict, image_id: str, table: BoxTable | None, how: str):
    """The one box of a sample (odis.samples' rule: the manifest when given, else the json), or None."""
    boxes, scores, _, _ = sample_boxes(table, image_id, meta, img.width, img.height)
    return select_box(boxes, scores, how)


# ---- the dataset and the extraction loop --------------------------------------------------------------------

@dataclass
class ViewConfig:
    mode: str = "none"
    size: int = 224
    resize: int | None = None
    patch: int = 16
    box_select: str = "largest"


class _MakeView:
    """Picklable map function for the webdataset pipeline: raw sample -> dict (or an error record)."""

    def __init__(self, cfg: ViewConfig, table: BoxTable | None, segments: SegmentTable | None = None):
        self.cfg, self.table, self.segments = cfg, table, segments

    def __call__(self, raw: dict) -> dict:
        if "__shard_error__" in raw:
            return {"error": raw["__shard_error__"], "lost": raw["__lost__"]}
        try:
            s = read_sample(raw, self.table)
            box = select_box(s.boxes, s.scores, self.cfg.box_select)
            v = box_view(Image.fromarray(s.image), box, self.cfg.mode, self.cfg.size, self.cfg.resize, self.cfg.patch)
            mask_source = None
            if self.segments is not None and v.obj_mask is not None:  # mode `mask` with a box in the view
                h, w = s.image.shape[:2]
                crop = eval_crop(w, h, self.cfg.size, self.cfg.resize)
                pm, mask_source = self.segments.patch_mask(s.key, w, h, s.boxes, box, self.cfg.box_select, crop,
                                                           self.cfg.patch)
                if pm is not None:
                    v.obj_mask = torch.from_numpy(pm)
        except Exception as e:  # counted and reported, never silently dropped
            return {"error": f"sample {raw.get('__key__', '?')!r} in {raw.get('__url__', '?')}: {e}"}
        fallback = v.fallback
        if fallback == "no_box" and s.source == "not_in_manifest":
            fallback = "not_in_manifest"  # told apart: an id mismatch is not the detector finding nothing
        return {"image_id": s.key, "image": v.image, "obj_mask": v.obj_mask, "fallback": fallback, "label": s.label,
                "mask_source": mask_source}


def _collate(batch: list[dict]) -> dict:
    good = [b for b in batch if "error" not in b]
    out = {"errors": [b["error"] for b in batch if "error" in b], "n": len(good),
           "lost": sum(b.get("lost", 1) for b in batch if "error" in b)}
    if good:
        out["image"] = torch.stack([b["image"] for b in good])
        masks = [b["obj_mask"] for b in good]
        if any(m is not None for m in masks):
            shape = next(m for m in masks if m is not None).shape
            out["obj_mask"] = torch.stack([m if m is not None else torch.ones(shape, dtype=torch.bool)
                                           for m in masks])
        else:
            out["obj_mask"] = None
        out["label"] = torch.tensor([b["label"] for b in good])
        out["image_id"] = [b["image_id"] for b in good]
        out["fallback"] = [b["fallback"] for b in good]
        out["mask_source"] = [b.get("mask_source") for b in good]
    return out


def _shard_end_problem(url: str) -> str | None:
    """Why a local shard looks cut short, or None. A tar cut at a member boundary reads without an error, so its
    missing tail would go unnoticed: every writer (tarfile, GNU tar, odis shard) ends with two zero blocks."""
    from odis.shards import is_remote, local_path

    if is_remote(url):
        return None
    path = local_path(url)
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or tail != bytes(1024):
        return f"no end-of-archive marker after {size} bytes: truncated"
    return None


class _ShardSamples:
    """The samples of each shard in turn. A shard that cannot be read (missing, empty, truncated) gives what it
    could, then one error record counting the samples it lost (against `counts`, the samples per shard): the loop
    counts them like unreadable samples instead of a DataLoader worker dying with a tarfile traceback."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts

    def __call__(self, shards):
        from webdataset.tariterators import tarfile_samples

        for shard in shards:
            url, last, read = shard["url"], None, 0
            try:
                for sample in tarfile_samples([dict(shard)]):  # one behind: the last may turn out incomplete
                    if last is not None:
                        yield last
                        read += 1
                    last = sample
                problem = _shard_end_problem(url)
                if problem and last is not None:  # cut at a member boundary: the last sample may miss files
                    problem, last = f"{problem}; its last sample {last['__key__']!r} is left out", None
            except Exception as e:  # noqa: BLE001 - any failure to read one shard is reported, never fatal
                problem = f"{type(e).__name__}: {e.args[0] if e.args else e}"
            if last is not None:
                yield last
                read += 1
            if problem:
                lost = max(1, self.counts.get(url, 0) - read)
                yield {"__url__": url, "__shard_error__": f"{url}: unreadable shard ({problem}): {lost} sample(s) "
                       "lost", "__lost__": lost}


def shard_loader(spec: str, cfg: ViewConfig, table: BoxTable | None = None, batch_size: int = 64,
                 num_workers: int = 0, segments: SegmentTable | None = None):
    """Batches of box views of a shard set; `segments`: OBJ masks from segmentations (mode `mask`)."""
    import webdataset as wds

    from odis.shards import shard_counts

    urls = list_shard_urls(spec)
    counts = dict(zip(urls, shard_counts(spec, urls) or []))
    ds = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, _ShardSamples(counts),
                          wds.map(_MakeView(cfg, table, segments)))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=min(num_workers, len(urls)),
                                       collate_fn=_collate)


@dataclass
class Features:
    feats: torch.Tensor                  # [N, D] (or [N, n_blocks * D])
    labels: torch.Tensor                 # [N], -1 = no label
    image_ids: list[str]
    counts: dict = field(default_factory=dict)   # no_box / not_in_manifest / box_cropped_away / errors (samples)
    errors: list[str] = field(default_factory=list)


@torch.inference_mode()
def extract_features(model, loader, device: str = "cpu", n_last_blocks: int = 1, desc: str = "features",
                     progress: bool = True, total: int | None = None) -> Features:
    """OBJ/CLS features (after the final norm) of every image; `n_last_blocks > 1` concatenates the last blocks'."""
    from tqdm import tqdm

    model.eval().to(device)
    feats, labels, ids, errors = [], [], [], []
    counts = {"no_box": 0, "not_in_manifest": 0, "box_cropped_away": 0, "errors": 0}
    for batch in tqdm(loader, desc=desc, unit="batch", total=total, disable=not progress):
        errors += batch["errors"]
        counts["errors"] += batch["lost"]  # samples: a truncated shard counts every sample it lost
        if batch["n"] == 0:
            continue
        x = batch["image"].to(device)
        m = batch["obj_mask"].to(device) if batch["obj_mask"] is not None else None
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            if n_last_blocks == 1:
                f = model(x, obj_mask=m)[0]
            else:
                f = torch.cat(model.intermediate_obj(x, n_last_blocks, obj_mask=m), dim=-1)
        feats.append(f.float().cpu())
        labels.append(batch["label"])
        ids += batch["image_id"]
        for fb in batch["fallback"]:
            if fb:
                counts[fb] += 1
        for src in batch.get("mask_source", ()):
            if src:  # mode `mask` with --masks: the segmentation, or the box mask and why (all keys: features_for)
                for k in ("mask_segmentation",) if src == "segmentation" else ("mask_fallback_box", src):
                    counts[k] = counts.get(k, 0) + 1
    if not feats:
        raise ValueError(f"no image could be read ({len(errors)} error(s); first: {errors[0]})" if errors else
                         "no image could be read: the shards hold no samples")
    return Features(torch.cat(feats), torch.cat(labels), ids, counts, errors)


def save_features(f: Features, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({"feats": f.feats.contiguous(), "labels": f.labels.contiguous()}, str(path),
              metadata={"image_ids": json.dumps(f.image_ids), "counts": json.dumps(f.counts)})


def load_features(path: str | Path) -> Features:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        return Features(fh.get_tensor("feats"), fh.get_tensor("labels"), json.loads(meta.get("image_ids", "[]")),
                        json.loads(meta.get("counts", "{}")))
