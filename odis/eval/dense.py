"""Dense nearest-neighbour retrieval (Hummingbird, Balazevic et al. 2023; open-hummingbird-eval protocol).

Memory: the L2-normalised last-block patch features of the training images, each with its patch's label
histogram (share of the patch's labelled pixels in each class). Query: every patch of a validation image takes its
k = 30 most cosine-similar memory patches, mixes their histograms with softmax(cos / 0.02), the grid of mixed
label distributions is bilinearly upsampled to the image and argmax'd; the score is mIoU.

Memory subsampling (factor f): each image contributes ceil(P / f) of its P patches, preferring patches of the
classes that are rare within the image (Hummingbird's score: sum over the patch's classes of how many patches of
the image hold that class, times a uniform draw; the lowest scores are kept). The ranking is drawn once, so the
memory of a larger factor is a subset of a smaller factor's. Search is exact (torch), chunked over queries and
memory. Differences from the reference: no training-time augmentation of the memory images, ignore-labelled
pixels count for no class (the reference counts them as class 0), and the mIoU maps predictions to labels
directly (no Hungarian matching, which is the identity for a supervised label space).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from odis.eval.knn import chunked_topk
from odis.eval.segdata import IGNORE

DEFAULT_FACTORS = (1, 8, 64, 128)


def patch_histograms(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """[B,H,W] labels (IGNORE skipped) -> [B, gh*gw, C] per-patch class shares (all-zero for unlabelled patches)."""
    b, h, w = masks.shape
    gh, gw = grid
    ph, pw = h // gh, w // gw
    m = masks[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw).permute(0, 1, 3, 2, 4).reshape(b, gh * gw, -1)
    valid = m != IGNORE
    onehot = F.one_hot(torch.where(valid, m, 0), num_classes).float() * valid[..., None]
    counts = onehot.sum(2)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def memory_ranking(hist: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, its patches ordered by Hummingbird's sampling score (rare classes first; unlabelled last)."""
    present = (hist > 0).float()                        # [B, P, C]
    class_freq = present.sum(1, keepdim=True)           # patches per class, per image
    score = (present * class_freq).sum(-1)              # [B, P]
    score = score * torch.rand(score.shape, generator=generator)
    score[present.sum(-1) == 0] = float("inf")
    return score.argsort(dim=1)


@dataclass
class Memory:
    feats: torch.Tensor    # [M, D] L2-normalised
    labels: torch.Tensor   # [M, C] label histograms


def subsample(feats: torch.Tensor, hist: torch.Tensor, order: torch.Tensor, factor: int) -> Memory:
    """The memory of factor f from per-image features [B,P,D], histograms [B,P,C] and rankings [B,P]."""
    keep = max(1, math.ceil(feats.shape[1] / factor))
    idx = order[:, :keep]
    f = feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1])).reshape(-1, feats.shape[-1])
    h = hist.gather(1, idx[..., None].expand(-1, -1, hist.shape[-1])).reshape(-1, hist.shape[-1])
    labelled = h.sum(-1) > 0
    return Memory(F.normalize(f[labelled].float(), dim=-1), h[labelled])


def retrieve_labels(query: torch.Tensor, memory: Memory, k: int = 30, beta: float = 0.02,
                    query_chunk: int = 4096, memory_chunk: int = 65536) -> torch.Tensor:
    """Soft labels [Q, C] of query patch features [Q, D]: softmax(cos / beta) over the k nearest memory patches."""
    q = F.normalize(query.float(), dim=-1)
    out = []
    for start in range(0, q.shape[0], query_chunk):
        sims, idx = chunked_topk(q[start:start + query_chunk], memory.feats, k, memory_chunk)
        w = torch.softmax(sims / beta, dim=1)
        out.append(torch.einsum("qk,qkc->qc", w, memory.labels[idx.to(memory.labels.device)].to(q.device)))
    return torch.cat(out)


