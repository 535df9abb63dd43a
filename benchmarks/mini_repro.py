#!/usr/bin/env python3
"""The paper's comparison in miniature: DINO vs iBOT vs ODIS, equal budgets, >= 3 seeds, k-NN on objects.

Two datasets, both with ground-truth boxes:
  ti     the Tiny-ImageNet subset (../shared/data/tiny-imagenet-200-subset), a class subset; one GT box per image
  mnist  synthetic multi-object MNIST scenes (`odis synth --mnist`): a target digit (the label, the largest) and
         distractor digits of other classes (per preset: cpu 0-1, gpu exactly 1), so with a distractor the image
         label is ambiguous and only the box says which object is meant
Every network (method x seed, plus the untrained network of each seed) is evaluated by weighted k-NN (k=20) on the
val images with `--boxes-mode none` (whole image) and `mask` (OBJ token restricted to the GT box; for ti the
image's box, for mnist the target = largest box). The table gives mean +- std over seeds.

Two steps, so that the GPU machine needs nothing but torch/timm/webdataset/pyarrow and this repo's odis/ + trainer/:

  python3 benchmarks/mini_repro.py prepare --preset gpu            # here: synth, import boxes, shard -> --data
  python3 benchmarks/mini_repro.py run --preset gpu --results OUT  # there: train + k-NN in-process

`run` trains with trainer.train.train(cfg) and evaluates with odis.eval.protocols.run_knn, each (dataset, method,
seed) job in its own subprocess of this script (`_job`), several at once on a GPU; a time guard skips the jobs that
cannot finish within --budget-s (and kills any still running at the deadline), recording which.

Presets (3 methods x 2 datasets, 3 seeds (smoke: 1), equal steps for every method of a dataset):
  smoke  seconds: the test suite's check of the run path (numbers are noise)
  cpu    <= 30 min on 2 cores: configs/mini_cpu.yaml (test_vit/8 at 32 px, Sinkhorn teacher + KoLeo), ti 10
         classes, 3000 gray 32-px mnist scenes of one or two digits
  gpu    <= 8 min on one H100/H200: vit_tiny/8 at 64 px, ti 50 classes, 4500 gray 64-px mnist scenes of two
         digits, 6 jobs at a time (with the cpu preset's Sinkhorn teacher + KoLeo, and object-aware local crops for
         odis); 348 s on an H200 (BENCHMARKS.md)

benchmarks/mnist_variants.py runs single variants of the mnist scenes (iBOT vs ODIS), the search behind the gpu
preset's scenes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHARED = Path(os.environ.get("ODIS_SHARED", REPO.parent / "shared"))
TINY_IMAGENET = SHARED / "data" / "tiny-imagenet-200-subset" / "tiny-imagenet-200"
MNIST = SHARED / "data" / "mnist"
METHODS = ("dino", "ibot", "odis")
DATASETS = ("ti", "mnist")
BOX_MODES = ("none", "mask")


@dataclass(frozen=True)
class Preset:
    ti_classes: int                 # the first N classes (sorted wnids) with >= 8 val images
    mnist_train: int
    mnist_val: int
    recipe: str                     # configs/*.yaml
    epochs: dict                    # dataset -> epochs (the same for every method)
    batch_size: int
    workers: int                    # loader workers per job
    concurrency: int                # jobs at a time
    budget_s: float                 # the time guard: no job starts that cannot end before it; kill at it
    est_job_s: float                # a job's duration before one has been measured
    seeds: tuple = (0, 1, 2)
    knn_k: int = 20
    overrides: tuple = ()           # extra dotted config overrides
    device: str = "auto"
    synth: dict = field(default_factory=lambda: {"size": 64, "objects": (2, 3)})  # SynthConfig of the mnist scenes


PRESETS = {
    "smoke": Preset(ti_classes=3, mnist_train=48, mnist_val=24, recipe="configs/mini_cpu.yaml",
                    epochs={"ti": 1, "mnist": 1}, batch_size=16, workers=0, concurrency=2, budget_s=600,
                    est_job_s=20, seeds=(0,), knn_k=5,
                    overrides=("max_steps=2", "data.shuffle_buffer=50")),
    # 32-px images, gray MNIST scenes (the target, half of them with a smaller distractor digit), the
    # anti-collapse recipe (see the config): there a network trained for ~400 steps beat the untrained one by 5-10
    # points in single-seed trials, which 64-px colour scenes with the reference's centering never did on 2 cores.
    "cpu": Preset(ti_classes=10, mnist_train=3000, mnist_val=500, recipe="configs/mini_cpu.yaml",
                  epochs={"ti": 16, "mnist": 10}, batch_size=64, workers=1, concurrency=1, budget_s=1740,
                  est_job_s=110, synth={"size": 32, "objects": (1, 2), "scale": (0.5, 0.8), "max_iou": 0.3,
                                        "clutter": 0.3, "palette": "gray"}),
    # 64-px gray scenes of two digits of similar size (an 8x8 patch grid): on a CPU, such scenes at 48 px (6x6) were
    # where ODIS beat iBOT, a little more with object-aware local crops (README, benchmarks/mnist_variants.py);
    # colour scenes did not learn there.
    "gpu": Preset(ti_classes=50, mnist_train=4500, mnist_val=1000, recipe="configs/tiny_cpu.yaml",
                  epochs={"ti": 30, "mnist": 18}, batch_size=256, workers=2, concurrency=6, budget_s=420,
                  est_job_s=120, overrides=("data.shuffle_buffer=2000", "log_every=10", "loss.centering=sinkhorn",
                                            "loss.lambda_koleo=0.5", "data.local_object_aware=true"),
                  synth={"size": 64, "objects": (2, 2), "scale": (0.4, 0.5), "max_iou": 0.1, "clutter": 0.3,
                         "palette": "gray"}),
}


# ---- prepare (CPU machine: needs pycocotools, the shared data) ------------------------------------------------

def _ti_classes(n: int) -> list[str]:
    counts: dict[str, int] = {}
    for line in (TINY_IMAGENET / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            counts[parts[1]] = counts.get(parts[1], 0) + 1
    wnids = sorted(w for w in (TINY_IMAGENET / "wnids.txt").read_text().split() if counts.get(w, 0) >= 8)
    if len(wnids) < n:
        raise SystemExit(f"{TINY_IMAGENET}: only {len(wnids)} classes have >= 8 val images, {n} needed")
    return wnids[:n]


def prepare_ti(out: Path, n_classes: int) -> dict:
    """GT boxes of the whole subset (odis import-boxes --format tiny-imagenet), then shards of a class subset:
    the original JPEGs are staged (copied) as SPLIT/<wnid>/<stem>.JPEG and sharded with --labels folder, the boxes
    joined from the manifest by image_id (the file stem)."""
    from odis.importers import import_boxes
    from odis.manifest import write_manifest
    from odis.pipelines.shard import ShardSettings, run_shard

    res = import_boxes("tiny-imagenet", TINY_IMAGENET)
    manifest = out / "ti-gt.parquet"
    write_manifest(res.table, manifest, res.metadata)
    classes = set(_ti_classes(n_classes))
    df = res.table.to_pandas()
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "val"):
            rows = df[df.path.str.startswith(f"{split}/") & df.category.notna()]
            names = [res.metadata["classes"][int(c)] for c in rows.category]
            n = 0
            for rel, wnid in zip(rows.path, names):
                if wnid in classes:
                    dst = Path(tmp) / split / wnid / Path(rel).name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(TINY_IMAGENET / rel, dst)
                    n += 1
            idx = run_shard(ShardSettings(images=str(Path(tmp) / split), out=str(out / f"ti-{split}"),
                                          labels="folder", manifest=str(manifest), max_samples=1000),
                            overwrite=True)
            counts[split] = idx["num_samples"]
    manifest.unlink()  # the boxes now live in the shards; the manifest of all 12k images is not needed there
    return {"classes": sorted(classes), **counts}


def prepare_mnist(out: Path, train: int, val: int, synth: dict) -> dict:
    """odis synth --mnist (JPEG), odis import-boxes --format coco, odis shard --labels folder --manifest."""
    from odis.importers import import_coco
    from odis.manifest import write_manifest
    from odis.synth import SynthConfig
    from odis.synth_dataset import write_dataset
    from odis.pipelines.shard import ShardSettings, run_shard

    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, SynthConfig(**synth, seed=0), train, val, mnist=MNIST, fmt="jpg", progress=False)
        for split in ("train", "val"):
            m = Path(tmp) / f"{split}.parquet"
            res = import_coco(Path(tmp) / split, Path(tmp) / "annotations" / f"instances_{split}.json")
            write_manifest(res.table, m, res.metadata)
            idx = run_shard(ShardSettings(images=str(Path(tmp) / split), out=str(out / f"mnist-{split}"),
                                          labels="folder", manifest=str(m), max_samples=1000), overwrite=True)
            counts[split] = idx["num_samples"]
    return counts


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_prepare(args) -> None:
    for name in args.preset.split(","):
        p = PRESETS[name]
        out = Path(args.data) / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        info = {"preset": name, "ti": prepare_ti(out, p.ti_classes),
                "mnist": prepare_mnist(out, p.mnist_train, p.mnist_val, p.synth)}
        info["bytes"] = folder_bytes(out)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "prepared.json").write_text(json.dumps(info, indent=2))
        print(f"{out}: ti {info['ti']['train']}/{info['ti']['val']} ({len(info['ti']['classes'])} classes), "
              f"mnist {info['mnist']['train']}/{info['mnist']['val']}; {info['bytes'] / 2**20:.1f} MiB "
              f"in {info['seconds']} s")


# ---- one job (a subprocess): train one network, k-NN in both box modes -----------------------------------------

def job_config(p: Preset, data: Path, dataset: str, method: str, seed: int, out: Path):
    from odis.trainer.recipes import load_config

    overrides = [f"method={method}", f"seed={seed}", f"out={out}", f"data.shards={data / f'{dataset}-train'}",
                 f"optim.epochs={p.epochs[dataset]}", f"data.batch_size={p.batch_size}",
                 f"data.num_workers={p.workers}", f"device={p.device}", "checkpoint_every=100000",
                 *p.overrides]
    return load_config(REPO / p.recipe, overrides)


def untrained(p: Preset, cfg, seed: int, out: Path) -> Path:
    """The recipe's backbone, freshly initialised with this seed: the floor a trained network must clear."""
    import torch

    from odis.model import OdisViT, export_backbone

    torch.manual_seed(seed)
    m = cfg.model
    model = OdisViT(m.arch, img_size=cfg.data.global_size, patch_size=m.patch_size)
    out.mkdir(parents=True, exist_ok=True)
    export_backbone(model, out / "backbone.safetensors")
    return out


