"""Linear semantic segmentation on frozen patch features (the Leopart / NeCo `linear_finetune.py` protocol, the one
behind the linear-segmentation numbers of Hummingbird-style dense evaluations).

The backbone is frozen; its last-block patch tokens after the final norm (the OBJ/CLS row dropped) form a
[D, gh, gw] grid; a 1x1 convolution (one linear layer per patch, D -> classes) gives class logits, bilinearly
upsampled to the 100 x 100 label grid; cross-entropy with the ignore label 255. SGD lr 0.01, momentum 0.9, weight
decay 1e-4, StepLR(gamma 0.1) at epoch 20 (so never, with 20 epochs), batch 128, input 448. Training views:
RandomResizedCrop(448, scale 0.8-1, ratio 3/4-4/3) and a horizontal flip of image and mask together; validation:
resize to 448 x 448 (image bicubic, mask nearest, as `odis.eval.dense.seg_batches`), the mask nearest-downsampled
to 100 x 100, argmax, mIoU over the classes present in truth or prediction (`odis.eval.dense.miou`).

The reference interpolates the *features* to 100 x 100 and applies the head there; a 1x1 convolution commutes with
bilinear interpolation (whose weights sum to one), so the head is applied on the patch grid and the *logits* are
upsampled: the same numbers, with C instead of D channels upsampled.

`augment=False` extracts the training features once (one resize, no crop/flip) and trains the head on the cached
grids: one backbone pass instead of `epochs`, at N * D * gh * gw * 2 bytes of memory (float16).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from odis.eval.dense import confusion, miou, seg_batches
from odis.eval.segdata import IGNORE

CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> (grid [B,D,gh,gw], mask [B,m,m])


# ---- the head on feature grids (no backbone) ------------------------------------------------------------------

def new_head(dim: int, num_classes: int, seed: int = 0) -> nn.Conv2d:
    """The 1x1 convolution head, PyTorch's default initialisation drawn from `seed` (the global RNG is left as is)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Conv2d(dim, num_classes, kernel_size=1)


def head_logits(head: nn.Module, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, D, gh, gw] features -> [B, C, H, W] logits: the head per patch, then bilinear upsampling."""
    logits = head(grid.float())
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W] labels -> [B, size, size] (nearest)."""
    if tuple(masks.shape[-2:]) == (size, size):
        return masks.long()
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def train_head(head: nn.Module, batches: Batches, epochs: int, lr: float = 0.01, momentum: float = 0.9,
               weight_decay: float = 1e-4, drop_at: int = 20, gamma: float = 0.1, device: str = "cpu",
               progress: bool = True, total: int | None = None) -> list[float]:
    """Train `head` in place with SGD + StepLR (stepped per epoch) on `batches(epoch)`; the mean loss per epoch.

    A batch whose pixels are all ignored is skipped (its loss would be NaN)."""
    from tqdm import tqdm

    head.to(device).train()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=drop_at, gamma=gamma)
    losses = []
    epochs_bar = tqdm(range(epochs), desc="linear head", unit="epoch", disable=not progress)
    for epoch in epochs_bar:
        total_loss, n = 0.0, 0
        bar = tqdm(batches(epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", total=total,
                   disable=not progress, leave=False)
        for grid, masks in bar:
            grid, masks = grid.to(device), masks.to(device).long()
            if not (masks != IGNORE).any():
                continue
            loss = F.cross_entropy(head_logits(head, grid, tuple(masks.shape[-2:])), masks, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss, n = total_loss + loss.item(), n + 1
            bar.set_postfix(loss=f"{total_loss / n:.4f}")
        sched.step()
        losses.append(total_loss / n if n else float("nan"))
        epochs_bar.set_postfix(loss=f"{losses[-1]:.4f}")
    head.eval()
    return losses


@torch.no_grad()
def head_confusion(head: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   device: str = "cpu") -> torch.Tensor:
    """[C, C] confusion of the head's argmax against masks, over (grid, mask) batches (logits upsampled to the
    mask's size)."""
    head.to(device).eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for grid, masks in batches:
        pred = head_logits(head, grid.to(device), tuple(masks.shape[-2:])).argmax(1).cpu()
        conf += confusion(pred, masks.long(), num_classes)
    return conf


def scores(conf: torch.Tensor) -> dict:
    """mIoU (percent), pixel accuracy (percent) and per-class IoU of a confusion matrix."""
    m, ious = miou(conf)
    total = int(conf.sum())
    acc = 100.0 * float(conf.diag().sum()) / total if total else 0.0
    return {"mIoU": 100.0 * m, "pixel_accuracy": acc, "per_class_iou": ious, "pixels": total}


# ---- with a backbone ------------------------------------------------------------------------------------------

def backbone_grid(model, x: torch.Tensor, device: str) -> torch.Tensor:
    """Frozen last-block patch tokens of images [B,3,S,S] as a [B, D, gh, gw] float32 grid (bf16 autocast on GPU)."""
    b, _, h, w = x.shape
    gh, gw = h // model.patch_size, w // model.patch_size
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                                         enabled=str(device).startswith("cuda")):
        _, patches = model(x.to(device, non_blocking=True))
    return patches.float().reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()


def crop_params(width: int, height: int, generator: torch.Generator, scale=CROP_SCALE,
                ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop, torchvision's algorithm with the draws from `generator`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre crop of the ratio range's nearest aspect
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class AugmentedSeg(torch.utils.data.Dataset):
    """Training views of a SegDataset: RandomResizedCrop + horizontal flip of image and mask together; item
    `epoch * N + i` is image i's view in that epoch, drawn from (seed, epoch, i) alone, so the views do not depend
    on the number of loader processes."""

    def __init__(self, dataset, size: int, mask_size: int, seed: int = 0):
        self.dataset, self.size, self.mask_size, self.seed = dataset, size, mask_size, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from odis.eval.features import _to_tensor, normalize

        epoch, i = divmod(int(k), len(self.dataset))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
        _, img, mask = self.dataset[i]
        top, left, h, w = crop_params(img.width, img.height, g)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), resample=Image.BICUBIC)
        m = torch.from_numpy(mask[top:top + h, left:left + w].astype(np.int64))
        m = resize_masks(resize_masks(m[None], self.size), self.mask_size)[0]  # to the input, then the label grid
        x = normalize(_to_tensor(img))
        if torch.rand(1, generator=g).item() < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        return x, m.to(torch.uint8)


