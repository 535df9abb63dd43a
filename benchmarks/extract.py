"""`odis extract-boxes --detector yolo` throughput against a bare ultralytics `predict(stream=True)` loop on the same
images and the same cores, in the same run: the default one-machine path (one detector in the command's process),
and the Ray job with 1 and 2 workers (`--use-ray`); peak memory at two image counts; where the time goes.

    python benchmarks/extract.py                          # 1000 images, memory also at 5000
    python benchmarks/extract.py --images 1000 --big 2000 --weights ../shared/weights/yolo11n_int8_openvino_model --imgsz 640

Images: the 160 coco_tiny JPEGs repeated under new names (symlinks) into a temporary folder.
Both sides run as their own process (`odis extract-boxes ...` / `python -c <bare loop>`) on the whole machine,
with the same weights, imgsz, conf, iou, class-agnostic NMS, max boxes and batch size (--batch-size).
Figures:
- end-to-end img/s: images / wall time of the whole command (process start-up, Ray start-up, model loads included);
- steady img/s: the rate after the first results. odis: from the mtimes of its parquet parts (--part-size 100:
  images after the first part / time from first to last part); bare loop: from the time of its first result to
  its last. The ratio odis / bare is given for both (target >= 0.95).
- peak memory: the highest summed RSS of the command's whole process tree (driver, raylet, GCS, workers),
  sampled every 0.2 s, at --images and at --big images (it must not grow with the image count: the job streams).
- the breakdown: each stage of one image's way timed alone, one after another, in one process (decode, BGR
  conversion, ultralytics' letterbox, inference and NMS from its own per-image timers, odis's result rows and
  parquet write); next to it the Ray start-up (ray.init of a local instance).
Appends a row to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ODIS_SHARED", REPO.parent / "shared"))

BARE = r"""
import json, os, sys, tempfile, time
os.environ.setdefault("YOLO_OFFLINE", "1"); os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp())
t_start = float(sys.argv[1])
from ultralytics import YOLO
src, weights, imgsz, conf, iou, max_det, batch = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
model = YOLO(weights, task="detect")
n, boxes, first = 0, 0, None
for r in model.predict(source=src, stream=True, imgsz=imgsz, conf=conf, iou=iou, agnostic_nms=True, max_det=max_det, batch=batch, verbose=False):
    n += 1; boxes += len(r.boxes)
    if first is None: first = time.time()
print(json.dumps({"n": n, "boxes": boxes, "first": first, "last": time.time()}))
"""

# Each stage alone, serially: what one image costs where (ms/img). Ultralytics' own timers split its predict.
PROFILE = r"""
import json, os, sys, tempfile, time
from collections import Counter
from pathlib import Path
os.environ.setdefault("YOLO_OFFLINE", "1"); os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp())
src, weights, imgsz, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from odis.imageio import decode_rgb
from odis.pipelines.detectors import DetectorConfig, YoloDetector
from odis.pipelines.extract import RESULT_SCHEMA, results_to_manifest
from odis.manifest import write_manifest
import pyarrow as pa
files = sorted(p.name for p in src.iterdir())
det = YoloDetector(DetectorConfig("yolo", weights=weights, imgsz=imgsz))
t = {"decode": 0.0, "bgr": 0.0, "letterbox": 0.0, "inference": 0.0, "nms": 0.0, "rows+parquet": 0.0}
rows = {k: [] for k in RESULT_SCHEMA.names}
for i in range(0, len(files), batch):
    names = files[i:i + batch]
    t0 = time.perf_counter(); rgbs = [decode_rgb(src / n)[0] for n in names]; t1 = time.perf_counter()
    bgrs = [det.prepare(a) for a in rgbs]; t2 = time.perf_counter()
    t["decode"] += t1 - t0; t["bgr"] += t2 - t1
    res = det.model.predict(bgrs, imgsz=imgsz, conf=det.cfg.conf, iou=det.cfg.iou, agnostic_nms=True,
                            max_det=det.cfg.max_boxes, verbose=False)
    for r in res:
        t["letterbox"] += r.speed["preprocess"] / 1e3; t["inference"] += r.speed["inference"] / 1e3
        t["nms"] += r.speed["postprocess"] / 1e3
    for n, a, r in zip(names, rgbs, res):
        for k, v in (("image_id", n), ("path", n), ("width", a.shape[1]), ("height", a.shape[0]),
                     ("boxes", r.boxes.xyxy.numpy().reshape(-1).tolist()), ("scores", r.boxes.conf.numpy().tolist()),
                     ("error", None)):
            rows[k].append(v)
t0 = time.perf_counter()
table = results_to_manifest(pa.table(rows, schema=RESULT_SCHEMA), "yolo", Counter(), Counter())
write_manifest(table, Path(tempfile.mkdtemp()) / "part.parquet", {"source": "yolo"})
t["rows+parquet"] = time.perf_counter() - t0
import ray
t0 = time.perf_counter(); ray.init(address="local", include_dashboard=False, log_to_driver=False)
ray_start = time.perf_counter() - t0; ray.shutdown()
print(json.dumps({"n": len(files), "ms_per_img": {k: 1e3 * v / len(files) for k, v in t.items()},
                  "ray_start_s": ray_start}))
