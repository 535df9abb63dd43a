"""Loader images/s per core: the odis loader against the reference DINO/iBOT PIL multi-crop, same images, same run.

    python benchmarks/loader.py                       # coco_tiny (160 COCO JPEGs, 640x480-ish), 2x224 + 10x96
    python benchmarks/loader.py --repeats 5 --device cuda --no-record

Measured on one core (torch, cv2 and OpenMP limited to one thread; best of --repeats, on the same images):
  reference   DINO's DataAugmentationDINO (iBOT ViT-S scales): PIL decode, per view RandomResizedCrop(bicubic),
              flip, ColorJitter p=0.8, Grayscale p=0.2, GaussianBlur (PIL ImageFilter) with DINO's per-view p,
              Solarize (global 2), ToTensor, Normalize; 2 x 224 + 10 x 96.
  odis loader the real streaming loader (make_train_loader, method odis) over webdataset shards written from the
              same images with their COCO boxes: tar read, shuffle buffer, decode, sample a box, object-aware
              global crops, local crops, OBJ patch masks, iBOT block masks, uint8 batch. In this process
              (num_workers=0: exactly one core's work) and with 1 worker process (adds the IPC to this process).
  photometric augment_batch (colour jitter, grayscale, blur, solarize, normalise; DINO's per-view p) on --device,
              batched (--batch); on a CPU this is one core's rate, on a GPU the device's.
The ratio printed is odis loader (in-process) / reference (target: >= 300 img/s per core for the loader; DESIGN.md section 6).
Appends a row to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
REPO = Path(__file__).resolve().parents[1]

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from odis.trainer.config import Config  # noqa: E402
from odis.augment import augment_batch  # noqa: E402
from odis.trainer.data import make_train_loader  # noqa: E402

SHARED = Path(os.environ.get("ODIS_SHARED", REPO.parent / "shared"))
COCO = SHARED / "data" / "coco_tiny"


def load_coco(limit: int | None) -> list[dict]:
    """[{key, bytes, width, height, boxes}] from coco_tiny's images and instance annotations (plain json)."""
    out = []
    for split in ("train2017", "val2017"):
        ann = json.loads((COCO / "annotations" / f"instances_{split}.json").read_text())
        boxes: dict[int, list] = {}
        for a in ann["annotations"]:
            x, y, w, h = a["bbox"]
            if not a.get("iscrowd") and w > 1 and h > 1:
                boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
        for info in sorted(ann["images"], key=lambda i: i["id"]):
            f = COCO / split / info["file_name"]
            if f.is_file():
                out.append({"key": f"{info['id']:012d}", "bytes": f.read_bytes(), "width": info["width"],
                            "height": info["height"], "boxes": boxes.get(info["id"], [])})
    return out[:limit] if limit else out


def reencode(images: list[dict], short: int) -> list[dict]:
    """The same images re-encoded (JPEG q90) with their short side at `short` px, boxes scaled (e.g. 375: the
    IN1K-like 500x375 size the loader target is stated for)."""
    from PIL import Image

    out = []
    for im in images:
        img = Image.open(io.BytesIO(im["bytes"])).convert("RGB")
        s = short / min(img.size)
        size = (round(img.size[0] * s), round(img.size[1] * s))
        buf = io.BytesIO()
        img.resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        sx, sy = size[0] / img.size[0], size[1] / img.size[1]
        boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in im["boxes"]]
        out.append(dict(im, bytes=buf.getvalue(), width=size[0], height=size[1], boxes=boxes))
    return out


# ---- the reference: DINO's DataAugmentationDINO (main_dino.py), with iBOT's ViT-S scales --------------------------

def reference_transform(n_local: int = 10):
    import torchvision.transforms as T
    from PIL import ImageFilter, ImageOps

    class GaussianBlur:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if random.random() <= self.p:
                return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
            return img

    class Solarization:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return ImageOps.solarize(img) if random.random() < self.p else img

    bicubic = T.InterpolationMode.BICUBIC
    flip_jitter = T.Compose([T.RandomHorizontalFlip(p=0.5),
                             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                             T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    g1 = T.Compose([T.RandomResizedCrop(224, scale=(0.25, 1.0), interpolation=bicubic), flip_jitter,
                    GaussianBlur(1.0), norm])
    g2 = T.Compose([T.RandomResizedCrop(224, scale=(0.25, 1.0), interpolation=bicubic), flip_jitter,
                    GaussianBlur(0.1), Solarization(0.2), norm])
    loc = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.25), interpolation=bicubic), flip_jitter,
                     GaussianBlur(0.5), norm])

    def apply(img):
        return [g1(img), g2(img)] + [loc(img) for _ in range(n_local)]

    return apply


def time_reference(images: list[dict]) -> float:
    from PIL import Image

    tf = reference_transform()
    t = time.perf_counter()
    for im in images:
        tf(Image.open(io.BytesIO(im["bytes"])).convert("RGB"))
    return len(images) / (time.perf_counter() - t)


# ---- odis ------------------------------------------------------------------------------------------------------

