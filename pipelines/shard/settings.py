"""What a shard run is asked to do (ShardSettings), the unit it plans with (Item), and its one error type."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

from odis.imageio import DEFAULT_MAX_PIXELS


class ShardError(ValueError):
    """A problem with the inputs or the output folder; the message names the file or setting."""


@dataclass(frozen=True)
class ShardSettings:
    images: str
    out: str
    prefix: str = ""
    labels: str = "none"              # folder | coco | none
    manifest: str | None = None
    coco_json: str | None = None
    id_scheme: str | None = None      # path | stem | coco; default: the manifest's, coco for --labels coco, else path
    max_samples: int | None = None
    max_size: int | None = 10**9
    resize_short: int | None = None
    quality: int = 90
    seed: int = 0
    check: str = "header"             # header | decode
    max_pixels: int = DEFAULT_MAX_PIXELS

    def output_settings(self) -> dict:
        """What decides the bytes of the shards (recorded in the index, compared on rerun)."""
        d = asdict(self)
        d.pop("out")
        return d


class Item(NamedTuple):  # a tuple: millions are built per run, frozen dataclasses cost 10x more
    relpath: str
    image_id: str
    size: int
    label: int | None = None
    boxes: tuple = ()                 # ((x0, y0, x1, y1), ...) in the manifest's (original, upright) pixels
    scores: tuple = ()
    manifest_wh: tuple | None = None  # (width, height) the manifest saw, None if the image has no manifest rows


def parse_size(text: str | None) -> int | None:
    """'1GB', '500MB', '1.5GiB', '123456' -> bytes (decimal units: 1GB = 10^9; GiB = 2^30); None/'0' -> None."""
    if text is None or str(text).strip() in ("", "0", "none"):
        return None
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = str(text).strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise ShardError(f"--max-size {text!r}: expected a size like 1GB, 500MB or 2GiB") from None
    if value < 1:
        raise ShardError(f"--max-size {text!r} must be positive")
    return int(value)