"""


def make_images(src: Path, dst: Path, n: int) -> Path:
    files = sorted(src.rglob("*.jpg"))
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (dst / f"img_{i:06d}.jpg").symlink_to(files[i % len(files)])
    return dst


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak summed RSS of the process tree in MB, stdout)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed ({proc.returncode}):\n{out[-2000:]}")
    return time.time() - t0, peak / 2**20, out


def run_odis(images: Path, out: Path, args, workers: int | None, env: dict) -> dict:
    """workers None: the default one-machine path; else a Ray job with that many workers."""
    ray = [] if workers is None else ["--use-ray", "--num-workers", str(workers)]
    cmd = [sys.executable, "-c", "from odis.cli import app; app()", "extract-boxes", "--detector", "yolo",
           "--weights", str(args.weights), "--imgsz", str(args.imgsz), "--conf", str(args.conf), "--iou",
           str(args.iou), "--max-boxes", str(args.max_boxes), "--images", str(images), "--out", str(out),
           *ray, "--batch-size", str(args.batch_size), "--part-size", "100", "--overwrite", "--quiet"]
    wall, peak, stdout = run_measured(cmd, env)
    n = len(list(images.iterdir()))
    mt = sorted(p.stat().st_mtime for p in out.glob("part-*.parquet"))
    steady = (n - 100) / (mt[-1] - mt[0]) if len(mt) > 1 and mt[-1] > mt[0] else float("nan")
    return {"wall": wall, "e2e": n / wall, "steady": steady, "peak_mb": peak, "stdout": stdout.strip()}


def run_bare(images: Path, args, env: dict) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-c", BARE, str(t0), str(images), str(args.weights), str(args.imgsz), str(args.conf),
           str(args.iou), str(args.max_boxes), str(args.batch_size)]
    wall, peak, stdout = run_measured(cmd, env)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "e2e": r["n"] / wall, "steady": (r["n"] - 1) / (r["last"] - r["first"]),
            "peak_mb": peak, "boxes": r["boxes"]}


def run_profile(images: Path, args, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROFILE, str(images), str(args.weights), str(args.imgsz),
                          str(args.batch_size)], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="images for the throughput runs (>= 1000)")
    ap.add_argument("--big", type=int, default=5000, help="image count of the second peak-memory run (0: skip)")
    ap.add_argument("--weights", type=Path, default=SHARED / "weights" / "yolov8n_320_int8_openvino_model")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--iou", type=float, default=0.7)
    ap.add_argument("--max-boxes", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "YOLO_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    env.pop("OMP_NUM_THREADS", None)  # both sides get the machine's default threading
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="odis-bench-extract-"))
    try:
        small = make_images(SHARED / "data" / "coco_tiny", work / "small", args.images)
        bare = run_bare(small, args, env)
        print(f"bare ultralytics loop: {bare}")
        local = run_odis(small, work / "local.parquet", args, None, env)
        print(f"odis, one machine (in process): {local}")
        one = run_odis(small, work / "one.parquet", args, 1, env)
        print(f"odis, Ray, 1 worker: {one}")
        two = run_odis(small, work / "two.parquet", args, 2, env)
        print(f"odis, Ray, 2 workers: {two}")
        prof = run_profile(small, args, env)
        print(f"breakdown: {prof}")
        big = None
        if args.big:
            shutil.rmtree(work / "local.parquet", ignore_errors=True)
            big = run_odis(make_images(SHARED / "data" / "coco_tiny", work / "big", args.big), work / "big.parquet",
                           args, None, env)
            print(f"odis, one machine, {args.big} images: {big}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count()

    def vs(r: dict) -> str:
        return (f"{r['e2e']:.1f} ({r['steady']:.1f} steady) = {r['e2e'] / bare['e2e']:.2f}× / "
                f"{r['steady'] / bare['steady']:.2f}×, peak {r['peak_mb']:.0f} MB")

    stages = ", ".join(f"{k} {v:.2f}" for k, v in prof["ms_per_img"].items())
    at_big = f", {big['peak_mb']:.0f} MB at {args.big} img" if big else ""
    figures = (f"{args.images} img, {args.weights.name} @{args.imgsz}, {cores} cores: bare predict(stream=True) "
               f"{bare['e2e']:.1f} img/s end-to-end ({bare['steady']:.1f} steady), peak {bare['peak_mb']:.0f} MB; "
               f"odis one machine **{local['e2e'] / bare['e2e']:.2f}× end-to-end, "
               f"{local['steady'] / bare['steady']:.2f}× steady** ({vs(local)}"
               f"{at_big}); "
               f"odis Ray 1 worker {vs(one)}; Ray 2 workers {vs(two)}; "
               f"breakdown ms/img, serial: {stages} (sum {sum(prof['ms_per_img'].values()):.2f}); "
               f"local Ray start {prof['ray_start_s']:.1f} s")
    figures += f" (batch {args.batch_size}; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end)"
    print(figures)
    if not args.no_record:
        machine = f"{cores}-core CPU ({platform.processor() or platform.machine()}, dev VM)"
        cmd = "python benchmarks/extract.py " + " ".join(sys.argv[1:])
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(f"| {date.today()} | {machine} | `{cmd.strip()}` | {figures} |\n")
        print("appended to BENCHMARKS.md")


if __name__ == "__main__":
    main()
