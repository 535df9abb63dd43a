"""`odis verify`: check a shard set against its index.json and the sample contract (odis/shards.py), and report
every finding instead of raising.

    verify_shards(spec, decode=False) -> VerifyReport    .ok, .problems [Problem], .summary(), .to_dict()
    check_sample(key, files) -> [(kind, message)]        one sample against the contract
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from odis.imageio import DEFAULT_MAX_PIXELS
from odis.names import sample_key_problem, under
from odis.shards import IMAGE_EXTS, META_KEYS, local_path, read_index
from odis.tarscan import iter_tar_samples

# Tolerance (pixels) for boxes touching the image border after float scaling.
BOX_EPS = 1e-6


@dataclass
class Problem:
    kind: str        # missing | sha256 | count | unreadable | duplicate-key | bad-sample | bad-json | bad-box | decode
    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.shard}" + (f" [{self.key}]" if self.key else "")
        return f"{self.kind}: {where}: {self.message}"


@dataclass
class VerifyReport:
    folder: str
    shards_listed: int = 0
    shards_ok: int = 0
    samples: int = 0
    decoded: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def summary(self, max_lines: int = 50) -> str:
        head = (f"{self.folder}: {self.shards_ok}/{self.shards_listed} shards ok, {self.samples} samples read"
                + (f", {self.decoded} decoded" if self.decoded else ""))
        if self.ok:
            return head + ": OK"
        lines = [head + f": {len(self.problems)} problem(s) " + json.dumps(self.counts())]
        lines += [f"  {p}" for p in self.problems[:max_lines]]
        if len(self.problems) > max_lines:
            lines.append(f"  … and {len(self.problems) - max_lines} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "shards_listed": self.shards_listed,
                "shards_ok": self.shards_ok, "samples": self.samples, "decoded": self.decoded,
                "problems": [vars(p) for p in self.problems]}


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.nbytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def verify_shards(folder_or_index, decode: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                  progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check a shard set against its index: every listed shard exists with its sha256 and sample count, no key
    repeats across the set, every sample has one image + a json that parses, matches the contract and whose boxes
    lie inside the image; `decode=True` also decodes every image and checks its size against the json.
    Never raises for a bad shard set: every finding is a `Problem` in the report. `progress(samples, bytes)`
    is called after each shard."""
    index = read_index(folder_or_index)
    p = local_path(os.fspath(folder_or_index))
    folder = p if p.is_dir() else p.parent
    report = VerifyReport(str(folder), shards_listed=len(index["shards"]))
    n_classes = len(index["classes"]) if index.get("classes") else None
    seen: dict[str, str] = {}
    for sh in index["shards"]:
        path = Path(under(str(folder), sh["name"], "index.json"))
        n_before = len(report.problems)
        if not path.is_file():
            report.problems.append(Problem("missing", sh["name"], None, f"listed in the index but {path} is absent"))
            continue
        count, nbytes = _verify_one(path, sh, seen, report, decode, n_classes, max_pixels)
        if progress:
            progress(count, nbytes)
        if len(report.problems) == n_before:
            report.shards_ok += 1
    return report


def _verify_one(path: Path, entry: dict, seen: dict, report: VerifyReport, decode: bool,
                n_classes: int | None, max_pixels: int) -> tuple[int, int]:
    name, count = entry["name"], 0
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            for key, files in iter_tar_samples(reader):
                count += 1
                if key in seen:
                    where = "earlier in this shard" if seen[key] == name else f"in {seen[key]}"
                    report.problems.append(Problem("duplicate-key", name, key, f"key already seen {where}"))
                seen.setdefault(key, name)
                for prob in check_sample(key, files, n_classes, decode, max_pixels):
                    report.problems.append(Problem(prob[0], name, key, prob[1]))
                report.decoded += int(decode and any(e in files for e in IMAGE_EXTS))
            reader.drain()
        except (tarfile.TarError, OSError, EOFError) as e:
            report.problems.append(Problem("unreadable", name, None, f"tar stream broken after {count} "
                                           f"sample(s): {type(e).__name__}: {e}"))
            reader.drain()
    report.samples += count
    digest = reader.sha.hexdigest()
    if digest != entry["sha256"]:
        report.problems.append(Problem("sha256", name, None, f"sha256 {digest[:16]}… differs from the index's "
                                       f"{entry['sha256'][:16]}… ({reader.nbytes} bytes on disk)"))
    if count != entry["count"]:
        report.problems.append(Problem("count", name, None, f"{count} samples, the index says {entry['count']}"))
    return count, reader.nbytes