def augmented_batches(model, dataset, size: int, mask_size: int, batch_size: int, seed: int, workers: int,
                      device: str) -> Batches:
    """epoch -> (grid, mask) batches of fresh training views, shuffled per epoch (seeded), through the backbone."""
    views = AugmentedSeg(dataset, size, mask_size, seed)
    n = len(dataset)
    # the datasets' mask functions are closures: workers are forked where fork is the safe choice (Linux), as a
    # forkserver/spawn default (Python 3.14, macOS) would have to pickle them
    context = "fork" if workers and sys.platform.startswith("linux") else None

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)) + epoch * n
        loader = torch.utils.data.DataLoader(views, batch_size=batch_size, sampler=order.tolist(),
                                             num_workers=workers, pin_memory=str(device).startswith("cuda"),
                                             multiprocessing_context=context)
        for x, m in loader:
            yield backbone_grid(model, x, device), m

    return batches


def cached_batches(model, dataset, size: int, mask_size: int, batch_size: int, seed: int, device: str,
                   progress: bool = True) -> Batches:
    """epoch -> shuffled (grid, mask) batches of training features extracted once (plain resize, float16)."""
    from tqdm import tqdm

    grids, masks = [], []
    for x, m in tqdm(seg_batches(dataset, size, batch_size), total=math.ceil(len(dataset) / batch_size),
                     desc="train features", unit="batch", disable=not progress):
        grids.append(backbone_grid(model, x, device).half().cpu())
        masks.append(resize_masks(m, mask_size).to(torch.uint8))
    grids, masks = torch.cat(grids), torch.cat(masks)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(grids), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield grids[idx], masks[idx]

    return batches


def val_batches(model, dataset, size: int, mask_size: int, batch_size: int, device: str, progress: bool = True,
                desc: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(grid, mask at mask_size) of each validation batch (resize to size x size, as the dense evaluator)."""
    from tqdm import tqdm

    for x, m in tqdm(seg_batches(dataset, size, batch_size), total=math.ceil(len(dataset) / batch_size),
                     desc=desc, unit="batch", disable=not progress):
        yield backbone_grid(model, x, device), resize_masks(m, mask_size)


def evaluate_head(model, head: nn.Module, dataset, size: int, mask_size: int = 100, batch_size: int = 16,
                  device: str = "cpu", progress: bool = True, desc: str = "val") -> dict:
    """mIoU etc. of a trained head on a SegDataset (`mask_size` 0: at the input size)."""
    model.eval().to(device)
    batches = val_batches(model, dataset, size, mask_size or size, batch_size, device, progress, desc)
    return scores(head_confusion(head, batches, dataset.num_classes, device))


def linear_seg_eval(model, train_ds, val_ds, size: int = 448, epochs: int = 20, lr: float = 0.01,
                    momentum: float = 0.9, weight_decay: float = 1e-4, drop_at: int = 20, batch_size: int = 128,
                    mask_size: int = 100, augment: bool = True, workers: int = 2, device: str = "cpu",
                    seed: int = 0, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a linear head on `train_ds` over the frozen backbone, score it on `val_ds`: (head, result)."""
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError(f"linear segmentation needs training and validation images, got {len(train_ds)} and "
                         f"{len(val_ds)}")
    if train_ds.num_classes != val_ds.num_classes:
        raise ValueError(f"the training split has {train_ds.num_classes} classes, the validation split "
                         f"{val_ds.num_classes}")
    mask_size = mask_size or size
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if augment:
        batches = augmented_batches(model, train_ds, size, mask_size, batch_size, seed, workers, device)
    else:
        batches = cached_batches(model, train_ds, size, mask_size, batch_size, seed, device, progress)
    head = new_head(model.embed_dim, train_ds.num_classes, seed)
    losses = train_head(head, batches, epochs, lr, momentum, weight_decay, drop_at, device=device,
                        progress=progress, total=math.ceil(len(train_ds) / batch_size))
    result = evaluate_head(model, head, val_ds, size, mask_size, batch_size, device, progress)
    return head, {**result, "train_loss": losses, "mask_size": mask_size}
