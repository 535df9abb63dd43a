"""`odis experiment run`: every (run, seed) of a spec trained at the same budget and evaluated by the same k-NN.

Each run trains as a subprocess of the real command (`python -m odis train ...`, its log beside it) into
OUT/runs/NAME-sSEED/ and ends with that folder's result.json; a killed experiment continues with the runs that have
none (a killed training resumes from its checkpoint). `jobs` runs train at once (small runs together fill a GPU
better than one); the untrained baselines come after the trained runs: the untrained network of a seed is the
architecture of that seed's first trained run, freshly initialised with the seed. Then OUT/results.json, .md and
.png (report.py).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from odis.files import write_json
from odis.pipelines.demo import untrained_backbone
from odis.pipelines.experiment.data import box_manifest, prepare_data
from odis.pipelines.experiment.diagnostics import run_diagnostics
from odis.pipelines.experiment.report import write_report
from odis.pipelines.experiment.spec import Run, Spec


class ExperimentError(RuntimeError):
    """A run of the experiment failed; the message names it and its log."""


def run_experiment(spec: Spec, out: str | Path, device: str = "auto", echo: Callable[[str], None] = print,
                   jobs: int | None = None) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", {"source": spec.source, "preset": spec.preset, "name": spec.name})
    paths = prepare_data(spec, out, echo)
    jobs = jobs or int(spec.train.get("jobs", 1))
    trained = [(s, r) for s in spec.seeds for r in spec.runs if r.method != "untrained"]
    untrained = [(s, r) for s in spec.seeds for r in spec.runs if r.method == "untrained"]
    total, results, lock, stop = len(trained) + len(untrained), [], threading.Lock(), threading.Event()

    def one(seed: int, run: Run, done: list[dict]) -> None:
        if stop.is_set():  # a run failed: start no other (those in flight finish and keep their results)
            return
        t0 = time.perf_counter()
        try:
            res = _run_one(spec, run, seed, paths, out, device, done)
        except BaseException:
            stop.set()
            raise
        knn = "  ".join(f"{m} {res['knn'][m]['top1']:.1f}" for m in spec.metrics)
        with lock:
            results.append(res)
            echo(f"[experiment] {len(results)}/{total} {run.name} seed {seed}: {res['steps']} steps, k-NN top-1 "
                 f"{knn} ({time.perf_counter() - t0:.0f} s)")

    for phase in (trained, untrained):
        done = list(results)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, seed, run, done) for seed, run in phase]
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:  # the runs that finished keep their result.json: a rerun continues with the others
            raise failed[0]
    order = {(s, r.name): i for i, (s, r) in enumerate(trained + untrained)}
    return write_report(spec, sorted(results, key=lambda r: order[r["seed"], r["name"]]), out)


def _run_one(spec: Spec, run: Run, seed: int, paths: dict, out: Path, device: str, done: list[dict]) -> dict:
    folder = out / "runs" / f"{run.name}-s{seed}"
    result_path = folder / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    t0 = time.perf_counter()
    if run.method == "untrained":
        like = next((Path(r["folder"]) for r in done if r["seed"] == seed and r["method"] != "untrained"), None)
        if like is None:
            raise ExperimentError(f"{run.name}: the untrained baseline needs a trained run of seed {seed}")
        untrained_backbone(like, folder, seed)
        steps = 0
    else:
        steps = _train(spec, run, seed, paths, out, folder, device)
    train_s = round(time.perf_counter() - t0, 1)
    result = {"name": run.name, "method": run.method, "boxes": run.boxes, "seed": seed,
              "overrides": spec.train.get("overrides", []) + run.overrides, "steps": steps, "train_s": train_s,
              "folder": str(folder), "knn": _knn(spec, folder, paths, out, device),
              "diagnostics": run_diagnostics(folder)}
    write_json(result_path, result)
    return result


def _train(spec: Spec, run: Run, seed: int, paths: dict, out: Path, folder: Path, device: str) -> int:
    t = spec.train
    args = ["train", "-c", spec.recipe, "--shards", paths["train"], "--method", run.method, "--out", folder,
            "--quiet", "--device", device, f"seed={seed}", f"optim.epochs={t.get('epochs', 10)}",
            f"data.batch_size={t.get('batch_size', 64)}", *t.get("overrides", []), *run.overrides]
    boxes = box_manifest(run.boxes, paths, out) if run.method == "odis" else None
    if boxes:
        args += ["--boxes", boxes]
    if (folder / "checkpoint.pt").is_file():
        args += ["--resume", "auto"]
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train.log"
    procs = int(t.get("processes", 1))  # data.batch_size is per process: the global batch is procs x it
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, *launch, "-m", "odis", *map(str, args)], stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
        raise ExperimentError(f"{run.name} seed {seed}: `odis train` failed (exit {rc}); log {log}:\n{tail}")
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return int(rows[-1]["step"]) if rows else 0


def _knn(spec: Spec, folder: Path, paths: dict, out: Path, device: str) -> dict:
    from odis.eval.protocols import run_knn
    from odis.eval.settings import KnnSettings

    res = {}
    sets = [("", {**paths, "modes": spec.modes})] + [(f"{name}:", p) for name, p in paths.get("sets", {}).items()]
    for prefix, where in sets:
        for mode in where["modes"]:
            r = run_knn(KnnSettings(folder, str(where["train"]), str(where["val"]), mode=mode, ks=(spec.k,),
                                    batch_size=128, workers=0, device=device, progress=False))
            top = r["results"][0]
            res[prefix + mode] = {"top1": top["top1"], "top5": top["top5"], "n_val": r["n_val"]}
    return res
