"""Image retrieval on the revisited Oxford and Paris (ROxford5k, RParis6k): mAP and mP@k, Medium and Hard.

As DINO's `eval_image_retrieval.py` (facebookresearch/dino) computes it, with the revisitop evaluation
(filipradenovic/revisitop, `python/evaluate.py`, `python/example_evaluate.py`):

- layout (revisitop's `configdataset`): ROOT/DATASET/gnd_DATASET.pkl with `imlist` (database names), `qimlist`
  (query names) and `gnd` (per query: `easy`, `hard`, `junk` database indices and `bbx` = x1, y1, x2, y2);
  images are ROOT/DATASET/jpg/NAME.jpg. The pickle is read by `safe_pickle` (no code runs); a JSON file with the
  same keys (`gnd_to_json`) is read instead when it is there.
- features: the backbone's [OBJ]/[CLS] token after the final norm, no box (the whole image). Each image is shrunk
  so that its long side is at most `imsize` (PIL `thumbnail`, Lanczos, aspect kept, never enlarged), then
  ToTensor + ImageNet normalisation, no crop; rows and columns past the last whole patch are dropped (DINO's
  stride-p patch convolution drops them). Multi-scale: the features at scales 1, 1/sqrt(2), 1/2 of that tensor
  (bilinear, align_corners=False) averaged. Every feature is L2-normalised; float32 on every device (DINO's
  script). Images are decoded by odis.imageio (EXIF orientation applied; DINO reads the pixels as stored, the
  same for a file without an EXIF rotation).
- queries are cropped to their `bbx` before the resize (`query_crop`, revisitop's protocol and its
  `example_process_images`); DINO's script feeds the whole query image, which `query_crop=False` reproduces.
- ranking by cosine similarity; Medium: positives easy + hard, junk = junk; Hard: positives hard, junk = junk +
  easy. Junk images are taken out of the ranking; AP is the trapezoidal area under the precision-recall curve;
  mP@k uses revisitop's k' = min(k, rank of the last positive); a query without positives is left out. In percent.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from odis.augment import IMAGENET_MEAN, IMAGENET_STD
from odis.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from odis.names import plain_name, under

DATASETS = ("roxford5k", "rparis6k")
KS = (1, 5, 10)                             # DINO's and revisitop's mP@k
SCALES = (1.0, 1 / math.sqrt(2), 0.5)       # DINO's utils.multi_scale
PROTOCOLS = ("medium", "hard")


# ---- the ground truth -----------------------------------------------------------------------------------------

@dataclass
class GroundTruth:
    """A revisited ground truth, checked: names are plain, indices are database indices, boxes are 4 numbers."""
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict] = field(repr=False)  # easy / hard / junk: int64 arrays; bbx: float64 [4] or None
    path: str = ""

    def subset(self, max_db: int | None = None, max_queries: int | None = None) -> GroundTruth:
        """The first `max_db` database images and `max_queries` queries; indices past the database are dropped."""
        n = len(self.imlist) if max_db is None else min(max_db, len(self.imlist))
        nq = len(self.qimlist) if max_queries is None else min(max_queries, len(self.qimlist))
        gnd = [{**g, **{k: g[k][g[k] < n] for k in ("easy", "hard", "junk")}} for g in self.gnd[:nq]]
        return GroundTruth(self.imlist[:n], self.qimlist[:nq], gnd, self.path)

    def paths(self, images: str | Path, queries: bool = False) -> list[str]:
        """The image files of the database (or the queries) under `images`, every one checked to exist."""
        names = self.qimlist if queries else self.imlist
        where = f"{self.path}: {'qimlist' if queries else 'imlist'}"
        paths = [under(images, n + ".jpg", where) for n in names]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(paths)} {'query' if queries else 'database'} "
                                    f"images listed by {self.path} are missing (first: {missing[0]}); the layout "
                                    "is ROOT/DATASET/jpg/NAME.jpg")
        return paths


def gnd_file(root: str | Path, dataset: str) -> Path:
    """ROOT/DATASET/gnd_DATASET.json when it is there (a converted copy), else ROOT/DATASET/gnd_DATASET.pkl."""
    base = Path(root) / dataset
    js = base / f"gnd_{dataset}.json"
    return js if js.is_file() else base / f"gnd_{dataset}.pkl"


def _read(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"ground truth not found: {path} (revisitop's layout: ROOT/roxford5k/gnd_roxford5k"
                                ".pkl and ROOT/roxford5k/jpg/; same for rparis6k)")
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON ({e})") from None
    from odis.eval.safe_pickle import safe_load

    return safe_load(path)


def _indices(value, n: int, where: str) -> np.ndarray:
    a = np.asarray(value if value is not None else [])
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind not in "iuf" or a.ndim > 1 or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
        raise ValueError(f"{where}: expected a list of database indices, got {str(value)[:80]}")
    a = a.astype(np.int64).reshape(-1)
    bad = a[(a < 0) | (a >= n)]
    if len(bad):
        raise ValueError(f"{where}: index {int(bad[0])} is not in the database (0..{n - 1})")
    return a


def _box(value, where: str) -> np.ndarray | None:
    if value is None:
        return None
    a = np.asarray(value)
    if a.dtype.kind not in "iuf" or a.size != 4 or not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: expected 4 numbers x1, y1, x2, y2, got {str(value)[:80]}")
    a = a.astype(np.float64).reshape(4)
    if not (a[2] > a[0] and a[3] > a[1]):
        raise ValueError(f"{where}: the box {a.tolist()} is empty (x2 <= x1 or y2 <= y1)")
    return a


def load_ground_truth(path: str | Path) -> GroundTruth:
    """The ground truth of a revisited dataset (.pkl, read safely, or .json with the same keys), checked."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict) or not all(k in data for k in ("imlist", "qimlist", "gnd")):
        raise ValueError(f"{path}: expected a dict with imlist, qimlist and gnd (revisitop's ground truth)")
    lists = {}
    for key in ("imlist", "qimlist"):
        names = data[key]
        if not isinstance(names, (list, tuple)):
            raise ValueError(f"{path}: {key} must be a list of image names")
        for i, name in enumerate(names):  # untrusted: each must be one plain file name under jpg/
            plain_name(name, f"{path}: {key}[{i}]")
        lists[key] = list(names)
    gnd, n = data["gnd"], len(lists["imlist"])
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(lists["qimlist"]):
        raise ValueError(f"{path}: gnd must be a list with one entry per query ({len(lists['qimlist'])})")
    out = []
    for i, g in enumerate(gnd):
        where = f"{path}: gnd[{i}]"
        if not isinstance(g, dict) or not all(k in g for k in ("easy", "hard", "junk")):
            raise ValueError(f"{where}: expected a dict with easy, hard and junk")
        out.append({**{k: _indices(g[k], n, f"{where}.{k}") for k in ("easy", "hard", "junk")},
                    "bbx": _box(g.get("bbx"), f"{where}.bbx")})
    return GroundTruth(lists["imlist"], lists["qimlist"], out, str(path))