def cmd_job(args) -> None:
    import torch

    from odis.eval.protocols import run_knn
    from odis.eval.settings import KnnSettings

    p = PRESETS[args.preset]
    if args.epochs is not None:  # what the parent decided (--epochs-scale)
        p = Preset(**{**asdict(p), "epochs": {**p.epochs, args.dataset: args.epochs}})
    data, out = Path(args.data) / args.preset, Path(args.out)
    torch.set_num_threads(max(1, int(os.environ.get("ODIS_JOB_THREADS", "2"))))
    cfg = job_config(p, data, args.dataset, "odis" if args.method == "untrained" else args.method, args.seed, out)
    t0 = time.perf_counter()
    final = {}
    if args.method == "untrained":
        untrained(p, cfg, args.seed, out)
    else:
        from odis.trainer.train import train

        final = train(cfg, progress=False, overwrite=True)  # a rerun of the job starts it over
    t_train = time.perf_counter() - t0
    result = {"dataset": args.dataset, "method": args.method, "seed": args.seed, "train_s": round(t_train, 1),
              "steps": final.get("step", 0), "final_loss": final.get("loss"), "knn": {}}
    for mode in BOX_MODES:
        r = run_knn(KnnSettings(out, str(data / f"{args.dataset}-train"), str(data / f"{args.dataset}-val"),
                                mode=mode, ks=(p.knn_k,), batch_size=256, workers=p.workers, device=cfg.device))
        result["knn"][mode] = {"top1": r["results"][0]["top1"], "top5": r["results"][0]["top5"],
                               "k": r["results"][0]["k_effective"], "n_train": r["n_train"], "n_val": r["n_val"]}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2))


