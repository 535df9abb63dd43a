"""`odis shard` throughput against `tar` of the same files, in the same run; and with --resize-short 256.

    python benchmarks/shard.py                      # COCO photos (coco_tiny x 8 copies: 1280 x ~150 KB) and
                                                    # Tiny-ImageNet (10k x 2 KB)
    python benchmarks/shard.py --repeats 5 --no-record

Anchor: GNU `tar -cf` of exactly the files odis shards (same list, same output disk), followed by an fsync, since
`odis shard` fsyncs every shard before renaming it. Both write into an empty place: the previous run's output is
deleted before the clock starts (freeing its cached pages took 5 µs an image here, as long as packing one). Both
run on one core (odis: --num-workers 1), interleaved, best of --repeats on warm page cache. The ratio is tar time /
odis time (target >= 0.8); odis's time is also split per image into scan/plan/index (everything but the writing,
from the index's own write time) and write. With --resize-short 256
every image is decoded, resized and re-encoded: images/s per core (one worker process). --no-native times the
Python path alone (an install without a C compiler).
odis is called through `pipelines.shard.run_shard` (what the CLI calls; no process start-up in the timing).
Appends a row to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
from odis.imageio import list_images  # noqa: E402
from odis.pipelines.shard import ShardSettings, run_shard  # noqa: E402
from odis.pipelines.shard.native import NATIVE_ENV, native  # noqa: E402

SHARED = Path(os.environ.get("ODIS_SHARED", REPO.parent / "shared"))
# name -> (images root, copies, whether --resize-short 256 resizes anything: Tiny-ImageNet images are 64 px).
# coco_tiny's 160 photos tar in ~0.1 s, too short to time on a busy machine: the benchmark copies them `copies`
# times into a scratch folder (copy k under k/), the same files for tar and for odis.
DATASETS = {
    "coco": (SHARED / "data" / "coco_tiny", 8, True),
    "tiny-imagenet": (SHARED / "data" / "tiny-imagenet-200-subset" / "tiny-imagenet-200" / "train", 1, False),
}


def _synthetic_image(args: tuple[Path, int]) -> None:
    from PIL import Image
    import numpy as np

    path, seed = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (95, 126, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    grain = rng.normal(0, 12, (375, 500, 3))
    img = Image.fromarray(np.clip(np.asarray(coarse, float) + grain, 0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)


def synthetic(n: int, work: Path) -> Path:
    """n ImageNet-like JPEGs (500x375, ~120 KB, 100 per folder) for machines without the shared data."""
    from multiprocessing import Pool

    root = work / f"synthetic-{n}"
    with Pool() as pool:
        pool.map(_synthetic_image, [(root / f"c{i // 100:04d}" / f"img_{i:07d}.jpg", i) for i in range(n)])
    return root


def replicate(root: Path, copies: int, work: Path) -> Path:
    if copies == 1:
        return root
    dst = work / f"{root.name}-x{copies}"
    for k in range(copies):
        for f in list_images(root)[0]:
            (dst / str(k) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / f, dst / str(k) / f)
    return dst


def time_tar(root: Path, files: list[str], out: Path) -> float:
    listing = out.parent / "files.txt"
    listing.write_bytes(b"\0".join(f.encode() for f in files))
    out.unlink(missing_ok=True)  # both start from nothing: freeing the last run's pages is neither's work
    t0 = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(root), "--null", "-T", str(listing)], check=True)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def time_odis(root: Path, out: Path, workers: int = 1, **kw) -> tuple[float, dict]:
    s = ShardSettings(images=str(root), out=str(out), max_size=kw.pop("max_size", 10**9), **kw)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    index = run_shard(s, num_workers=workers)
    return time.perf_counter() - t0, index


RESIZE_IMAGES = 1500  # decoding + resizing + encoding is ~50x slower than copying: time it on a subset


def subset(root: Path, files: list[str], n: int, dst: Path) -> Path:
    """The first n files of root as symlinks under dst (root itself when it has no more than n)."""
    if len(files) <= n:
        return root
    for f in files[:n]:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        (dst / f).symlink_to(root / f)
    return dst


def bench(name: str, root: Path, resize: bool, repeats: int, work: Path, workers: int = 1) -> dict:
    files = list_images(root)[0]
    mb = sum((root / f).stat().st_size for f in files) / 1e6
    tar_t, odis_t, write_t = [], [], []
    for _ in range(repeats):
        tar_t.append(time_tar(root, files, work / "anchor.tar"))
        t, index = time_odis(root, work / name)
        odis_t.append(t)
        write_t.append(index["last_run"]["seconds"])  # the rest of t: scanning and planning
        assert index["num_samples"] == len(files), "benchmark files must all be readable"
    rs_root, rs_n = subset(root, files, RESIZE_IMAGES, work / f"{name}-subset"), min(len(files), RESIZE_IMAGES)
    rs_t = min(time_odis(rs_root, work / f"{name}-256", resize_short=256)[0] for _ in range(2)) if resize else None
    best = odis_t.index(min(odis_t))
    res = {"images": len(files), "MB": mb, "tar_s": min(tar_t), "odis_s": odis_t[best], "resize_s": rs_t,
           "plan_us": (odis_t[best] - write_t[best]) / len(files) * 1e6,
           "write_us": write_t[best] / len(files) * 1e6}
    res["ratio"] = res["tar_s"] / res["odis_s"]
    res["resize"] = f"{rs_n / rs_t:.0f} img/s/core" if rs_t else "n/a (images <= 256 px)"
    if workers > 1:  # one shard per worker: the set cut into `workers` shards by size
        wt = min(time_odis(root, work / f"{name}-w", workers, max_size=int(mb * 1e6 / workers) + 1)[0]
                 for _ in range(2))
        res["parallel"] = f"{workers} workers {len(files) / wt:.0f} img/s = {res['tar_s'] / wt:.2f}× tar"
        print(f"{name}: {res['parallel']}")
    print(f"{name}: {len(files)} images, {mb:.1f} MB | tar {len(files) / res['tar_s']:.0f} img/s "
          f"({mb / res['tar_s']:.0f} MB/s) | odis shard {len(files) / res['odis_s']:.0f} img/s "
          f"({mb / res['odis_s']:.0f} MB/s; scan/plan/index {res['plan_us']:.1f} us, write "
          f"{res['write_us']:.1f} us an image) | ratio {res['ratio']:.2f} (target >= 0.8) | "
          f"--resize-short 256: {res['resize']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.machine()})")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--images", action="append", default=[], help="also (or with --only-given: only) bench this "
                    "image folder, e.g. a real ImageNet train folder; repeatable")
    ap.add_argument("--synthetic", type=int, default=0, help="also bench N generated ImageNet-like JPEGs")
    ap.add_argument("--workers", type=int, default=1, help="also time odis shard with N worker processes")
    ap.add_argument("--only-given", action="store_true", help="skip the shared coco/tiny-imagenet sets")
    ap.add_argument("--no-native", action="store_true", help="odis shard without its C part (ODIS_SHARD_NATIVE=0, "
                    "as installed without a C compiler)")
    args = ap.parse_args()
    if args.no_native:
        os.environ[NATIVE_ENV] = "0"
    elif native("pack") is None:
        sys.exit("pipelines/shard/_fastpack is not built (pip install -e . with a C compiler), or ODIS_SHARD_NATIVE=0: "
                 "pass --no-native to time the Python path on purpose")
    work = Path(args.work or tempfile.mkdtemp(prefix="odis-bench-shard-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        load = os.getloadavg()[0]
        sets = {} if args.only_given else dict(DATASETS)
        sets.update({Path(d).name: (Path(d), 1, True) for d in args.images})
        if args.synthetic:
            sets[f"synthetic ImageNet-like {args.synthetic}"] = (synthetic(args.synthetic, work), 1, True)
        results = {name: bench(name, replicate(root, copies, work), resize, args.repeats, work, args.workers)
                   for name, (root, copies, resize) in sets.items()}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    figures = "; ".join(
        f"{n} ({r['images']} img, {r['MB']:.0f} MB): tar {r['images'] / r['tar_s']:.0f} img/s, odis shard "
        f"{r['images'] / r['odis_s']:.0f} img/s = **{r['ratio']:.2f}× tar** (scan/plan/index {r['plan_us']:.1f} µs, "
        f"write {r['write_us']:.1f} µs an image), --resize-short 256: {r['resize']}"
        + (f", {r['parallel']}" if "parallel" in r else "")
        for n, r in results.items())
    if not args.no_record:
        row = (f"| {date.today()} | {args.machine} | `python benchmarks/shard.py {' '.join(sys.argv[1:])}` "
               f"| {figures} (1 worker vs 1 tar process, best of {args.repeats}, both fsynced; load average "
               f"{load:.1f} at start) |\n")
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(row)
        print("appended to BENCHMARKS.md")


if __name__ == "__main__":
    main()
