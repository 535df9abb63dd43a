"""One shard: read its planned images, write them atomically (odis.files), then leave its record."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from odis.files import write_atomic, write_json
from odis.imageio import ImageDecodeError
from odis.shards import shard_name
from odis.pipelines.shard.image import prepare_image
from odis.pipelines.shard.meta import encode_meta, sample_meta
from odis.pipelines.shard.native import native
from odis.pipelines.shard.settings import Item, ShardSettings
from odis.pipelines.shard.tar import USTAR_TEMPLATE, TarWriter

STATE_DIR = ".odis-shard"  # per-shard records of a run in progress, next to the shards
# Hidden test hook: seconds to sleep after each sample, so that a test can kill a run mid-shard deterministically.
SLEEP_ENV = "ODIS_SHARD_TEST_SLEEP"
FAST_BATCH = 32  # samples per _fastpack call: its result stays below malloc's mmap threshold (a bigger batch
# page-faults fresh memory on every call)


def write_shard(s: ShardSettings, index: int, items: list[Item],
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Write shard `index` (as `.NAME.partial`, then fsync and rename: odis.files) and then its state record;
    return the record. A kill between the two leaves a shard without a record, which a rerun writes again: the
    index never lists a shard it cannot vouch for."""
    out, name = Path(s.out), shard_name(s.prefix, index)
    record = {"name": name}

    def write(partial: Path) -> None:
        root = os.open(s.images, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # files are opened relative to it
        try:
            with open(partial, "wb", buffering=0) as raw:
                tar = TarWriter(raw.fileno())
                count, skipped, warnings = _add_samples(tar, s, items, root, progress)
                tar.close()
        finally:
            os.close(root)
        record.update(count=count, sha256=tar.sha.hexdigest(), bytes=tar.nbytes, skipped=skipped, warnings=warnings)

    write_atomic(out / name, write, tmp=out / f".{name}.partial")
    write_json(out / STATE_DIR / f"{name}.json", record, indent=None)
    return record


def _add_samples(tar: TarWriter, s: ShardSettings, items: list[Item], root: int,
                 progress: Callable[[int, int], None] | None) -> tuple[int, list[dict], list[dict]]:
    """Read, check and append each item; returns (samples written, skipped files, warnings), each with its path.

    Runs of plain JPEGs go through the C fast path (_fastpack, when built) in batches; it stops at the first item
    it cannot write byte for byte as the Python path would, which then takes that one item."""
    skipped, warnings, count = [], [], 0
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    fast = native("pack") if s.check == "header" else None  # it checks headers; --check decode is Python's
    batch = 1 if sleep else FAST_BATCH
    i, handed = 0, None  # handed: items[i]'s bytes when the C path read them and handed the item over
    while i < len(items):
        if fast and handed is None:
            nxt, packed, nbytes, handed = fast(root, items, i, i + batch, USTAR_TEMPLATE, s.max_pixels,
                                               s.resize_short or 0)
            if nxt > i:
                tar.add_packed(packed)
                count += nxt - i
                _after(progress, nxt - i, nbytes, sleep)
                i = nxt
                continue
        it, data, handed = items[i], handed, None
        i += 1
        try:
            data = read_file(it.relpath, it.size, root) if data is None else data
            p = prepare_image(data, it.relpath, s)
        except (ImageDecodeError, OSError) as e:
            skipped.append({"path": it.relpath, "reason": _reason(e, it.relpath)})
            continue
        meta, warning = sample_meta(it, p)
        if warning:
            warnings.append({"path": it.relpath, "reason": warning})
        tar.add_sample(it.image_id, p.ext, p.data, encode_meta(meta))
        count += 1
        _after(progress, 1, len(data), sleep)
    return count, skipped, warnings


def _after(progress: Callable[[int, int], None] | None, n: int, nbytes: int, sleep: float) -> None:
    if progress:
        progress(n, nbytes)
    if sleep:
        time.sleep(sleep)


def read_file(relpath: str, size: int, root: int) -> bytes:
    """The whole file `relpath` under the folder open as `root`, in one read when it still has the planned `size`.

    Why not open(root + relpath).read(): the buffered file object, its size probe and context manager, and the
    kernel walking the root's path again for every file, cost together about as much as tar spends on a whole
    small image."""
    fd = os.open(relpath, os.O_RDONLY | os.O_CLOEXEC, dir_fd=root)
    try:
        data = os.read(fd, size + 1)  # +1: a file that grew since planning shows it here
        if len(data) == size:
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):  # grown, shrunk, or a short read (network filesystems)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _reason(e: Exception, relpath: str) -> str:
    """The error without the file name in front (the index lists the path next to it)."""
    msg = str(e)
    return msg.split(": ", 1)[-1] if msg.startswith(relpath) else msg