# ---- run: the jobs under a time guard, then the table ----------------------------------------------------------

@dataclass
class Job:
    dataset: str
    method: str
    seed: int
    out: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    status: str = "pending"   # pending | running | done | failed | skipped | killed
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.method}-s{self.seed}"


def plan_jobs(p: Preset, results: Path) -> list[Job]:
    """Seed-major, so that a guard that stops early leaves whole seeds of every method; the untrained networks
    (evaluation only) go last within each seed."""
    return [Job(d, m, s, results / "runs" / f"{d}-{m}-s{s}") for s in p.seeds
            for m in (*METHODS, "untrained") for d in DATASETS]


def run_jobs(args, p: Preset, jobs: list[Job], results: Path) -> float:
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    threads = str(max(1, (os.cpu_count() or 2) // p.concurrency))  # the jobs share the cores
    env = dict(os.environ, ODIS_JOB_THREADS=threads, OMP_NUM_THREADS=threads)
    (results / "logs").mkdir(parents=True, exist_ok=True)
    durations: dict[str, list[float]] = {}
    pending, running = list(jobs), []

    def estimate(j: Job) -> float:
        kind = "untrained" if j.method == "untrained" else j.dataset
        seen = durations.get(kind)
        return max(seen) if seen else (p.est_job_s if j.method != "untrained" else p.est_job_s / 4)

    while pending or running:
        now = time.perf_counter()
        for j in list(running):
            rc = j.proc.poll()
            if rc is None and now > deadline:
                j.proc.kill()
                j.proc.wait()
                j.status, rc = "killed", -9
            if rc is not None:
                j.seconds = round(now - j.started, 1)
                if j.status != "killed":
                    j.status = "done" if rc == 0 and (j.out / "result.json").is_file() else "failed"
                    kind = "untrained" if j.method == "untrained" else j.dataset
                    durations.setdefault(kind, []).append(j.seconds)
                running.remove(j)
                print(f"[{now - t0:6.0f} s] {j.name}: {j.status} ({j.seconds:.0f} s)", flush=True)
        while pending and len(running) < p.concurrency:
            j = pending.pop(0)
            if time.perf_counter() + estimate(j) > deadline:
                j.status = "skipped"
                print(f"[{time.perf_counter() - t0:6.0f} s] {j.name}: skipped by the time guard "
                      f"(needs ~{estimate(j):.0f} s, {deadline - time.perf_counter():.0f} s left)", flush=True)
                continue
            log = open(results / "logs" / f"{j.name}.log", "w")
            j.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_job", "--preset", args.preset,
                                       "--data", str(args.data), "--dataset", j.dataset, "--method", j.method,
                                       "--seed", str(j.seed), "--out", str(j.out),
                                       "--epochs", str(p.epochs[j.dataset])],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            j.started, j.status = time.perf_counter(), "running"
            running.append(j)
        time.sleep(0.5)
    return time.perf_counter() - t0


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} (n=1)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" + (
        f" (n={len(values)})" if len(values) < 3 else "")


