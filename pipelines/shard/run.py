"""`run_shard`: check the settings, plan, skip the shards already done, write the rest (locally or on Ray),
then write index.json."""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from odis.files import write_json
from odis.shards import INDEX_NAME
from odis.pipelines.ray_connect import check_ray_address, ray_session
from odis.pipelines.shard.labels import default_coco_json
from odis.pipelines.shard.outdir import make_index, prepare_out
from odis.pipelines.shard.plan import Plan, build_plan
from odis.pipelines.shard.settings import Item, ShardError, ShardSettings
from odis.pipelines.shard.write import STATE_DIR, write_shard


def run_shard(s: ShardSettings, overwrite: bool = False, num_workers: int = 1, use_ray: bool = False,
              ray_address: str | None = None, progress: Callable[[int, int], None] | None = None,
              on_plan: Callable[[Plan, int], None] | None = None) -> dict:
    """Shard `s.images` into `s.out`; returns the index (also written to `s.out/index.json`)."""
    s = _normalise(s)
    if use_ray or ray_address:
        check_ray_address(ray_address)  # an unreachable cluster is said before the images are listed
    plan = build_plan(s)
    done = prepare_out(plan, overwrite)
    todo = [i for i in range(len(plan.shards)) if i not in done]
    if on_plan:
        on_plan(plan, sum(len(plan.shards[i]) for i in todo))
    t0 = time.perf_counter()
    if use_ray or ray_address:
        new = _run_ray(s, {i: plan.shards[i] for i in todo}, ray_address, progress)
    else:
        new = _run_local(s, {i: plan.shards[i] for i in todo}, num_workers, progress)
    done.update(new)
    index = make_index(plan, [done[i] for i in range(len(plan.shards))], time.perf_counter() - t0, len(todo))
    write_json(Path(s.out) / INDEX_NAME, index)
    shutil.rmtree(Path(s.out) / STATE_DIR, ignore_errors=True)
    return index


def _normalise(s: ShardSettings) -> ShardSettings:
    """Absolute paths (workers and Ray tasks may run elsewhere), defaults filled in, bad settings refused early."""
    images = str(Path(s.images).resolve())
    out = Path(s.out).resolve()
    coco = s.coco_json or (str(default_coco_json(images)) if s.labels == "coco" else None)
    if coco and not Path(coco).is_file():
        raise ShardError(f"--labels coco: COCO instances file {coco} not found (give --coco-json)")
    if s.manifest and not Path(s.manifest).exists():
        raise ShardError(f"--manifest {s.manifest}: no such file or folder")
    if s.check not in ("header", "decode"):
        raise ShardError(f"--check must be header or decode, got {s.check!r}")
    for flag, value in (("--max-samples", s.max_samples), ("--max-size", s.max_size)):
        if value is not None and value < 1:
            raise ShardError(f"{flag} must be >= 1, got {value}")
    if s.resize_short is not None and s.resize_short < 1:
        raise ShardError(f"--resize-short must be >= 1, got {s.resize_short}")
    prefix = s.prefix or out.name
    if "/" in prefix or prefix.startswith("."):
        raise ShardError(f"--prefix {prefix!r} must be a plain name")
    return ShardSettings(**{**asdict(s), "images": images, "out": str(out), "prefix": prefix, "coco_json": coco,
                            "manifest": str(Path(s.manifest).resolve()) if s.manifest else None})


def _run_local(s: ShardSettings, todo: dict[int, list[Item]], num_workers: int,
               progress: Callable[[int, int], None] | None) -> dict[int, dict]:
    """Shards in this process, or one shard per task in a pool of `num_workers` processes."""
    if num_workers <= 1 or len(todo) <= 1:
        return {i: write_shard(s, i, items, progress) for i, items in todo.items()}
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (progress bar, Ray)
    counter = ctx.Array("q", 2)    # images, bytes: live progress from the workers
    done, seen = {}, [0, 0]
    with ProcessPoolExecutor(min(num_workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                             initargs=(counter,)) as ex:
        futures = {ex.submit(_worker_write, s, i, items): i for i, items in todo.items()}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for f in finished:
                done[futures[f]] = f.result()
            if progress:
                n, b = counter[0], counter[1]
                progress(n - seen[0], b - seen[1])
                seen = [n, b]
    return done


def _run_ray(s: ShardSettings, todo: dict[int, list[Item]], ray_address: str | None,
             progress: Callable[[int, int], None] | None) -> dict[int, dict]:
    """One Ray task per shard. The images root and the output folder must be the same path on every node
    (a shared filesystem), and odis must be installed there."""
    import ray

    with ray_session(ray_address, log_to_driver=False):
        task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
        refs = {task.remote(s, i, items): i for i, items in todo.items()}
        done, pending = {}, list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            rec = ray.get(ready[0])
            done[refs[ready[0]]] = rec
            if progress:
                progress(rec["count"], rec["bytes"])
        return done


# The worker-process side of _run_local: a shared counter the parent reads for the progress bar.
_COUNTER = None


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def _count(n: int, b: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER[0] += n
        _COUNTER[1] += b


def _worker_write(s: ShardSettings, index: int, items: list[Item]) -> dict:
    return write_shard(s, index, items, _count)

