"""Synthetic multi-object scenes with exact boxes: the paper's claim in miniature.

ODIS claims that object-level distillation beats image-level distillation on *objects* in multi-object scenes.
This module makes such scenes on a small budget: objects (MNIST digits, or ten procedurally drawn shapes so that
no download is needed) composited onto textured backgrounds, with controllable count, scale, overlap and clutter.

Design (what a scene is):
- One object per scene is the **target**. Its class is the image-level label (the class folder on disk), so the
  image label is ambiguous whenever distractors are present. By default the distractors' classes all differ from
  the target's (`distractors="other"`): the image holds several classes and only a box says which one is meant —
  the case where box-conditioned features (the OBJ token masked to the target's box) should help.
- The target is the **largest** object by box area (strictly; distractors are shrunk until smaller), is placed fully
  inside the image and drawn **last**, on top, so it is never occluded. Evaluators that pick "the largest box"
  (odis eval's default) therefore pick the target; the COCO JSON also marks it (`"target": 1`) and lists it first.
- Boxes are exact: the tight box of the object's ink/alpha mask (> 0) after placement, clipped to the image.
  Boxes and masks are amodal: a distractor partly covered by a later object keeps its full box and mask.
- Overlap: the IoU of every pair of object boxes is at most `max_iou` (rejection sampling; a distractor that fits
  nowhere after shrinking is dropped and counted, never placed against the rule).
- Clutter in [0, 1]: 0 is a plain uniform background; more adds low-frequency colour texture, pixel noise and
  unannotated strokes (all drawn *under* the objects so boxes stay exact).
- Photo backgrounds (`PhotoBackgrounds`, `odis synth --backgrounds DIR`): a random crop of a photo instead of the
  drawn background (clutter then adds only the noise and strokes), so that an untrained network already tells
  scenes apart as it does photos, and a scene-level feature has a background to latch onto. Train and val crop
  disjoint photos (a seed-fixed 80/20 split of the folder).
- MNIST train and val scenes draw digits from disjoint pools (a seed-fixed 80/20 split of the MNIST file), so val
  objects are unseen instances.
- Deterministic: scene i of a split uses `np.random.default_rng([seed, split_code, i])`, independent of order.

The scenes are written to disk as an image folder plus COCO JSON by odis/synth_dataset.py.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from odis.boxes import box_iou, clip_boxes

SHAPES = ("arrow", "circle", "cross", "diamond", "hexagon", "moon", "ring", "square", "star", "triangle")
DIGITS = tuple(str(d) for d in range(10))
SPLITS = {"train": 1, "val": 2}
ALPHA_FLOOR = 1 / 32      # alpha below this is set to 0, so every mask pixel is visibly different from background
MIN_CONTRAST = 96         # an object's colour differs from the background's mean by this much in some channel
SUPERSAMPLE = 4           # shapes are drawn at 4x and area-downsampled: anti-aliased edges
VAL_FRACTION = 0.2        # the share of MNIST digits and of background photos kept for val scenes
IDX_DTYPES = {0x08: np.uint8}
# "colour": every background and object a random colour (colour is a nuisance the network must learn to ignore).
# "gray": the MNIST look - light objects on a dark background, gray clutter. Easier: shape is the main thing that
# varies, so a small ViT learns it in minutes on a CPU (benchmarks/mini_repro.py's cpu preset).
PALETTES = ("colour", "gray")


# ---- configuration and result --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SynthConfig:
    size: int = 64                                # image side in pixels (square images)
    objects: tuple[int, int] = (1, 3)             # inclusive range of objects per image (target + distractors)
    scale: tuple[float, float] = (0.25, 0.5)      # object's longer side as a fraction of the image side
    max_iou: float = 0.2                          # maximum IoU between any two object boxes
    clutter: float = 0.5                          # 0 plain background ... 1 strong texture, noise and strokes
    distractors: str = "other"                    # "other": distractor classes differ from the target's; "any"
    palette: str = "colour"                       # "colour": random colours; "gray": light objects on dark gray
    seed: int = 0
    backgrounds: str | None = None                # a folder of photos to crop backgrounds from (None: drawn)

    def validate(self) -> None:
        lo, hi = self.objects
        if not 1 <= lo <= hi:
            raise ValueError(f"objects must be a range 1 <= lo <= hi, got {lo}-{hi}")
        s0, s1 = self.scale
        if not 0 < s0 <= s1 <= 1:
            raise ValueError(f"scale must be a range 0 < lo <= hi <= 1, got {s0}-{s1}")
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if round(s0 * self.size) < 4:
            raise ValueError(f"scale {s0} of size {self.size} gives objects under 4 pixels; raise --scale or --size")
        if not 0 <= self.max_iou <= 1:
            raise ValueError(f"max_iou must be in [0, 1], got {self.max_iou}")
        if not 0 <= self.clutter <= 1:
            raise ValueError(f"clutter must be in [0, 1], got {self.clutter}")
        if self.distractors not in ("other", "any"):
            raise ValueError(f"distractors must be 'other' or 'any', got {self.distractors!r}")
        if self.palette not in PALETTES:
            raise ValueError(f"palette must be one of {PALETTES}, got {self.palette!r}")


@dataclass
class Scene:
    """One generated image. Object 0 is the target (image label = labels[0]); objects are drawn in reverse order."""

    image: np.ndarray        # [H, W, 3] uint8 RGB
    background: np.ndarray   # [H, W, 3] uint8: the image before any object was drawn
    boxes: np.ndarray        # [n, 4] float64 x0, y0, x1, y1 (integers: tight box of the mask)
    labels: np.ndarray       # [n] int64 class index
    masks: np.ndarray        # [n, H, W] bool: the object's own (amodal) mask, alpha > 0
    dropped: int = 0         # distractors that found no place under the overlap rule

    @property
    def label(self) -> int:
        return int(self.labels[0])


# ---- MNIST (IDX files) ---------------------------------------------------------------------------------------

def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) into a uint8 array, validating the magic number and the sizes."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read as {'gzip ' if opener is gzip.open else ''}IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex() or 'empty'}; expected 0000 08 NN)")
    dtype, ndim = data[2], data[3]
    if dtype not in IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: IDX type 0x{dtype:02x} with {ndim} dims; expected unsigned bytes (0x08)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says shape {shape} ({int(np.prod(shape))} bytes) "
                         f"but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All MNIST digits under `root` (t10k and/or train IDX files, .gz or plain): images [N,28,28], labels [N]."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"MNIST folder not found: {root}")
    images, labels = [], []
    for prefix in ("t10k", "train"):
        found = [_find(root, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
        if found[0] is None and found[1] is None:
            continue
        if None in found:
            raise ValueError(f"{root}: {prefix} images and labels must both be present (found {found})")
        x, y = read_idx(found[0]), read_idx(found[1])
        if x.ndim != 3 or y.ndim != 1:
            raise ValueError(f"{found[0]} / {found[1]}: expected images [N,H,W] and labels [N], "
                             f"got {x.shape} and {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{found[0]} has {len(x)} images but {found[1]} has {len(y)} labels")
        if y.max(initial=0) > 9:
            raise ValueError(f"{found[1]}: labels must be digits 0-9, found {int(y.max())}")
        images.append(x)
        labels.append(y)
    if not images:
        raise ValueError(f"{root}: no MNIST IDX files "
                         "(expected t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz)")
    return np.concatenate(images), np.concatenate(labels)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


# ---- object sprites: alpha in [0, 1], cropped to the tight box of alpha > 0 -----------------------------------

def _tight(alpha: np.ndarray) -> np.ndarray:
    alpha = np.where(alpha >= ALPHA_FLOOR, alpha, 0).astype(np.float32)
    ys, xs = np.nonzero(alpha)
    if len(ys) == 0:  # an object too small to leave any pixel above the floor: one solid pixel
        return np.ones((1, 1), np.float32)
    return alpha[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def _polygon(name: str) -> list[tuple[np.ndarray, bool]]:
    """(polygon, is_hole) in [-1, 1] coordinates; holes are filled black after the shape. Circles are 64-gons."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)

    def reg(n, r=1.0, phase=-np.pi / 2):
        a = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)

    star = np.empty((10, 2))
    star[0::2], star[1::2] = reg(5), reg(5, 0.45, -np.pi / 2 + np.pi / 5)
    w = 0.33
    shapes = {
        "arrow": [np.array([[-1, -w], [0.1, -w], [0.1, -0.8], [1, 0], [0.1, 0.8], [0.1, w], [-1, w]])],
        "circle": [circle],
        "cross": [np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
                            [-1, w], [-1, -w], [-w, -w]])],
        "diamond": [np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]])],
        "hexagon": [reg(6, 1.0, 0)],
        "moon": [circle, _Hole(circle * 0.85 + [0.45, -0.2])],
        "ring": [circle, _Hole(circle * 0.55)],
        "square": [np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])],
        "star": [star],
        "triangle": [reg(3, 1.0) + [0, 0.2]],
    }
    return [(p.pts, True) if isinstance(p, _Hole) else (p, False) for p in shapes[name]]