def summarize(jobs: list[Job]) -> dict:
    rows = {}
    for j in jobs:
        if j.status != "done":
            continue
        r = json.loads((j.out / "result.json").read_text())
        row = rows.setdefault((j.dataset, j.method), {"top1": {m: [] for m in BOX_MODES}, "steps": set(),
                                                      "train_s": []})
        for m in BOX_MODES:
            row["top1"][m].append(r["knn"][m]["top1"])
        row["steps"].add(r["steps"])
        row["train_s"].append(r["train_s"])
    return rows


def markdown_table(rows: dict, p: Preset, preset: str) -> str:
    lines = [f"k-NN top-1 (%, k={p.knn_k}, mean ± std over seeds) on the val images; `mask`: the OBJ/CLS token "
             "restricted to the GT box (ti: the image's box; mnist: the target digit's box).", "",
             "| dataset | method | steps | no box (`none`) | GT box (`mask`) | train s/run |", "|---|---|---|---|---|---|"]
    for d in DATASETS:
        for m in ("untrained", *METHODS):
            row = rows.get((d, m))
            if row is None:
                lines.append(f"| {d} | {m} | - | not run | not run | - |")
                continue
            steps = "/".join(str(s) for s in sorted(row["steps"]))
            lines.append(f"| {d} | {m} | {steps} | {_mean_std(row['top1']['none'])} | "
                         f"{_mean_std(row['top1']['mask'])} | {statistics.mean(row['train_s']):.0f} |")
    return "\n".join(lines)


