"""`odis extract-boxes --detector yolo` throughput against a bare ultralytics `predict(stream=True)` loop on the same
images and the same cores, in the same run: the default one-machine path (one detector in the command's process),
and the Ray job with 1 and 2 workers (`--use-ray`); peak memory at two image counts; where the time goes.

    python benchmarks/extract.py                          # 1000 images, memory also at 5000
    python benchmarks/extract.py --images 1000 --big 2000 --weights ../shared/weights/yolo11n_int8_openvino_model --imgsz 640
    python benchmarks/extract.py --scaling 1,2,4,8,16 --big 0          # Ray workers on a many-core machine
    python benchmarks/extract.py --device cuda --random-weights yolo11n.yaml --imgsz 640 --threads 1,2,4,8 --big 0

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
- `--scaling N,...`: the Ray job with each number of workers (CPU detector), img/s and the speed-up over one.
- `--device cuda`: both sides on the GPU; the GPU's mean utilisation while each runs (nvidia-smi), and the
  one-machine path with each `--threads` count of decode threads (how many one GPU needs). The int8 OpenVINO
  weights at hand run on CPUs only: `--random-weights yolo11n.yaml` builds that architecture with random weights
  (ultralytics, offline) as a .pt for the timing; its boxes mean nothing (few or none pass --conf).
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
src, weights, imgsz, conf, iou, max_det, batch, device = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), sys.argv[9]
model = YOLO(weights, task="detect")
n, boxes, first = 0, 0, None
for r in model.predict(source=src, stream=True, imgsz=imgsz, conf=conf, iou=iou, agnostic_nms=True, max_det=max_det, batch=batch, device=device, verbose=False):
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
src, weights, imgsz, batch, device = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from odis.imageio import decode_rgb
from odis.pipelines.detectors import DetectorConfig, YoloDetector
from odis.pipelines.extract import RESULT_SCHEMA, results_to_manifest
from odis.manifest import write_manifest
import pyarrow as pa
files = sorted(p.name for p in src.iterdir())
det = YoloDetector(DetectorConfig("yolo", weights=weights, imgsz=imgsz, device=device))
t = {"decode": 0.0, "bgr": 0.0, "letterbox": 0.0, "inference": 0.0, "nms": 0.0, "rows+parquet": 0.0}
rows = {k: [] for k in RESULT_SCHEMA.names}
for i in range(0, len(files), batch):
    names = files[i:i + batch]
    t0 = time.perf_counter(); rgbs = [decode_rgb(src / n)[0] for n in names]; t1 = time.perf_counter()
    bgrs = [det.prepare(a) for a in rgbs]; t2 = time.perf_counter()
    t["decode"] += t1 - t0; t["bgr"] += t2 - t1
    res = det.model.predict(bgrs, imgsz=imgsz, conf=det.cfg.conf, iou=det.cfg.iou, agnostic_nms=True,
                            max_det=det.cfg.max_boxes, device=device, verbose=False)
    for r in res:
        t["letterbox"] += r.speed["preprocess"] / 1e3; t["inference"] += r.speed["inference"] / 1e3
        t["nms"] += r.speed["postprocess"] / 1e3
    for n, a, r in zip(names, rgbs, res):
        for k, v in (("image_id", n), ("path", n), ("width", a.shape[1]), ("height", a.shape[0]),
                     ("boxes", r.boxes.xyxy.cpu().numpy().reshape(-1).tolist()),
                     ("scores", r.boxes.conf.cpu().numpy().tolist()),
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


class GpuSampler:
    """The GPU's utilisation (%) every 0.5 s while a command runs (nvidia-smi), as a mean of the samples."""

    def __init__(self, on: bool):
        import threading

        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if on else None

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-i", "0"], capture_output=True, text=True, check=False)
            if r.returncode == 0 and r.stdout.strip().isdigit():
                self.samples.append(int(r.stdout.strip()))

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_measured(cmd: list[str], env: dict, gpu: bool = False) -> tuple[float, float, str, float | None]:
    """(wall seconds, peak summed RSS of the process tree in MB, stdout, mean GPU utilisation % or None)."""
    with GpuSampler(gpu) as sampler:
        wall, peak, out = _run_measured(cmd, env)
    return wall, peak, out, sampler.mean


def _run_measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
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


