"""The one-machine path of extract-boxes: the same `BoxExtractor` as a Ray actor runs, in this process.

With one detector on one machine Ray adds nothing but its start-up (seconds), its processes (over a GB of memory)
and an object-store hop per batch; this runs the detector at its own speed instead. As in the actor, two batches
are in flight at once: one decoding (in the extractor's threads, one per core) while the other holds the
detector. Results come back in the order of `todo`, so the parts a run writes do not depend on timing.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from odis.pipelines.extract.job import BATCHES_IN_FLIGHT, BoxExtractor, extractor_settings
from odis.pipelines.extract.settings import ExtractConfig


def local_batches(cfg: ExtractConfig, todo: list[dict]) -> Iterator[pa.Table]:
    """Result tables (RESULT_SCHEMA), one per batch of `cfg.batch_size` images of `todo`, in order."""
    threads = max(1, int(cfg.cpus_per_worker)) if cfg.cpus_per_worker else None  # default: one per core
    extractor = BoxExtractor(**extractor_settings(cfg), decode_threads=threads)
    bs = max(1, cfg.batch_size)
    batches = ({"image_id": [it["image_id"] for it in todo[i:i + bs]], "path": [it["path"] for it in todo[i:i + bs]]}
               for i in range(0, len(todo), bs))
    with ThreadPoolExecutor(BATCHES_IN_FLIGHT, thread_name_prefix="odis-batch") as pool:
        window: deque = deque()
        try:
            for batch in batches:
                window.append(pool.submit(extractor, batch))
                if len(window) > BATCHES_IN_FLIGHT:  # one more queued: a thread never waits for the driver's writes
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:  # an error or Ctrl-C: what has not started does not start
                f.cancel()