def hardware(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"


def cmd_run(args) -> None:
    p = PRESETS[args.preset]
    if args.seeds:
        p = Preset(**{**asdict(p), "seeds": tuple(int(s) for s in args.seeds.split(","))})
    if args.epochs_scale != 1.0:  # the same for every method: budgets stay equal
        p = Preset(**{**asdict(p), "epochs": {d: max(1, round(e * args.epochs_scale)) for d, e in p.epochs.items()}})
    if args.budget_s is None:
        args.budget_s = p.budget_s
    data = Path(args.data) / args.preset
    if not (data / "prepared.json").is_file():
        raise SystemExit(f"{data}: not prepared; run `python3 benchmarks/mini_repro.py prepare --preset "
                         f"{args.preset} --data {args.data}` first (on a machine with ../shared and pycocotools)")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(p, results)
    wall = run_jobs(args, p, jobs, results)
    rows = summarize(jobs)
    hw = hardware(p.device)
    table = markdown_table(rows, p, args.preset)
    missing = [f"{j.name} ({j.status})" for j in jobs if j.status != "done"]
    text = (f"## mini_repro --preset {args.preset}: {hw}, {wall:.0f} s wall\n\n{table}\n\n"
            + (f"Not in the table: {', '.join(missing)}\n" if missing else "All runs finished.\n"))
    (results / "mini_repro.md").write_text(text)
    (results / "mini_repro.json").write_text(json.dumps({
        "preset": args.preset, "settings": asdict(p), "hardware": hw, "wall_s": round(wall, 1),
        "jobs": [{"name": j.name, "status": j.status, "seconds": j.seconds} for j in jobs],
        "results": [json.loads((j.out / "result.json").read_text()) for j in jobs if j.status == "done"]},
        indent=2))
    print(text)
    # the row is also kept with the results: a run on a borrowed machine appends it here afterwards
    append_benchmarks(results / "BENCHMARKS-row.md", args, hw, wall, rows)
    if args.benchmarks:
        append_benchmarks(Path(args.benchmarks), args, hw, wall, rows)
    if not rows:
        raise SystemExit("no run finished; see the logs in " + str(results / "logs"))


def append_benchmarks(path: Path, args, hw: str, wall: float, rows: dict) -> None:
    """One row per run of this script: | date | machine | command | figures |."""
    figs = []
    for (d, m), row in sorted(rows.items()):
        n, k = row["top1"]["none"], row["top1"]["mask"]
        figs.append(f"{d}/{m} none {statistics.mean(n):.1f}±{statistics.stdev(n) if len(n) > 1 else 0:.1f} "
                    f"mask {statistics.mean(k):.1f}±{statistics.stdev(k) if len(k) > 1 else 0:.1f} (n={len(n)})")
    scale = f" --epochs-scale {args.epochs_scale}" if getattr(args, "epochs_scale", 1.0) != 1.0 else ""
    row = (f"| {_dt.date.today().isoformat()} | {hw} | `benchmarks/mini_repro.py run --preset {args.preset}{scale}` | "
           f"k-NN top-1 %: {'; '.join(figs)}; wall {wall:.0f} s |\n")
    with open(path, "a") as f:
        f.write(row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="synth + import boxes + shard into --data/PRESET (CPU machine)")
    pr.add_argument("--preset", default="gpu", help="one or more of smoke,cpu,gpu (comma-separated)")
    pr.add_argument("--data", default=str(REPO / ".devdata" / "mini_repro"))
    ru = sub.add_parser("run", help="train + k-NN every (dataset, method, seed) under the time guard")
    ru.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ru.add_argument("--data", default=str(REPO / ".devdata" / "mini_repro"))
    ru.add_argument("--results", default=str(REPO / "runs" / "mini_repro"))
    ru.add_argument("--budget-s", type=float, default=None, help="time guard (default: the preset's)")
    ru.add_argument("--epochs-scale", type=float, default=1.0, help="multiply the preset's epochs (e.g. 0.5 "
                    "when a machine is slower than the preset assumes)")
    ru.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    ru.add_argument("--benchmarks", default=None, help="append a row to this BENCHMARKS.md")
    jb = sub.add_parser("_job", help=argparse.SUPPRESS)
    for a in ("--preset", "--data", "--dataset", "--method", "--out"):
        jb.add_argument(a, required=True)
    jb.add_argument("--seed", type=int, required=True)
    jb.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        for name in args.preset.split(","):
            if name not in PRESETS:
                ap.error(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    {"prepare": cmd_prepare, "run": cmd_run, "_job": cmd_job}[args.cmd](args)


if __name__ == "__main__":
    main()
