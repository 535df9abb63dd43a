#!/usr/bin/env python3
"""iBOT vs ODIS on variants of the synthetic MNIST scenes: the search behind the mini reproduction's table.

benchmarks/mini_repro.py runs the fixed presets (3 methods x 3 seeds x 2 datasets). This script runs one variant of
its mnist dataset at a time, for the methods and seeds asked, so that scene difficulty, image size, training length
and ODIS's crop options can be tried one by one:

    python3 benchmarks/mnist_variants.py --name b32 --objects 2,2 --scale 0.45,0.55 --epochs 20 \\
        --methods untrained,ibot,odis -o data.local_object_aware=true

Scenes: `odis synth --mnist --palette gray` with the given --size/--objects/--scale/--max-iou/--clutter, made once
per --name under --data (cached). Training: configs/mini_cpu.yaml with data.global_size=--size, the given epochs
and the -o overrides (applied to every method; ibot and dino ignore the odis-only ones). Evaluation: k-NN (k=20)
on the val targets with --boxes-mode none and mask. Each finished network prints one line and appends it to
--results/variants.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mini_repro as mr  # noqa: E402  (its REPO path setup, data preparation and job config)


def _pair(text: str, kind=float) -> tuple:
    a, b = text.split(",")
    return kind(a), kind(b)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the variant's name (its scenes are cached under --data/NAME)")
    ap.add_argument("--size", type=int, default=32, help="scene side = global crop size (px)")
    ap.add_argument("--objects", default="2,3", help="digits per scene, inclusive range")
    ap.add_argument("--scale", default="0.4,0.6", help="object's longer side / scene side")
    ap.add_argument("--max-iou", type=float, default=0.1)
    ap.add_argument("--clutter", type=float, default=0.3)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", default="untrained,ibot,odis")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("-o", "--override", action="append", default=[], help="config key=value (repeatable)")
    ap.add_argument("--data", default=str(mr.REPO / ".devdata" / "mnist_variants"))
    ap.add_argument("--results", default=str(mr.REPO / "runs" / "mnist_variants"))
    a = ap.parse_args(argv)
    methods = a.methods.split(",")
    if not set(methods) <= {*mr.METHODS, "untrained"}:
        ap.error(f"--methods {a.methods!r}: expected names from {', '.join((*mr.METHODS, 'untrained'))}")

    import torch

    from odis.eval.protocols import run_knn
    from odis.eval.settings import KnnSettings
    from odis.trainer.train import train

    torch.set_num_threads(2)
    data, results = Path(a.data) / a.name, Path(a.results)
    synth = {"size": a.size, "objects": _pair(a.objects, int), "scale": _pair(a.scale), "max_iou": a.max_iou,
             "clutter": a.clutter, "palette": "gray"}
    # through json once, so that tuples compare equal to the lists a cached prepared.json holds
    prepared, wanted = data / "prepared.json", json.loads(json.dumps({"synth": synth, "train": a.train, "val": a.val}))
    if not prepared.is_file():
        data.mkdir(parents=True, exist_ok=True)
        mr.prepare_mnist(data, a.train, a.val, synth)
        prepared.write_text(json.dumps(wanted))
    elif json.loads(prepared.read_text()) != wanted:  # a name is one variant: never train on other scenes silently
        ap.error(f"{prepared}: variant {a.name!r} was made with other settings ({prepared.read_text()}); "
                 "choose another --name or delete that folder")
    p = mr.Preset(ti_classes=0, mnist_train=a.train, mnist_val=a.val, recipe="configs/mini_cpu.yaml",
                  epochs={"mnist": a.epochs}, batch_size=64, workers=1, concurrency=1, budget_s=0, est_job_s=0,
                  overrides=(f"data.global_size={a.size}", *a.override))
    for seed in (int(s) for s in a.seeds.split(",")):
        for method in methods:
            out = results / "runs" / a.name / f"{method}-s{seed}"
            cfg = mr.job_config(p, data, "mnist", "odis" if method == "untrained" else method, seed, out)
            t0 = time.perf_counter()
            if method == "untrained":
                mr.untrained(p, cfg, seed, out)
                final = {}
            else:
                final = train(cfg, progress=False, overwrite=True)
            knn = {mode: run_knn(KnnSettings(out, str(data / "mnist-train"), str(data / "mnist-val"), mode=mode,
                                             ks=(20,), batch_size=256, workers=1, device=cfg.device))["results"][0]["top1"]
                   for mode in mr.BOX_MODES}
            row = {"name": a.name, "synth": synth, "method": method, "seed": seed, "epochs": a.epochs,
                   "steps": final.get("step", 0), "overrides": a.override,
                   "knn_top1": {m: round(v, 1) for m, v in knn.items()}, "seconds": round(time.perf_counter() - t0)}
            print(json.dumps(row), flush=True)
            results.mkdir(parents=True, exist_ok=True)
            with open(results / "variants.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