def upsample_predict(soft: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[B, gh*gw, C] soft labels -> [B, H, W] label map (bilinear upsampling, then argmax)."""
    b, _, c = soft.shape
    maps = soft.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False).argmax(1)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] counts (rows: truth, cols: prediction) over the pixels whose truth is not IGNORE."""
    valid = target != IGNORE
    t, p = target[valid].long(), pred[valid].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def miou(conf: torch.Tensor) -> tuple[float, list[float | None]]:
    """Mean IoU over the classes that occur in truth or prediction (others are None)."""
    conf = conf.double()
    tp = conf.diag()
    denom = conf.sum(0) + conf.sum(1) - tp
    ious = [float(tp[i] / denom[i]) if denom[i] > 0 else None for i in range(conf.shape[0])]
    present = [v for v in ious if v is not None]
    return (float(np.mean(present)) if present else 0.0), ious


def dense_nn_from_features(train_feats, train_hist, val_feats, val_masks, grid, num_classes, factors=DEFAULT_FACTORS,
                           k: int = 30, beta: float = 0.02, seed: int = 0, query_chunk: int = 4096,
                           memory_chunk: int = 65536, device: str = "cpu") -> list[dict]:
    """mIoU for every memory factor, from precomputed patch features (the search runs on `device`).

    train_feats [B,P,D], train_hist [B,P,C]; val_feats [V,P,D]; val_masks [V,H,W] (labels, IGNORE skipped).
    """
    order = memory_ranking(train_hist, torch.Generator().manual_seed(seed))
    v, p, d = val_feats.shape
    results = []
    for factor in factors:
        memory = subsample(train_feats, train_hist, order, factor)
        memory = Memory(memory.feats.to(device), memory.labels.to(device))
        soft = retrieve_labels(val_feats.reshape(-1, d).to(device), memory, k, beta, query_chunk, memory_chunk).cpu()
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for i in range(v):  # upsample one image at a time: C x H x W floats each
            pred = upsample_predict(soft[i * p:(i + 1) * p][None], grid, tuple(val_masks.shape[-2:]))
            conf += confusion(pred[0], val_masks[i], num_classes)
        m, ious = miou(conf)
        results.append({"factor": factor, "memory_size": int(memory.feats.shape[0]), "mIoU": 100.0 * m,
                        "k": min(k, memory.feats.shape[0]), "per_class_iou": ious})
    return results


# ---- with a backbone ----------------------------------------------------------------------------------------

def seg_batches(dataset, size: int, batch_size: int):
    """(images [B,3,S,S] normalised, masks [B,S,S]) resized to size x size (image bicubic, mask nearest)."""
    from odis.eval.features import _to_tensor, normalize

    for start in range(0, len(dataset), batch_size):
        imgs, masks = [], []
        for i in range(start, min(start + batch_size, len(dataset))):
            _, img, mask = dataset[i]
            imgs.append(normalize(_to_tensor(img.resize((size, size), resample=3))))
            m = torch.from_numpy(mask.astype(np.int64))[None, None].float()
            masks.append(F.interpolate(m, size=(size, size), mode="nearest")[0, 0].long())
        yield torch.stack(imgs), torch.stack(masks)


@torch.inference_mode()
def patch_features_of(model, dataset, size: int, batch_size: int = 16, device: str = "cpu", desc: str = "patches"):
    """Last-block patch features [N, P, D] (after the final norm, float16) and masks [N, S, S] of a SegDataset."""
    from tqdm import tqdm

    model.eval().to(device)
    feats, masks = [], []
    for x, m in tqdm(seg_batches(dataset, size, batch_size), total=math.ceil(len(dataset) / batch_size),
                     desc=desc, unit="batch"):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            _, patches = model(x.to(device))
        feats.append(patches.half().cpu())  # stored in half precision: all patches of the memory set are kept
        masks.append(m)
    return torch.cat(feats), torch.cat(masks)


def dense_nn_eval(model, train_ds, val_ds, size: int = 512, factors=DEFAULT_FACTORS, k: int = 30,
                  beta: float = 0.02, batch_size: int = 16, device: str = "cpu", seed: int = 0) -> list[dict]:
    """The Hummingbird evaluation of a backbone: memory from `train_ds`, mIoU on `val_ds`, one row per factor."""
    patch = model.patch_size
    grid = (size // patch, size // patch)
    tf, tm = patch_features_of(model, train_ds, size, batch_size, device, "memory")
    th = patch_histograms(tm, grid, train_ds.num_classes)
    del tm
    vf, vm = patch_features_of(model, val_ds, size, batch_size, device, "queries")
    return dense_nn_from_features(tf, th, vf, vm, grid, train_ds.num_classes, factors, k, beta, seed,
                                  device=device)