def run_odis(images: Path, out: Path, args, workers: int | None, env: dict, threads: int | None = None) -> dict:
    """workers None: the default one-machine path (`threads` decode threads, default one per core); else a Ray
    job with that many workers."""
    ray = [] if workers is None else ["--use-ray", "--num-workers", str(workers)]
    ray += ["--cpus-per-worker", str(threads)] if threads else []
    cmd = [sys.executable, "-c", "from odis.cli import app; app()", "extract-boxes", "--detector", "yolo",
           "--weights", str(args.weights), "--imgsz", str(args.imgsz), "--conf", str(args.conf), "--iou",
           str(args.iou), "--max-boxes", str(args.max_boxes), "--images", str(images), "--out", str(out),
           *ray, "--batch-size", str(args.batch_size), "--part-size", "100", "--overwrite", "--quiet",
           "--device", args.device]
    wall, peak, stdout, gpu = run_measured(cmd, env, args.device == "cuda")
    n = len(list(images.iterdir()))
    mt = sorted(p.stat().st_mtime for p in out.glob("part-*.parquet"))
    steady = (n - 100) / (mt[-1] - mt[0]) if len(mt) > 1 and mt[-1] > mt[0] else float("nan")
    return {"wall": wall, "e2e": n / wall, "steady": steady, "peak_mb": peak, "gpu_util": gpu,
            "stdout": stdout.strip()}


def run_bare(images: Path, args, env: dict) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-c", BARE, str(t0), str(images), str(args.weights), str(args.imgsz), str(args.conf),
           str(args.iou), str(args.max_boxes), str(args.batch_size), "0" if args.device == "cuda" else "cpu"]
    wall, peak, stdout, gpu = run_measured(cmd, env, args.device == "cuda")
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": wall, "e2e": r["n"] / wall, "steady": (r["n"] - 1) / (r["last"] - r["first"]),
            "peak_mb": peak, "boxes": r["boxes"], "gpu_util": gpu}


def run_profile(images: Path, args, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROFILE, str(images), str(args.weights), str(args.imgsz),
                          str(args.batch_size), args.device], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def random_weights(yaml_name: str, out: Path, env: dict) -> Path:
    """The architecture of an ultralytics model yaml with random weights, saved as a .pt (offline)."""
    code = f"from ultralytics import YOLO; YOLO({yaml_name!r}, task='detect').save({str(out)!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return out


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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--random-weights", help="an ultralytics model yaml (e.g. yolo11n.yaml): time that architecture "
                    "with random weights instead of --weights (for a GPU: the weights at hand are CPU-only int8)")
    ap.add_argument("--threads", default="", help="with --device cuda: decode-thread counts to try, e.g. 1,2,4,8")
    ap.add_argument("--scaling", default="", help="Ray worker counts to run, e.g. 1,2,4,8,16 (CPU detector)")
    ap.add_argument("--machine", default=None, help="the machine's name in the BENCHMARKS.md row")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "YOLO_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("OMP_NUM_THREADS", None)  # both sides get the machine's default threading
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="odis-bench-extract-"))
    try:
        small = make_images(SHARED / "data" / "coco_tiny", work / "small", args.images)
        if args.random_weights:
            args.weights = random_weights(args.random_weights, work / "random.pt", env)
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
        curve = {n: run_odis(small, work / f"w{n}.parquet", args, n, env) for n in _ints(args.scaling)}
        threads = {t: run_odis(small, work / f"t{t}.parquet", args, None, env, threads=t)
                   for t in (_ints(args.threads) if args.device == "cuda" else [])}
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
    if args.device == "cuda":
        figures += (f"; GPU utilisation bare {bare['gpu_util'] or 0:.0f}%, odis one machine "
                    f"{local['gpu_util'] or 0:.0f}%")
        figures += "".join(f"; {t} decode threads {r['steady']:.1f} img/s steady, GPU {r['gpu_util'] or 0:.0f}%"
                           for t, r in threads.items())
    if curve:
        base = curve[min(curve)]["steady"]
        figures += "; Ray workers " + ", ".join(f"{n}: {r['steady']:.1f} img/s ({r['steady'] / base:.2f}×)"
                                                for n, r in curve.items())
    if args.random_weights:
        figures += f" ({args.random_weights} with random weights: timing only)"
    figures += f" (batch {args.batch_size}; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end)"
    print(figures)
    if not args.no_record:
        machine = args.machine or f"{cores}-core CPU ({platform.processor() or platform.machine()}, dev VM)"
        cmd = "python benchmarks/extract.py " + " ".join(sys.argv[1:])
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(f"| {date.today()} | {machine} | `{cmd.strip()}` | {figures} |\n")
        print("appended to BENCHMARKS.md")


if __name__ == "__main__":
    main()
