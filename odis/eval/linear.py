"""Linear probes on frozen, cached features (DINO / iBOT protocol, without the training augmentation).

The reference trains `Linear(concat of the last 4 blocks' CLS)` for ViT-S with SGD (momentum 0.9, no weight
decay, cosine to 0, init N(0, 0.01)) and, in iBOT, sweeps the learning rate and reports the best on val. Here the
features are extracted once (Resize 256 / CenterCrop 224, no RandomResizedCrop+flip: that is the one deviation,
it makes a probe a matter of seconds) and one linear layer per learning rate trains in the same loop.
Few-shot settings (`shots` per class, or a stratified `fraction` of the training set) are averaged over seeds.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from odis.eval.settings import DEFAULT_LRS



def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` images per class (all of a class that has fewer), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(out))


def fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-stratified `fraction` of the images (at least one per class), drawn with `seed`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(rng.permutation(idx)[:max(1, math.ceil(fraction * len(idx)))])
    return np.sort(np.concatenate(out))


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, lrs=DEFAULT_LRS,
                 epochs: int = 100, batch_size: int = 256, min_steps: int = 300, seed: int = 0,
                 device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One linear classifier per learning rate, trained together. Returns weights [L, D, C] and biases [L, C]."""
    g = torch.Generator().manual_seed(seed)
    n, d = train_x.shape
    lrs_t = torch.tensor(lrs, dtype=torch.float32, device=device).view(-1, 1, 1)
    w = (torch.randn(len(lrs), d, num_classes, generator=g) * 0.01).to(device).requires_grad_()
    b = torch.zeros(len(lrs), num_classes, device=device, requires_grad=True)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(epochs * steps_per_epoch, min_steps)
    x_all, y_all = train_x.to(device).float(), train_y.to(device).long()
    step = 0
    while step < total:
        for idx in torch.randperm(n, generator=g).split(batch_size):
            if step >= total:
                break
            x, y = x_all[idx.to(device)], y_all[idx.to(device)]
            logits = torch.einsum("nd,ldc->lnc", x, w) + b[:, None, :]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, num_classes), y.repeat(len(lrs)),
                                                     reduction="sum") / len(y)
            gw, gb = torch.autograd.grad(loss, (w, b))
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine to 0
            with torch.no_grad():  # SGD with momentum 0.9, no weight decay, one lr per classifier
                mw.mul_(0.9).add_(gw)
                mb.mul_(0.9).add_(gb)
                w.sub_(lrs_t * scale * mw)
                b.sub_(lrs_t[:, :, 0] * scale * mb)
            step += 1
    return w.detach(), b.detach()


@torch.no_grad()
def accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Top-1 accuracy (percent) of each of the L classifiers -> [L]."""
    correct = torch.zeros(w.shape[0])
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk].to(w.device).float()
        pred = (torch.einsum("nd,ldc->lnc", xb, w) + b[:, None, :]).argmax(-1).cpu()
        correct += (pred == y[start:start + chunk].long()[None]).sum(1)
    return 100.0 * correct / x.shape[0]


def probe(train_x, train_y, val_x, val_y, num_classes: int, lrs=DEFAULT_LRS, epochs: int = 100,
          batch_size: int = 256, seed: int = 0, device: str = "cpu") -> dict:
    """Train the lr sweep, report every lr's val top-1 and the best (iBOT's selection on val)."""
    w, b = train_linear(train_x, train_y, num_classes, lrs, epochs, batch_size, seed=seed, device=device)
    acc = accuracy(w, b, val_x, val_y)
    best = int(acc.argmax())
    return {"top1": float(acc[best]), "best_lr": float(lrs[best]),
            "per_lr": {f"{lr:g}": float(a) for lr, a in zip(lrs, acc)}, "n_train": int(train_x.shape[0])}


def probe_settings(train_x, train_y, val_x, val_y, num_classes: int, shots=(), fractions=(), seeds=(0,),
                   full: bool = True, **kw) -> list[dict]:
    """The full-data probe plus every few-shot setting, each averaged over `seeds` (mean and std of top-1)."""
    settings = ([("full", None)] if full else []) + [(f"{s}-shot", ("shots", s)) for s in shots] \
        + [(f"{f:g}-fraction", ("fraction", f)) for f in fractions]
    out = []
    labels_np = train_y.numpy()
    for name, how in settings:
        runs = []
        for seed in (seeds if how else seeds[:1]):
            if how is None:
                idx = np.arange(len(labels_np))
            elif how[0] == "shots":
                idx = few_shot_indices(labels_np, how[1], seed)
            else:
                idx = fraction_indices(labels_np, how[1], seed)
            idx_t = torch.from_numpy(idx)
            runs.append(probe(train_x[idx_t], train_y[idx_t], val_x, val_y, num_classes, seed=seed, **kw))
        top1 = np.array([r["top1"] for r in runs])
        out.append({"setting": name, "top1": float(top1.mean()), "top1_std": float(top1.std()),
                    "seeds": [int(s) for s in (seeds if how else seeds[:1])], "runs": runs})
    return out
