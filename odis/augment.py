"""Photometric augmentation + normalisation, batched on the training device (torch; CPU or CUDA).

The reference DINO/iBOT pipeline applies ColorJitter, RandomGrayscale, GaussianBlur and Solarize per image in PIL;
it is the loader's wall (43 img/s per core). Here each op runs once per batch with per-image random parameters,
with the same distributions and order:

    ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, its four ops in a random order per image (as torchvision)
    -> Grayscale p=0.2 -> GaussianBlur sigma ~ U(0.1, 2.0) with the view's p -> Solarize (threshold 128) with the
    view's p -> Normalize (ImageNet mean/std).

Per-view probabilities are DINO's: global view 1 blur 1.0; global view 2 blur 0.1 + solarize 0.2; locals blur 0.5.
(DINOv2's data/transforms.py passes keep_p = 1 - p to RandomApply, so there global view 1 is never blurred and
global view 2 is blurred 90% of the time: a known bug, dinov2 PR #411. We follow DINO/iBOT, not that.)

Ops work on float images in [0, 1] and match torchvision.transforms.functional on float tensors. The reference
PIL pipeline rounds to uint8 between ops; we do not (differences below 1/255 per op).
Random parameters are drawn on the CPU from a `torch.Generator`, so a seed gives the same augmentation on any
device; only the parameter vectors (a few numbers per image) move to the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of training and of every evaluator
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2, as PIL's "L")
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(threshold=128): values >= 128 are inverted


@dataclass(frozen=True)
class ViewAug:
    blur_p: float
    solarize_p: float = 0.0
    jitter_p: float = 0.8
    gray_p: float = 0.2
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    sigma: tuple[float, float] = (0.1, 2.0)


GLOBAL1 = ViewAug(blur_p=1.0)
GLOBAL2 = ViewAug(blur_p=0.1, solarize_p=0.2)
LOCAL = ViewAug(blur_p=0.5)

# Kernel size for sigma <= 2: radius 3 sigma = 6 px each side. One size for every image so that the per-image
# kernels run as one grouped convolution.
BLUR_KERNEL = 13


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] -> [N,1,H,W] luma."""
    return GRAY[0] * x[:, 0:1] + GRAY[1] * x[:, 1:2] + GRAY[2] * x[:, 2:3]


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(f)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(f)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_image(f)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by f (in turns), as torchvision's RGB -> HSV -> shift -> RGB, in closed form.

    HSV keeps V = max and V - V*S = min, so only the hue moves: with h6 = 6 * hue in [0, 6) (torchvision's
    piecewise formula: (g-b)/c, 2+(b-r)/c, 4+(r-g)/c for max = r, g, b; 0 for grey) and k = (n + h6 + 6f) mod 6,
    channel n in (5, 3, 1) becomes max - (max - min) * clamp(min(k, 4 - k), 0, 1). 4x fewer passes over the
    image than the HSV round trip; equal to torchvision within float rounding.
    """
    maxc, _ = x.max(dim=1, keepdim=True)
    minc, _ = x.min(dim=1, keepdim=True)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    cr = maxc - minc
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, b - r + 2.0 * cr, r - g + 4.0 * cr))
    h6 = num / torch.where(cr == 0, torch.ones_like(cr), cr)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6 + 6.0 * f.view(-1, 1, 1, 1), 6.0)
    return (maxc - cr * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)).clamp_(0, 1)


def to_grayscale3(x: torch.Tensor) -> torch.Tensor:
    return grayscale(x).expand(-1, 3, -1, -1).contiguous()


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_kernels(sigma: torch.Tensor, size: int = BLUR_KERNEL) -> torch.Tensor:
    """[N] sigmas -> [N, size] normalised 1-D kernels (torchvision's _get_gaussian_kernel1d, per image)."""
    half = (size - 1) * 0.5
    t = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int = BLUR_KERNEL) -> torch.Tensor:
    """Per-image Gaussian blur: separable, one grouped conv per axis, reflect padding (as torchvision)."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma.to(x.dtype), size).repeat_interleave(c, dim=0)  # [N*C, size]
    pad = size // 2
    y = x.reshape(1, n * c, h, w)
    mode = "reflect" if min(h, w) > pad else "replicate"
    y = F.pad(y, (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, k.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def draw_params(n: int, aug: ViewAug, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """All random numbers for n images, on the CPU (a fixed number of draws per call: reproducible)."""
    def u(lo, hi):
        return torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo

    return {
        "jitter": torch.rand(n, generator=generator) < aug.jitter_p,
        "order": torch.argsort(torch.rand(n, 4, generator=generator), dim=1),  # a random permutation per image
        "brightness": u(max(0.0, 1 - aug.brightness), 1 + aug.brightness),
        "contrast": u(max(0.0, 1 - aug.contrast), 1 + aug.contrast),
        "saturation": u(max(0.0, 1 - aug.saturation), 1 + aug.saturation),
        "hue": u(-aug.hue, aug.hue),
        "gray": torch.rand(n, generator=generator) < aug.gray_p,
        "blur": torch.rand(n, generator=generator) < aug.blur_p,
        "sigma": u(*aug.sigma),
        "solarize": torch.rand(n, generator=generator) < aug.solarize_p,
    }


_JITTER_OPS = (("brightness", adjust_brightness), ("contrast", adjust_contrast),
               ("saturation", adjust_saturation), ("hue", adjust_hue))


def apply_params(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float [N,3,H,W] in [0,1] -> augmented float in [0,1] (not normalised). Ops run on the selected subsets.

    `p` stays on the CPU: the subsets are found there and their indices and factors travel in one copy each, split
    on the device by sizes known on the host, so the device never waits for a host sync."""
    plan = []  # (fn, CPU indices, factor name or None), in the order the ops apply
    for step in range(4):  # torchvision ColorJitter: fn_idx = randperm(4), per image here
        for op_id, (name, fn) in enumerate(_JITTER_OPS):
            plan.append((fn, p["jitter"] & (p["order"][:, step] == op_id), name))
    plan += [(to_grayscale3, p["gray"], None), (gaussian_blur, p["blur"], "sigma"), (solarize, p["solarize"], None)]
    plan = [(fn, torch.nonzero(which.cpu()).flatten(), name) for fn, which, name in plan]
    plan = [step for step in plan if step[1].numel()]
    if not plan:
        return x
    sizes = [len(idx) for _, idx, _ in plan]
    idx_dev = torch.cat([idx for _, idx, _ in plan]).to(x.device, non_blocking=True).split(sizes)
    fac = torch.cat([p[name][idx].double() if name else torch.zeros(len(idx), dtype=torch.float64)
                     for _, idx, name in plan])
    fac_dev = fac.to(x.device, x.dtype, non_blocking=True).split(sizes)
    for (fn, _, name), i, f in zip(plan, idx_dev, fac_dev):
        x[i] = fn(x[i], f) if name else fn(x[i])
    return x


