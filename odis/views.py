"""Object-aware multi-crop (ODIS) and the plain multi-crop of iBOT/DINO, per sample, on uint8 numpy images.

Geometry only: crops, resizes, flips, the object mask on each global view's patch grid and the iBOT block masks.
Photometric augmentation runs later, batched on the training device (odis/augment.py), because the reference
per-image PIL pipeline is the loader's bottleneck. The options of the views, their defaults and their ranges live
in `ViewSettings`; the trainer's `data.*` config inherits them.

The box follows the pixels exactly: a view is `Crop(top, left, height, width, out, out, flip)` of the source image;
the pixels are resampled with cv2 (whose pixel-centre convention maps source x to `(x - left) * out / width`, the
same map as `Crop.apply`) and flipped; the box goes through `Crop.apply`.

"Contains the object" (ViewSettings.min_visible): at least that share of the box lies in the crop, or the
object fills at least that share of the crop (see `contains_object`). An image without boxes uses the whole image
as its box, so every crop contains it and its OBJ token sees the whole view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import cv2
import numpy as np

from odis.boxes import BOX_SAMPLINGS, EMPTY_AREA, Crop, box_to_patch_mask, sample_box
from odis.choices import METHODS, check_choice
from odis.masking import BlockMasker

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision default, used by DINO/iBOT)


def random_resized_crop(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], out_size: int,
                        rng: np.random.Generator, flip_p: float = 0.5) -> Crop:
    """torchvision's `RandomResizedCrop.get_params` (10 tries, then a centre crop) plus a horizontal flip."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        # one call for the five numbers of a try (scale, log-ratio, top, left, flip): this runs ~15 times per image
        u = rng.random(5).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(u[2] * (h - ch + 1))  # uniform over 0..h-ch, like randint(0, h - ch + 1)
            left = int(u[3] * (w - cw + 1))
            return Crop(top, left, ch, cw, out_size, out_size, u[4] < flip_p)
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return Crop((h - ch) // 2, (w - cw) // 2, ch, cw, out_size, out_size, bool(rng.random() < flip_p))


def contains_object(crop: Crop, box, min_visible: float) -> bool:
    """The view holds the object: >= min_visible of the box lies in the crop, or the object fills >= min_visible
    of the crop. The second clause matters for boxes larger than any crop can hold (the whole-image box of an
    image without boxes, a large object with a small crop scale): there the crop lies inside the object.
    (Plain float arithmetic: this runs up to 20 times per view in the loader's hot loop.)"""
    x0, y0, x1, y1 = (float(v) for v in box)
    area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    if area <= EMPTY_AREA:
        return False
    iw = min(x1, crop.left + crop.width) - max(x0, crop.left)
    ih = min(y1, crop.top + crop.height) - max(y0, crop.top)
    inside = max(iw, 0.0) * max(ih, 0.0)
    return inside >= min_visible * area or inside >= min_visible * crop.height * crop.width


def object_aware_crop(h: int, w: int, box: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float],
                      out_size: int, max_tries: int, min_visible: float,
                      rng: np.random.Generator) -> tuple[Crop, bool]:
    """Redraw RandomResizedCrop up to `max_tries` times until the crop contains the box (ODIS).

    Returns (crop, found). On failure the last draw is returned with found=False: the caller marks the view's
    object as invalid (empty OBJ mask, excluded from L_OBJ) and counts the fallback.
    """
    box = [float(v) for v in box]
    crop = None
    for _ in range(max(1, max_tries)):
        crop = random_resized_crop(h, w, scale, ratio, out_size, rng)
        if contains_object(crop, box, min_visible):
            return crop, True
    return crop, False


