"""Pictures: boxes on a grid of images, the OBJ token's attention per head, the ODIS views of one sample.

Pure drawing on PIL images; callers load data and models. Every figure has a size fixed by its arguments
(cells of `cell` pixels), so it can be checked pixel by pixel.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BOX_COLOR = (255, 40, 40)        # boxes on images
OBJ_COLOR = (40, 220, 80)        # the object's patches in a view
MIM_COLOR = (60, 120, 255)       # masked (MIM) patches in a view
CROP_COLORS = ((255, 200, 0), (0, 220, 255))  # the two global crops on the source image
BACKGROUND = (24, 24, 24)


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def fit(img: Image.Image, cell: int) -> tuple[Image.Image, float, int, int]:
    """The image scaled to fit a cell x cell square, centred: (cell image, scale, x offset, y offset)."""
    s = cell / max(img.width, img.height)
    w, h = max(1, round(img.width * s)), max(1, round(img.height * s))
    out = Image.new("RGB", (cell, cell), BACKGROUND)
    ox, oy = (cell - w) // 2, (cell - h) // 2
    out.paste(img.convert("RGB").resize((w, h), Image.BILINEAR), (ox, oy))
    return out, s, ox, oy


def draw_boxes(img: Image.Image, boxes, labels=None, color=BOX_COLOR, width: int | None = None) -> Image.Image:
    """Rectangles (and a label above each, e.g. its score) on a copy of `img`; boxes in its pixels."""
    out = img.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    width = width or max(2, round(max(out.size) / 150))
    font = _font(max(10, round(max(out.size) / 22)))
    for i, b in enumerate(np.asarray(boxes, float).reshape(-1, 4)):
        x0, y0, x1, y1 = b
        # at least one pixel: a box thinner than a pixel at this scale is still drawn (PIL refuses x1 < x0)
        d.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=width)
        if labels is not None and labels[i] is not None:
            text = str(labels[i])
            tb = d.textbbox((x0, y0), text, font=font)
            ty = y0 - (tb[3] - tb[1]) - 2 if y0 - (tb[3] - tb[1]) - 2 >= 0 else y0 + width
            tb = d.textbbox((x0 + width, ty), text, font=font)
            d.rectangle(tb, fill=color)
            d.text((x0 + width, ty), text, fill=(255, 255, 255), font=font)
    return out


def grid(cells: list[Image.Image], cols: int, cell: int) -> Image.Image:
    """Cells (each cell x cell) in rows of `cols`."""
    rows = max(1, math.ceil(len(cells) / cols))
    out = Image.new("RGB", (cols * cell, rows * cell), BACKGROUND)
    for i, c in enumerate(cells):
        out.paste(c, ((i % cols) * cell, (i // cols) * cell))
    return out


def boxed_cell(img: Image.Image, boxes, scores=None, cell: int = 256, title: str | None = None) -> Image.Image:
    """One grid cell: the image fitted to the cell with its boxes (source pixels) and score labels."""
    c, s, ox, oy = fit(img, cell)
    b = np.asarray(boxes, float).reshape(-1, 4) * s + np.array([ox, oy, ox, oy])
    labels = None if scores is None else [f"{v:.2f}" for v in scores]
    c = draw_boxes(c, b, labels)
    if title:
        ImageDraw.Draw(c).text((3, cell - 14), title, fill=(230, 230, 230), font=_font(11))
    return c


def error_cell(message: str, cell: int = 256) -> Image.Image:
    c = Image.new("RGB", (cell, cell), (60, 0, 0))
    d = ImageDraw.Draw(c)
    for i in range(0, len(message), 34):
        d.text((4, 4 + 12 * (i // 34)), message[i:i + 34], fill=(255, 200, 200), font=_font(11))
    return c


def manifest_grid(manifest, images_root, n: int = 16, cols: int = 4, cell: int = 256, min_score: float = 0.0,
                  image_ids: list[str] | None = None, seed: int | None = None) -> tuple[Image.Image, dict]:
    """A grid of `n` images of a box manifest with their boxes (score >= min_score) and scores.

    Images are taken in image_id order (or `image_ids`, or a random draw with `seed`); an unreadable image shows
    as a red cell naming the reason. Returns (picture, counts).
    """
    from odis.imageio import load_image
    from odis.manifest import read_manifest
    from odis.names import under

    df = read_manifest(manifest).to_pandas()
    root = Path(images_root)
    ids = sorted(df["image_id"].unique())
    if image_ids:
        unknown = [i for i in image_ids if i not in set(ids)]
        if unknown:
            raise ValueError(f"{manifest}: image_id(s) not in the manifest: {unknown[:5]}")
        ids = list(image_ids)
    elif seed is not None:
        ids = list(np.random.default_rng(seed).permutation(ids))
    ids = ids[:n]
    cells, counts = [], {"images": 0, "boxes": 0, "unreadable": 0}
    groups = df[df["image_id"].isin(ids)].groupby("image_id")
    for iid in ids:
        rows = groups.get_group(iid)
        try:  # a manifest's path is a path under the images root, never outside it (odis.names)
            img = load_image(under(root, rows["path"].iloc[0], f"{manifest}: {iid}: path", nested=True))
        except Exception as e:  # shown in the grid and counted
            cells.append(error_cell(str(e), cell))
            counts["unreadable"] += 1
            continue
        b = rows[rows["x0"].notna() & (rows["score"] >= min_score)]
        # manifest boxes are in original pixels; the decoded image has the same size (EXIF applied)
        sx, sy = img.width / float(rows["width"].iloc[0]), img.height / float(rows["height"].iloc[0])
        boxes = b[["x0", "y0", "x1", "y1"]].to_numpy(float) * np.array([sx, sy, sx, sy])
        cells.append(boxed_cell(img, boxes, b["score"].to_numpy(float), cell, title=str(iid)))
        counts["images"] += 1
        counts["boxes"] += len(b)
    return grid(cells, cols, cell), counts


# ---- attention ------------------------------------------------------------------------------------------------

def colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """[H,W] in [0,1] -> uint8 RGB [H,W,3]."""
    from matplotlib import colormaps

    rgba = np.asarray(colormaps[name](np.clip(np.asarray(values, np.float64), 0, 1)))  # a tuple for a scalar
    return (rgba[..., :3] * 255).astype(np.uint8)


def heatmap(att: np.ndarray, size: int) -> np.ndarray:
    """[gh, gw] attention -> [size, size] in [0,1] (max-normalised, nearest upsampling: one square per patch)."""
    a = np.asarray(att, np.float64)
    a = a / a.max() if a.max() > 0 else a
    img = Image.fromarray((a * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(img, np.float64) / 255.0


def attention_figure(view: Image.Image, attention: np.ndarray, box=None, cell: int | None = None) -> Image.Image:
    """The view (with its box), the mean over heads, then every head: [heads + 2 cells] in one row.

    attention: [heads, gh, gw], the OBJ query's last-block attention over the patches.
    """
    cell = cell or view.width
    first = view.convert("RGB").resize((cell, cell), Image.BICUBIC)
    if box is not None:
        s = cell / view.width
        first = draw_boxes(first, np.asarray(box, float) * s)
    panels = [first, Image.fromarray(colormap(heatmap(attention.mean(0), cell)))]
    panels += [Image.fromarray(colormap(heatmap(a, cell))) for a in attention]
    return grid(panels, len(panels), cell)


# ---- views ----------------------------------------------------------------------------------------------------

def tint(view: np.ndarray, mask: np.ndarray, color, alpha: float = 0.45) -> np.ndarray:
    """HWC uint8 view with the patches where mask [gh,gw] is True blended towards `color`."""
    h, w = view.shape[:2]
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    out = view.astype(np.float64)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float64)
    return out.astype(np.uint8)


def views_figure(image: np.ndarray, sample: dict, box=None, cell: int = 256) -> Image.Image:
    """ODIS views of one sample (`odis.views.ViewMaker` output) in one picture.

    Top row: the source image with the object box (red) and the two global crops (yellow, cyan); then the two
    global views with the object's patches tinted green and the MIM-masked patches blue, the carried box in red.
    Below: the local views, six per row at half a cell each.
    """
    src = Image.fromarray(image)
    c, s, ox, oy = fit(src, cell)
    off = np.array([ox, oy, ox, oy])
    if box is not None:
        c = draw_boxes(c, np.asarray(box, float) * s + off)
    for crop, color in zip(sample["crops"], CROP_COLORS):
        r = np.array([crop.left, crop.top, crop.left + crop.width, crop.top + crop.height]) * s + off
        c = draw_boxes(c, r, color=color)
    top = [c]
    for v in range(2):
        g = sample["global"][v].transpose(1, 2, 0)
        g = tint(g, sample["obj_mask"][v], OBJ_COLOR)
        g = tint(g, sample["mim_mask"][v], MIM_COLOR)
        gi = Image.fromarray(g).resize((cell, cell), Image.BILINEAR)
        if sample["obj_valid"][v]:  # drawn after resizing, so the line width does not depend on the view size
            gi = draw_boxes(gi, np.asarray(sample["obj_box"][v], float) * (cell / g.shape[1]))
        top.append(gi)
    half = cell // 2
    locals_ = [Image.fromarray(x.transpose(1, 2, 0)).resize((half, half), Image.BILINEAR) for x in sample["local"]]
    rows = math.ceil(len(locals_) / 6)
    out = Image.new("RGB", (3 * cell, cell + rows * half), BACKGROUND)
    for i, t in enumerate(top):
        out.paste(t, (i * cell, 0))
    for i, t in enumerate(locals_):
        out.paste(t, ((i % 6) * half, cell + (i // 6) * half))
    return out