def check_sample(key: str, files: dict[str, bytes], n_classes: int | None = None, decode: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, str]]:
    """(kind, message) for every way one sample breaks the contract; empty when it is good."""
    if "." in key or not key:
        return [("bad-sample", "key is empty or contains a dot (webdataset splits keys at the first dot)")]
    problem = sample_key_problem(key)
    if problem:
        return [("bad-sample", problem + ": it could name a path outside the shard set")]
    imgs = [e for e in files if e in IMAGE_EXTS]
    extra = sorted(set(files) - set(IMAGE_EXTS) - {"json"})
    if len(imgs) != 1 or "json" not in files or extra:
        return [("bad-sample", f"expected one image (jpg/png/webp) and a json, found {sorted(files)}")]
    try:
        meta = json.loads(files["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [("bad-json", f"json does not parse: {e}")]
    probs = check_meta(key, meta, n_classes)
    if decode and not probs:
        probs += _check_decode(files[imgs[0]], meta, max_pixels)
    return probs


def check_meta(key: str, meta, n_classes: int | None = None) -> list[tuple[str, str]]:
    """(kind, message) for every way a sample's parsed json breaks the contract (keys, sizes, label, boxes)."""
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        have = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        return [("bad-json", f"json must hold {list(META_KEYS)}, has {have}")]
    if meta["image_id"] != key:
        return [("bad-json", f"image_id {meta['image_id']!r} differs from the key")]
    w, h, label = meta["width"], meta["height"], meta["label"]
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        return [("bad-json", f"width/height must be positive ints, got {w!r}x{h!r}")]
    if label is not None and not (isinstance(label, int) and 0 <= label < (n_classes or 1 << 62)):
        return [("bad-json", f"label {label!r} is not null or a class index < {n_classes}")]
    boxes, scores = meta["boxes"], meta["scores"]
    if not isinstance(boxes, list) or not isinstance(scores, list) or len(boxes) != len(scores):
        return [("bad-json", "boxes and scores must be lists of the same length")]
    probs = []
    for i, b in enumerate(boxes):
        ok = isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
        if not ok or not (-BOX_EPS <= b[0] < b[2] <= w + BOX_EPS and -BOX_EPS <= b[1] < b[3] <= h + BOX_EPS):
            probs.append(("bad-box", f"boxes[{i}] = {b} is not inside the {w}x{h} image (0 <= x0 < x1 <= w)"))
    return probs


def _check_decode(data: bytes, meta: dict, max_pixels: int) -> list[tuple[str, str]]:
    """Decode with the project's one decoder (odis.imageio): what the trainer and the evaluators will see."""
    from odis.imageio import ImageDecodeError, decode_rgb, exif_orientation

    try:
        _, size = decode_rgb(data, max_pixels, name="image")
        orientation = exif_orientation(data)
    except ImageDecodeError as e:
        return [("decode", f"image does not decode: {e}")]
    probs = []
    if size != (meta["width"], meta["height"]):
        probs.append(("decode", f"decoded size {size[0]}x{size[1]} differs from json {meta['width']}x{meta['height']}"))
    if orientation not in (1, None):
        probs.append(("decode", f"EXIF orientation {orientation} left in a stored image (decoders disagree on it)"))
    return probs