def render(image: np.ndarray, crop: Crop, out: np.ndarray | None = None) -> np.ndarray:
    """The view `crop` of an HWC uint8 image: cut, resize to (out_h, out_w), flip. Returns CHW (a transposed view
    of HWC memory; `out`, if given, is the contiguous [out_h, out_w, 3] buffer written in place).

    Bilinear resampling maps output pixel centres to source coordinates exactly as `Crop.apply` maps boxes, flip
    included: cv2.resize for integer crops shrunk by less than 2x, else one `cv2.warpAffine` (exact for fractional
    crops too). Shrinking by f >= 2 first averages k x k blocks (k = floor(f), cv2 INTER_AREA's fast integer
    path) so that every source pixel still contributes (no aliasing from skipped pixels); bilinear then covers
    the remaining factor f / k < 2. PIL's bicubic resize in the reference is smoother still, and slower.
    """
    H, W = image.shape[:2]
    t, l, ch, cw = crop.top, crop.left, crop.height, crop.width
    if out is None:
        out = np.empty((crop.out_h, crop.out_w, 3), np.uint8)
    k = int(min(ch / crop.out_h, cw / crop.out_w))
    integral = all(float(v).is_integer() for v in (t, l, ch, cw))
    if k < 2 and integral:
        # The common case (RandomResizedCrop's integer crops): cv2.resize maps pixel centres the same way, faster
        # than warpAffine; it replicates the crop's own edge pixels where bilinear needs a neighbour.
        src = image[int(t):int(t + ch), int(l):int(l + cw)]
        if crop.flip:
            cv2.flip(cv2.resize(src, (crop.out_w, crop.out_h), interpolation=cv2.INTER_LINEAR), 1, dst=out)
        else:
            cv2.resize(src, (crop.out_w, crop.out_h), dst=out, interpolation=cv2.INTER_LINEAR)
        return out.transpose(2, 0, 1)
    if k >= 2:
        t0, l0 = int(t), int(l)
        hh = min(-(-int(math.ceil(t + ch - t0)) // k) * k, (H - t0) // k * k)
        ww = min(-(-int(math.ceil(l + cw - l0)) // k) * k, (W - l0) // k * k)
        src = cv2.resize(image[t0:t0 + hh, l0:l0 + ww], (ww // k, hh // k), interpolation=cv2.INTER_AREA)
    else:
        k, t0, l0, src = 1, 0, 0, image
    sx, sy = cw / (crop.out_w * k), ch / (crop.out_h * k)
    ox, oy = (l - l0) / k, (t - t0) / k
    if crop.flip:  # output x_d <- continuous X = out_w - (x_d + 0.5)
        row_x = [-sx, 0.0, ox + (crop.out_w - 0.5) * sx - 0.5]
    else:
        row_x = [sx, 0.0, ox + 0.5 * sx - 0.5]
    m = np.array([row_x, [0.0, sy, oy + 0.5 * sy - 0.5]])
    cv2.warpAffine(src, m, (crop.out_w, crop.out_h), dst=out, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                   borderMode=cv2.BORDER_REPLICATE)
    return out.transpose(2, 0, 1)




@dataclass
class ViewSettings:
    """The options of the views, with their defaults. trainer.config.DataConfig inherits them as `data.*`;
    `check` holds them to the ranges of VIEW_RULES, which the config's rules reuse."""

    box_sampling: str = "uniform"  # how one box per image is drawn: uniform | area
    global_size: int = 224  # pixels
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop's share of the image area
    local_scale: tuple[float, float] = (0.05, 0.25)
    max_crop_tries: int = 20  # object-aware crop: redraw until the crop contains the box
    min_visible: float = 0.5  # "contains the box": this share of the box's area lies inside the crop
    # odis only: draw the local crops object-aware too (each up to max_crop_tries times, until it holds the sampled
    # box or lies inside it), an option of the ODIS-derived code; off as in the paper. Why one might: every local's
    # token is distilled towards the teacher's OBJ token of one object, which an ordinary local crop may miss.
    local_object_aware: bool = False
    mask_prob: float = 0.5  # iBOT: half the images unmasked
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # the share of a masked image's patch grid
    # PMLC (paper Table 5): iBOT's block masks on the student's local views too, with L_PATCH on them against the
    # teacher's patches of the same (unmasked) local view; off in the final recipe.
    local_block_masking: bool = False
    # odis: the share of samples whose sampled box is the whole image (an unmasked OBJ row, as for IN1K's images
    # without a box), so that the OBJ token also learns the whole-image view it is evaluated with without a box
    whole_image_box_prob: float = 0.0

    def check(self) -> "ViewSettings":
        """This, or a ValueError naming the first setting outside its range."""
        for name, (text, ok) in VIEW_RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{name} must be {text}, got {value!r}")
        return self


_CROP_SCALE = ("[lo, hi] with 0 < lo <= hi <= 1 (shares of the image area)", lambda v: 0 < v[0] <= v[1] <= 1)

# Each ViewSettings field's range, as (what it "must be", the test); trainer/config.py's rules take them as data.*.
VIEW_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "box_sampling": ("|".join(BOX_SAMPLINGS), lambda v: v in BOX_SAMPLINGS),
    "global_size": (">= 1", lambda v: v >= 1),  # the trainer also asks for a multiple of the patch size
    "local_size": (">= 1", lambda v: v >= 1),
    "n_local": (">= 0", lambda v: v >= 0),  # 0: no local crops
    "global_scale": _CROP_SCALE,
    "local_scale": _CROP_SCALE,
    "max_crop_tries": (">= 1", lambda v: v >= 1),
    "min_visible": ("in (0, 1]", lambda v: 0 < v <= 1),  # 0 would count a crop beside the box as holding it
    "mask_prob": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "whole_image_box_prob": ("in [0, 1]", lambda v: 0 <= v <= 1),
    # all of the grid masked would leave the student nothing to see
    "mask_ratio": ("[lo, hi] with 0 <= lo <= hi < 1", lambda v: 0 <= v[0] <= v[1] < 1),
}
_TUPLES = ("global_scale", "local_scale", "mask_ratio")


@dataclass(init=False)
class ViewMaker(ViewSettings):
    """Per-sample views for `method` odis | ibot | dino (2 global + n_local local crops, masks) on a grid of
    `patch_size` pixels.

    `__call__(image HWC uint8, boxes [K,4] image pixels, rng)` returns a dict:
      global [2,3,G,G] uint8, local [n_local,3,L,L] uint8 (CHW views of HWC memory), obj_mask [2,gh,gw] bool,
      obj_valid [2] bool, mim_mask [2,gh,gw] bool, obj_box [2,4] float32 (the box in each global view's pixels),
      fallbacks int, crops / local_crops list[Crop] (the global and the local crops; not collated); with
      local_obj_masks (odis) also local_obj_mask [n_local,lg,lg] bool and local_obj_hit [n_local] bool, with
      local_block_masking (ibot/odis) local_mim_mask [n_local,lg,lg] bool; lg = local_size // patch_size.
    """

    patch_size: int = 16
    method: str = "odis"
    local_obj_masks: bool = False  # MALC (model.local_obj_attention): each local view's OBJ row masked too
    masker: BlockMasker = field(init=False, repr=False, compare=False)
    local_masker: BlockMasker | None = field(init=False, repr=False, compare=False)

    def __init__(self, settings: ViewSettings | None = None, patch_size: int = 16, method: str = "odis",
                 local_obj_masks: bool = False, **changes):
        """The views of `settings` (None: the defaults; a trainer DataConfig is a ViewSettings) with `changes` to
        some of them by name, e.g. `ViewMaker(global_size=64, n_local=2, patch_size=8)`. `local_obj_masks`: the
        box carried into each local crop as its OBJ mask (MALC; odis only)."""
        values = {f.name: getattr(settings, f.name) for f in fields(ViewSettings)} if settings is not None else {}
        values.update(changes)
        values.update({name: tuple(values[name]) for name in _TUPLES if name in values})
        ViewSettings.__init__(self, **values)
        self.check()
        self.patch_size, self.method = patch_size, check_choice("method", method, METHODS)
        self.masker = BlockMasker(self.grid, self.grid, self.mask_prob, self.mask_ratio)
        self.local_obj_masks = bool(local_obj_masks) and method == "odis"
        self.local_block_masking = self.local_block_masking and method != "dino"
        if (self.local_obj_masks or self.local_block_masking) and self.local_size % patch_size:
            raise ValueError(f"local_size {self.local_size} must be a multiple of the patch size {patch_size} "
                             "for masks on the local views")
        lg = self.local_size // patch_size
        self.local_masker = BlockMasker(lg, lg, self.mask_prob, self.mask_ratio) if self.local_block_masking \
            else None

    def _local_crop(self, h: int, w: int, box, rng: np.random.Generator) -> Crop:
        """An ordinary local crop, or with local_object_aware (odis) one that holds the sampled box."""
        ls = self.local_size
        if box is None or not self.local_object_aware:
            return random_resized_crop(h, w, self.local_scale, RATIO, ls, rng)
        return object_aware_crop(h, w, box, self.local_scale, RATIO, ls, self.max_crop_tries, self.min_visible,
                                 rng)[0]

    @property
    def grid(self) -> int:
        return self.global_size // self.patch_size

    def max_reduction(self, width: int, height: int) -> float:
        """The largest factor a width x height source can be shrunk by (e.g. JPEG draft decoding) while every crop
        any view can draw still has at least one source pixel per output pixel (is shrunk, never enlarged)."""
        area = width * height
        r = math.sqrt(self.global_scale[0] * area / max(RATIO)) / self.global_size
        if self.n_local:
            r = min(r, math.sqrt(self.local_scale[0] * area / max(RATIO)) / self.local_size)
        return r

    def __call__(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
                 out: dict | None = None) -> dict:
        """`out` may hold HWC destination buffers {"global": [2,G,G,3], "local": [n_local,L,L,3]} (e.g. slices of
        a batch in shared memory) that the crops are written into, saving a copy per view."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"ViewMaker expects an RGB uint8 HWC image, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        g, gh = self.global_size, self.grid
        box, crops, obj = self._global_crops(h, w, boxes, rng)
        # HWC buffers written in place; the CHW arrays handed out are transposed views (collate stacks HWC)
        ls = self.local_size
        views = out["global"] if out is not None else np.empty((2, g, g, 3), np.uint8)
        local = out["local"] if out is not None else np.empty((self.n_local, ls, ls, 3), np.uint8)
        for v, c in enumerate(crops):
            render(image, c, views[v])
        local_crops = [self._local_crop(h, w, box, rng) for _ in range(self.n_local)]
        for i, c in enumerate(local_crops):
            render(image, c, local[i])
        if self.method == "dino":
            mim = np.zeros((2, gh, gh), bool)
        else:
            mim = np.stack([self.masker(rng), self.masker(rng)])
        out = {"global": views.transpose(0, 3, 1, 2), "local": local.transpose(0, 3, 1, 2), **obj,
               "mim_mask": mim, "crops": crops, "local_crops": local_crops}
        if self.local_obj_masks:
            out["local_obj_mask"], out["local_obj_hit"] = self._local_obj_masks(box, local_crops)
        if self.local_masker is not None:  # drawn last: the views above are those of a run without it
            lg = self.local_size // self.patch_size
            out["local_mim_mask"] = np.stack([self.local_masker(rng) for _ in local_crops]) if local_crops \
                else np.zeros((0, lg, lg), bool)
        return out

    def _global_crops(self, h: int, w: int, boxes, rng: np.random.Generator) -> tuple:
        """(the sampled box or None, the 2 global crops, their OBJ fields): odis samples one box and crops both
        views around it; ibot/dino crop as iBOT does and leave the CLS row unmasked."""
        g, gh = self.global_size, self.grid
        obj = {"obj_mask": np.zeros((2, gh, gh), bool), "obj_valid": np.zeros(2, bool),
               "obj_box": np.zeros((2, 4), np.float32), "fallbacks": 0}
        if self.method != "odis":
            obj["obj_mask"][:] = True  # unused by ibot/dino: the CLS row is not masked
            obj["obj_valid"][:] = True
            obj["obj_box"][:] = (0, 0, g, g)
            return None, [random_resized_crop(h, w, self.global_scale, RATIO, g, rng) for _ in range(2)], obj
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        whole = not len(boxes) or (self.whole_image_box_prob > 0 and rng.random() < self.whole_image_box_prob)
        box = np.array([0, 0, w, h], float) if whole else boxes[sample_box(boxes, self.box_sampling, rng)]
        crops = []
        for v in range(2):
            crop, found = object_aware_crop(h, w, box, self.global_scale, RATIO, g, self.max_crop_tries,
                                            self.min_visible, rng)
            obj["fallbacks"] += not found
            vb = crop.apply(box)
            mask = box_to_patch_mask(vb, g, g, self.patch_size)
            obj["obj_valid"][v] = found and bool(mask.any())
            obj["obj_mask"][v] = mask if obj["obj_valid"][v] else False
            obj["obj_box"][v] = vb
            crops.append(crop)
        return box, crops, obj

    def _local_obj_masks(self, box: np.ndarray, crops: list[Crop]) -> tuple[np.ndarray, np.ndarray]:
        """The sampled box carried into each local crop as a patch mask; a crop that misses the box keeps an
        unmasked OBJ row (all True) and is marked in `hit`."""
        ls, lg = self.local_size, self.local_size // self.patch_size
        masks, hit = np.ones((len(crops), lg, lg), bool), np.zeros(len(crops), bool)
        for i, c in enumerate(crops):
            m = box_to_patch_mask(c.apply(box), ls, ls, self.patch_size)
            if m.any():
                masks[i], hit[i] = m, True
        return masks, hit