def gnd_to_json(src: str | Path, dst: str | Path) -> None:
    """Convert a ground-truth pickle (read safely) to JSON once; `load_ground_truth` reads either."""
    gt = load_ground_truth(src)
    gnd = [{**{k: g[k].tolist() for k in ("easy", "hard", "junk")},
            **({"bbx": g["bbx"].tolist()} if g["bbx"] is not None else {})} for g in gt.gnd]
    Path(dst).write_text(json.dumps({"imlist": gt.imlist, "qimlist": gt.qimlist, "gnd": gnd}))


# ---- the evaluation (revisitop's compute_ap / compute_map) ---------------------------------------------------

def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """AP from the 0-based ranks (sorted, junk taken out) of the positives found, out of `nres` positives:
    trapezoids under the precision-recall curve, precision at rank 0 taken as 1."""
    r = np.asarray(ranks, np.float64)
    j = np.arange(len(r), dtype=np.float64)
    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    p1 = (j + 1) / (r + 1)
    return float(((p0 + p1) / 2).sum() / nres)


def compute_map(ranks: np.ndarray, gnd: list[dict], ks=KS) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(mAP, AP per query, mP@k, P@k per query) of `ranks` [n_db, n_queries] (database indices, best first) for
    `gnd` (per query `ok` and `junk` index arrays). Queries without positives are NaN and left out of the means."""
    nq = len(gnd)
    aps, prs = np.full(nq, np.nan), np.full((nq, len(ks)), np.nan)
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"])
        if ok.shape[0] == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[:, i], ok))
        junk = np.flatnonzero(np.isin(ranks[:, i], np.asarray(g.get("junk", []))))
        pos = pos - np.searchsorted(junk, pos, side="left")  # junk ranked before a positive does not count
        aps[i] = compute_ap(pos, ok.shape[0])
        pos = pos + 1
        for j, k in enumerate(ks):
            kq = min(int(pos.max()), k) if len(pos) else k
            prs[i, j] = (pos <= kq).sum() / kq
    evaluated = ~np.isnan(aps)
    if not evaluated.any():
        return float("nan"), aps, np.full(len(ks), np.nan), prs
    return float(aps[evaluated].mean()), aps, prs[evaluated].mean(0), prs


def protocol_gnd(gnd: list[dict], protocol: str) -> list[dict]:
    """revisitop's setups: medium = easy + hard positives; hard = hard positives with the easy ones as junk."""
    if protocol == "medium":
        return [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
    if protocol == "hard":
        return [{"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def evaluate(ranks: np.ndarray, gnd: list[dict], ks=KS) -> tuple[dict, dict]:
    """({protocol: {mAP, mP@k..., queries}}, {protocol: AP per query}), in percent (NaN: no positive)."""
    results, per_query = {}, {}
    for p in PROTOCOLS:
        m, aps, mpr, _ = compute_map(ranks, protocol_gnd(gnd, p), ks)
        results[p] = {"mAP": 100 * m, **{f"mP@{k}": 100 * float(v) for k, v in zip(ks, mpr)},
                      "queries": int((~np.isnan(aps)).sum())}
        per_query[p] = [100 * float(a) for a in aps]
    return results, per_query


def rank(db: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """Database indices by decreasing cosine similarity, one column per query ([n_db, n_queries])."""
    sim = db.float() @ queries.float().T
    return torch.argsort(-sim, dim=0, stable=True).cpu().numpy()


# ---- the images and their features -----------------------------------------------------------------------------

class RetrievalImages(torch.utils.data.Dataset):
    """Each image (cropped to its box when given), shrunk to a long side of at most `imsize`, normalised."""

    def __init__(self, paths: list[str], boxes: list | None, imsize: int):
        self.paths, self.boxes, self.imsize = paths, boxes, imsize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(normalised [3, h, w] tensor, i), or (None, i, why) for an image that cannot be read."""
        try:
            img = load_image(self.paths[i], max_pixels=DEFAULT_MAX_PIXELS)
        except ImageDecodeError as e:  # told in the main process, without a worker's traceback
            return None, i, str(e)
        if self.boxes is not None:
            img = img.crop(tuple(float(v) for v in self.boxes[i]))  # PIL rounds; outside the image is black
        img.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, i


def _as_list(batch):
    return batch


def _fit(x: torch.Tensor, scale: float, patch: int) -> torch.Tensor:
    """`x` at `scale` (bilinear, as DINO), then cut to whole patches (what DINO's patch convolution sees). A side
    shorter than one patch is resized up to one patch (DINO would fail on it)."""
    h, w = x.shape[-2:]
    sh, sw = math.floor(h * scale), math.floor(w * scale)
    if sh < patch or sw < patch:
        x = F.interpolate(x, size=(max(sh, patch), max(sw, patch)), mode="bilinear", align_corners=False)
    elif scale != 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    return x[..., :h // patch * patch, :w // patch * patch]


@torch.inference_mode()
def image_features(model, x: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
    """L2-normalised [OBJ]/[CLS] of a batch of same-sized images; multi-scale: the mean over SCALES first."""
    scales = SCALES if multiscale else (1.0,)
    f = sum(model(_fit(x, s, model.patch_size))[0].float() for s in scales) / len(scales)
    return F.normalize(f, dim=-1)


def retrieval_features(model, images: RetrievalImages, device: str, multiscale: bool = False,
                       batch_size: int = 32, workers: int = 2, desc: str = "features",
                       progress: bool = True) -> torch.Tensor:
    """[N, D] features of every image. Images come one by one (their sizes differ) and run in batches of the
    same size (the result is the same as one at a time)."""
    from tqdm import tqdm

    model.eval().to(device)
    loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=workers, collate_fn=_as_list)
    out: list[torch.Tensor | None] = [None] * len(images)
    pending: dict[tuple, list] = {}

    def run(items):
        x = torch.stack([t for t, _ in items]).to(device)
        f = image_features(model, x, multiscale).cpu()  # float32 on every device, as DINO's script
        for row, (_, i) in zip(f, items):
            out[i] = row

    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for (x, i, *error), in loader:
            if error:
                raise ValueError(f"{error[0]} (every image of the benchmark is needed)")
            group = pending.setdefault(tuple(x.shape), [])
            group.append((x, i))
            if len(group) == batch_size:
                run(pending.pop(tuple(x.shape)))
            bar.update(1)
        for group in pending.values():
            run(group)
    return torch.stack(out)

