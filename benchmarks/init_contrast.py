#!/usr/bin/env python3
"""How different a freshly initialised network finds the images: what DINO-style centering needs to start.

EMA centering subtracts the teacher's mean output, then sharpens what is left; if an untrained network gives every
image nearly the same [CLS], nothing is left to sharpen and the teacher stays uniform (the collapse the experiment
report flags). For each image set this prints the mean cosine between the untrained teacher's [CLS] of different
images and its initial per-image entropy over ln K at the warm-up temperature 0.04 after centering:

  python3 benchmarks/init_contrast.py --images 'runs/mini-repro/data/scenes/val/*/*.jpg' --size 80
  python3 benchmarks/init_contrast.py --images '../shared/data/coco_tiny/train2017/*.jpg' \\
      --arch vit_small_patch16_224 --patch 16 --size 224 --out-dim 8192 --hidden-dim 2048 --bottleneck-dim 256
"""
from __future__ import annotations

import argparse
import glob
import math
import random

import torch
from PIL import Image

from odis.distill import Distiller
from odis.eval.features import box_view


def init_contrast(files: list[str], arch: str, patch: int, size: int, out_dim: int, hidden_dim: int,
                  bottleneck_dim: int, temp: float = 0.04, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x = torch.stack([box_view(Image.open(f), None, "none", size, patch=patch).image for f in files])
    d = Distiller("ibot", arch, size, patch, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                  drop_path_rate=0.0)
    with torch.no_grad():
        out = d.teacher.backbone(x)
        tokens = out[0] if isinstance(out, tuple) else out
        cls = tokens[:, 0] if tokens.dim() == 3 else tokens
        z = torch.nn.functional.normalize(cls, dim=-1)
        off = ~torch.eye(len(files), dtype=torch.bool)
        logits = d.teacher.head(cls)
        p = torch.softmax((logits - logits.mean(0, keepdim=True)) / temp, dim=-1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    return {"images": len(files), "cos": float((z @ z.T)[off].mean()), "entropy": float(entropy) / math.log(out_dim)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", action="append", required=True, help="a glob of images (repeat for more sets)")
    ap.add_argument("--n", type=int, default=32, help="images per set (a seeded random sample)")
    ap.add_argument("--arch", default="test_vit")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--size", type=int, default=80)
    ap.add_argument("--out-dim", type=int, default=64)
    ap.add_argument("--hidden-dim", type=int, default=256)
    ap.add_argument("--bottleneck-dim", type=int, default=128)
    a = ap.parse_args()
    print("| images | arch | size | cos between images | teacher H / ln K at init |")
    print("|---|---|---|---|---|")
    for pattern in a.images:
        files = sorted(glob.glob(pattern))
        files = random.Random(0).sample(files, min(a.n, len(files)))  # across the set's classes
        if len(files) < 2:
            raise SystemExit(f"{pattern}: fewer than 2 images")
        r = init_contrast(files, a.arch, a.patch, a.size, a.out_dim, a.hidden_dim, a.bottleneck_dim)
        print(f"| {pattern} ({r['images']}) | {a.arch} | {a.size} | {r['cos']:.3f} | {r['entropy']:.3f} |")


if __name__ == "__main__":
    main()