def time_photometric(batches: list[dict], device: str) -> float:
    gen = torch.Generator().manual_seed(0)
    augment_batch(batches[0], device, gen)  # warm-up (CUDA context, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = 0
    for b in batches:
        g, loc = augment_batch(b, device, gen)
        n += b["global"].shape[1]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def write_shards(images: list[dict], folder: Path) -> Path:
    import hashlib

    import webdataset as wds

    with wds.ShardWriter(str(folder / "bench-%06d.tar"), maxcount=10_000, verbose=0) as sink:
        for im in images:
            meta = {"image_id": im["key"], "label": None, "width": im["width"], "height": im["height"],
                    "boxes": im["boxes"], "scores": [1.0] * len(im["boxes"])}
            sink.write({"__key__": im["key"], "jpg": im["bytes"], "json": json.dumps(meta).encode()})
    shards = [{"name": p.name, "count": len(images), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
              for p in sorted(folder.glob("bench-*.tar"))]
    (folder / "index.json").write_text(json.dumps({"format": "odis-shards", "version": 1, "shards": shards,
                                                   "num_samples": len(images), "classes": None}))
    return folder


def time_loader(shards: Path, n_images: int, batch: int, workers: int) -> tuple[float, list[dict]]:
    """The real loader over the shards; workers=0 runs it in this process (one core, no IPC)."""
    cfg = Config(method="odis", seed=0, device="cpu")
    d = cfg.data
    d.shards, d.batch_size, d.num_workers, d.shuffle_buffer = str(shards), batch, workers, 64
    loader = make_train_loader(cfg, 16, pin_memory=False)
    n_batches = max(2, n_images // batch)
    it = iter(loader)
    next(it)  # worker start-up and the shuffle buffer's first fill are not throughput
    out = []
    t = time.perf_counter()
    for _ in range(n_batches):
        out.append(next(it))
    rate = n_batches * batch / (time.perf_counter() - t)
    del it
    return rate, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="use the first N coco_tiny images (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many passes per pipeline")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--short-side", type=int, default=None,
                    help="re-encode the images with this short side first (375: IN1K-like 500x375); default: as is")
    ap.add_argument("--workers", type=int, default=0,
                    help="also time the loader with this many worker processes (total img/s; 0: skip)")
    ap.add_argument("--machine", default=None, help="machine description for BENCHMARKS.md")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    random.seed(0)
    torch.manual_seed(0)
    images = load_coco(args.images)
    if args.short_side:
        images = reencode(images, args.short_side)
    sizes = np.array([[im["width"], im["height"]] for im in images])
    print(f"{len(images)} coco_tiny images, median {int(np.median(sizes[:, 0]))}x{int(np.median(sizes[:, 1]))}, "
          f"{sum(len(im['bytes']) for im in images) / len(images) / 1e3:.0f} KB; 2 x 224 + 10 x 96, one core")
    ref, cpu, photo, loader = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(images, Path(tmp))
        for r in range(args.repeats):
            ref.append(time_reference(images))
            rate, batches = time_loader(shards, len(images), args.batch, workers=0)
            cpu.append(rate)
            photo.append(time_photometric(batches, args.device))
            loader.append(time_loader(shards, len(images), args.batch, workers=1)[0])
            print(f"  pass {r + 1}: reference {ref[-1]:.0f}, odis loader in-process {cpu[-1]:.0f}, 1 worker "
                  f"{loader[-1]:.0f}, photometric on {args.device} {photo[-1]:.0f} img/s")
        many = time_loader(shards, len(images) * args.workers, args.batch, args.workers)[0] if args.workers else 0
        if many:
            print(f"  odis loader, {args.workers} workers: {many:.0f} img/s in total")
    ref_b, cpu_b, photo_b, loader_b = max(ref), max(cpu), max(photo), max(loader)
    both = 1 / (1 / cpu_b + 1 / photo_b)
    print(f"reference PIL multi-crop:             {ref_b:7.0f} img/s per core")
    print(f"odis loader, in-process (one core):   {cpu_b:7.0f} img/s per core  ({cpu_b / ref_b:.1f}x reference)")
    print(f"odis loader, 1 worker process:        {loader_b:7.0f} img/s")
    print(f"photometric, batched on {args.device:13s}: {photo_b:7.0f} img/s")
    if args.device == "cpu":
        print(f"loader + photometric on the same core: {both:6.0f} img/s ({both / ref_b:.1f}x reference)")
    if args.no_record:
        return
    machine = args.machine or f"{os.cpu_count()}-core CPU ({platform.machine()})" + (
        f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else "")
    what = f"coco_tiny {len(images)} imgs" + (f" re-encoded to short side {args.short_side}" if args.short_side
                                              else "")
    figures = (f"{what} (median {int(np.median(sizes[:, 0]))}x{int(np.median(sizes[:, 1]))}), 2x224+10x96, one core: reference PIL {ref_b:.0f} img/s; odis loader "
               f"(shards, in-process) {cpu_b:.0f} img/s = {cpu_b / ref_b:.1f}x; with 1 worker process "
               f"{loader_b:.0f} img/s; photometric on {args.device} {photo_b:.0f} img/s"
               + (f"; loader+photometric on one core {both:.0f} img/s" if args.device == "cpu" else "")
               + (f"; loader with {args.workers} workers {many:.0f} img/s total" if many else ""))
    cmd = "python benchmarks/loader.py" + (f" --short-side {args.short_side}" if args.short_side else "")
    append_row(machine, cmd, figures)


def append_row(machine: str, cmd: str, figures: str) -> None:
    """One row of BENCHMARKS.md: date, machine, command, figures."""
    row = f"| {date.today()} | {machine} | `{cmd}` | {figures} |\n"
    with open(REPO / "BENCHMARKS.md", "a") as f:
        f.write(row)
    print("appended to BENCHMARKS.md:", row.strip())


if __name__ == "__main__":
    main()
