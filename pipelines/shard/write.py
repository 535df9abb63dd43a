"""One shard: read its planned images, write them to a temporary name, fsync, rename, leave a record."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from odis.imageio import ImageDecodeError
from odis.shards import shard_name
from pipelines.shard.image import prepare_image
from pipelines.shard.meta import sample_meta
from pipelines.shard.settings import Item, ShardSettings
from pipelines.shard.tar import TarWriter

STATE_DIR = ".odis-shard"  # per-shard records of a run in progress, next to the shards
# Hidden test hook: seconds to sleep after each sample, so that a test can kill a run mid-shard deterministically.
SLEEP_ENV = "ODIS_SHARD_TEST_SLEEP"


def write_shard(s: ShardSettings, index: int, items: list[Item],
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Write shard `index` (temp name, fsync, rename) and its state record; return the record."""
    out, name = Path(s.out), shard_name(s.prefix, index)
    partial, final = out / f".{name}.partial", out / name
    skipped, warnings, count = [], [], 0
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    with open(partial, "wb", buffering=0) as raw:
        tar = TarWriter(raw.fileno())
        for it in items:
            try:
                with open(os.path.join(s.images, it.relpath), "rb") as f:
                    data = f.read()
                p = prepare_image(data, it.relpath, s)
            except (ImageDecodeError, OSError) as e:
                msg = str(e)
                skipped.append({"path": it.relpath, "reason": msg.split(": ", 1)[-1] if msg.startswith(
                    it.relpath) else msg})
                continue
            meta, warning = sample_meta(it, p)
            if warning:
                warnings.append({"path": it.relpath, "reason": warning})
            tar.add((f"{it.image_id}.{p.ext}", p.data),
                    (f"{it.image_id}.json", json.dumps(meta, sort_keys=True).encode()))
            count += 1
            if progress:
                progress(1, len(data))
            if sleep:
                time.sleep(sleep)
        tar.close()
        raw.flush()
        os.fsync(raw.fileno())
    record = {"name": name, "count": count, "sha256": tar.sha.hexdigest(), "bytes": tar.nbytes,
              "skipped": skipped, "warnings": warnings}
    state = out / STATE_DIR
    rec_tmp = state / f".{name}.json.partial"
    rec_tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(partial, final)                       # the shard is complete from here on
    os.replace(rec_tmp, state / f"{name}.json")      # a shard without its record is redone on rerun
    return record