class _Hole:
    """Marks a polygon of `_polygon` as a hole."""

    def __init__(self, pts):
        self.pts = np.asarray(pts)


def shape_sprite(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A shape drawn on a `side` x `side` canvas (small rotation and aspect jitter), as a tight alpha sprite."""
    big = side * SUPERSAMPLE
    canvas = np.zeros((big, big), np.uint8)
    angle = rng.uniform(-0.26, 0.26)   # +-15 degrees: a rotated square must not become a diamond
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    aspect = rng.uniform(0.8, 1.0)
    stretch = np.array([1.0, aspect]) if rng.random() < 0.5 else np.array([aspect, 1.0])
    for poly, hole in _polygon(name):
        pts = (poly * stretch) @ rot.T
        pix = np.round((pts * 0.5 / 1.05 + 0.5) * big * 16).astype(np.int32)  # 4 fractional bits for fillPoly
        cv2.fillPoly(canvas, [pix], 0 if hole else 255, lineType=cv2.LINE_8, shift=4)
    alpha = cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return _tight(alpha)


def digit_sprite(digit: np.ndarray, side: int) -> np.ndarray:
    """An MNIST digit cropped to its ink and resized so that its longer side is `side`, as a tight alpha sprite."""
    ink = _tight(digit.astype(np.float32) / 255)
    h, w = ink.shape
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return _tight(np.clip(cv2.resize(ink, size, interpolation=cv2.INTER_LINEAR), 0, 1))


class ShapeSource:
    """Ten procedurally drawn shape classes, no data needed."""

    kind = "shape"
    classes = SHAPES

    def sprite(self, cls: int, side: int, rng: np.random.Generator) -> np.ndarray:
        return shape_sprite(SHAPES[cls], side, rng)


def split_pool(n: int, split: str, seed: int, salt: int) -> np.ndarray:
    """The sorted indices of `split`'s pool of n items: a seed-fixed permutation, VAL_FRACTION (at least one) to val,
    the rest to train, so the two pools are disjoint."""
    order = np.random.default_rng([seed, salt]).permutation(n)
    n_val = max(1, int(round(n * VAL_FRACTION)))
    return np.sort(order[n_val:] if split == "train" else order[:n_val])


def list_photos(root: str | Path) -> list[str]:
    """The images under `root` (odis.imageio.list_images: relative POSIX paths), at least one per split."""
    from odis.imageio import list_images

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"backgrounds folder not found: {root}")
    files = list_images(root)[0]
    if len(files) < 2:
        raise ValueError(f"{root}: backgrounds need at least 2 images (one per split), found {len(files)}")
    return files


class PhotoBackgrounds:
    """Backgrounds cropped from the photos under a folder; `split` picks the disjoint pool (split_pool of the sorted
    file list; `files`: list_photos(root), when already listed). A photo that cannot be decoded is an error naming
    the file."""

    def __init__(self, root: str | Path, split: str, seed: int = 0, files: list[str] | None = None):
        self.root = Path(root)
        files = list_photos(self.root) if files is None else files
        self.files = [files[i] for i in split_pool(len(files), split, seed, salt=4321)]

    def crop(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """A random square crop (50-100% of the photo's shorter side), resized to `size`, maybe flipped: [H,W,3]."""
        from odis.imageio import decode_rgb

        rel = self.files[int(rng.integers(len(self.files)))]
        photo = decode_rgb(self.root / rel, name=str(self.root / rel))[0]
        h, w = photo.shape[:2]
        side = max(1, int(round(min(h, w) * rng.uniform(0.5, 1.0))))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(photo[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
        return (crop[:, ::-1] if rng.random() < 0.5 else crop).astype(np.float32)


class MnistSource:
    """MNIST digits; `split` picks the disjoint pool (seed-fixed 80/20 split of the given digits)."""

    kind = "digit"
    classes = DIGITS

    def __init__(self, images: np.ndarray, labels: np.ndarray, split: str, seed: int = 0):
        pool = split_pool(len(labels), split, seed, salt=1234)
        self.images = images
        self.by_class = [np.sort(pool[labels[pool] == c]) for c in range(10)]
        missing = [c for c in range(10) if len(self.by_class[c]) == 0]
        if missing:
            raise ValueError(f"MNIST {split} pool has no digit of class {missing}")

    def sprite(self, cls: int, side: int, rng: np.random.Generator) -> np.ndarray:
        idx = self.by_class[cls][rng.integers(len(self.by_class[cls]))]
        return digit_sprite(self.images[idx], side)


# ---- scene composition -------------------------------------------------------------------------------------

def _colour(rng: np.random.Generator, lo: float, hi: float, gray: bool) -> np.ndarray:
    """An RGB colour [3] float32 with channels ~ U(lo, hi); gray: one draw for all three."""
    return (np.repeat(rng.uniform(lo, hi, 1), 3) if gray else rng.uniform(lo, hi, 3)).astype(np.float32)


def make_background(size: int, clutter: float, rng: np.random.Generator, palette: str = "colour",
                    photos: PhotoBackgrounds | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Background [H,W,3] float32 in [0,255] and its base colour: plain at clutter 0, then texture/noise/strokes.
    With `photos`, a photo crop replaces the plain colour and the texture (gray: its luminance, dimmed to 0-110,
    so light objects keep their contrast); the base colour is then the crop's mean."""
    gray = palette == "gray"
    channels = 1 if gray else 3  # gray: one channel drawn, repeated, so every pixel stays gray
    if photos is not None:
        bg = photos.crop(size, rng)
        if gray:
            bg = np.repeat(bg.mean(2, keepdims=True) * (110 / 255), 3, axis=2)
        base = bg.reshape(-1, 3).mean(0)
    else:
        base = _colour(rng, *((0, 60) if gray else (40, 215)), gray)
        bg = np.broadcast_to(base, (size, size, 3)).copy()
    if clutter <= 0:
        return bg, base
    if photos is None:
        g = int(rng.integers(2, 7))
        low = rng.normal(0, (20 if gray else 60) * clutter, (g, g, channels)).astype(np.float32)
        bg += cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)
    bg += rng.normal(0, 12 * clutter, (size, size, channels)).astype(np.float32)
    thick = max(1, size // 48)
    for _ in range(int(rng.binomial(round(8 * clutter), 0.75))):  # distractor strokes: not objects, unannotated
        pts = rng.uniform(0, size, (int(rng.integers(2, 5)), 2)).astype(np.int32)
        colour = tuple(float(c) for c in _colour(rng, *((60, 150) if gray else (0, 255)), gray))
        cv2.polylines(bg, [pts], False, colour, thickness=int(rng.integers(1, thick + 1)), lineType=cv2.LINE_AA)
    return np.clip(bg, 0, 255), base


def object_colour(base: np.ndarray, rng: np.random.Generator, palette: str = "colour") -> np.ndarray:
    """A colour that differs from the background's base colour by >= MIN_CONTRAST in some channel."""
    if palette == "gray":  # light on dark: at least 120 above the base (<= 60)
        return _colour(rng, 180, 255, gray=True)
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - base).max() >= MIN_CONTRAST:
            return c.astype(np.float32)
    return np.where(base < 128, 255.0, 0.0).astype(np.float32)


def _place(shape: tuple[int, int], size: int, placed: list[np.ndarray], max_iou: float,
           rng: np.random.Generator, tries: int = 30) -> np.ndarray | None:
    h, w = shape
    for _ in range(tries):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = np.array([x, y, x + w, y + h], np.float64)
        if not placed or box_iou(box, np.stack(placed)).max() <= max_iou:
            return box
    return None


def render_scene(cfg: SynthConfig, source, target_class: int, rng: np.random.Generator,
                 photos: PhotoBackgrounds | None = None) -> Scene:
    """One scene: the target of `target_class` (largest, on top) plus distractors, on a cluttered background
    (a crop of one of `photos` if given)."""
    size = cfg.size
    n = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    sides = np.sort(rng.uniform(*cfg.scale, n))[::-1] * size
    k = len(source.classes)
    others = [c for c in range(k) if c != target_class] if cfg.distractors == "other" else list(range(k))
    classes = [target_class] + [int(c) for c in rng.choice(others, n - 1)]

    sprites, boxes, labels = [], [], []
    for i, (cls, side) in enumerate(zip(classes, sides)):
        side = max(4, round(side))
        sprite = source.sprite(cls, side, rng)
        box = None
        for _ in range(6):  # distractors: shrink until strictly smaller than the target and placeable
            small = i == 0 or sprite.size < sprites[0].size
            if small:
                box = _place(sprite.shape, size, boxes, cfg.max_iou, rng)
                if box is not None:
                    break
            side = max(4, int(side * 0.8))
            sprite = source.sprite(cls, side, rng)
        if box is None:
            continue
        sprites.append(sprite)
        boxes.append(box)
        labels.append(cls)

    bg, base = make_background(size, cfg.clutter, rng, cfg.palette, photos)
    image = bg.copy()
    masks = np.zeros((len(sprites), size, size), bool)
    for i in reversed(range(len(sprites))):  # target (index 0) last, on top
        a = sprites[i][..., None]
        x0, y0, x1, y1 = boxes[i].astype(int)
        region = image[y0:y1, x0:x1]
        region *= 1 - a
        region += a * object_colour(base, rng, cfg.palette)
        masks[i, y0:y1, x0:x1] = sprites[i] > 0
    to_u8 = lambda f: np.clip(np.round(f), 0, 255).astype(np.uint8)  # noqa: E731
    return Scene(image=to_u8(image), background=to_u8(bg), boxes=clip_boxes(np.stack(boxes), size, size),
                 labels=np.array(labels, np.int64), masks=masks, dropped=n - len(sprites))


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def tight_box(mask: np.ndarray) -> np.ndarray:
    """[x0, y0, x1, y1] of the pixels where mask is True (pixel (i, j) covers [j, j+1) x [i, i+1))."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