def photometric(images: torch.Tensor, aug: ViewAug | list[tuple[int, ViewAug]], generator: torch.Generator,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N,3,H,W] (any device) -> augmented, ImageNet-normalised float [N,3,H,W] on the same device.

    `aug` is one ViewAug for all N images, or consecutive chunks [(n1, aug1), (n2, aug2), ...] summing to N (both
    global views in one call: fewer kernel launches; the same random draws as one call per chunk)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"photometric expects uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    chunks = [(n, aug)] if isinstance(aug, ViewAug) else list(aug)
    if sum(c for c, _ in chunks) != n:
        raise ValueError(f"photometric: chunks {[c for c, _ in chunks]} do not add up to {n} images")
    drawn = [draw_params(c, a, generator) for c, a in chunks]
    params = {k: torch.cat([d[k] for d in drawn]) for k in drawn[0]}
    if n == 0:
        return images.to(dtype)
    x = images.to(dtype).div_(255.0)
    return normalize(apply_params(x, params))


def augment_batch(batch: dict, device, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch's crops to `device` and apply the photometric augmentation with DINO's per-view probabilities.

    Returns (global [2B,3,G,G], local [n_local*B,3,Ls,Ls]) float32, ImageNet-normalised, view-major.
    `generator` is a CPU torch.Generator (parameters are drawn on the CPU; see odis.augment).
    """
    g = batch["global"].to(device, non_blocking=True)
    glob = photometric(g.flatten(0, 1), [(g.shape[1], GLOBAL1), (g.shape[1], GLOBAL2)], generator)
    loc = batch["local"].to(device, non_blocking=True).flatten(0, 1)
    return glob.contiguous(), photometric(loc, LOCAL, generator).contiguous()
