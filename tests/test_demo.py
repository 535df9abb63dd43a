"""`odis demo` end to end (tiny size) and the run path of benchmarks/mini_repro.py (smoke preset, time guard).

These are the real commands on real data: odis synth -> import -> shard -> `python -m odis train` subprocesses ->
k-NN; mini_repro prepares from ../shared (Tiny-ImageNet subset, MNIST) and runs its job subprocesses.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "odis", "demo", "--out", str(out), "--size", "tiny",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("report.md", "loss.png", "boxes.png", "attention.png", "results.json"):
        assert (out / name).is_file(), name
    w, h = _png(out / "boxes.png")
    assert w >= 8 * 64 and h >= 64  # 8 val images in a row
    assert _png(out / "attention.png")[1] >= 3 * 2 * 2 * 48  # 3 images x 2 networks x (no box, box)
    res = json.loads((out / "results.json").read_text())
    assert set(res["knn"]) == {"untrained", "ibot", "odis"}
    for name, modes in res["knn"].items():
        assert set(modes) == {"none", "mask"}, name
        for mode, r in modes.items():
            assert math.isfinite(r["top1"]) and 0 <= r["top1"] <= r["top5"] <= 100, (name, mode, r)
        # `mask` really used a box for every image (none fell back to the whole image)
        full = json.loads((out / "knn" / f"{name}-mask.json").read_text())
        assert full["box_mode"] == "mask" and full["n_val"] > 0
        assert all(c["no_box"] == c["not_in_manifest"] == 0 for c in full["counts"].values()), full["counts"]
    for name in ("ibot", "odis"):
        assert math.isfinite(res["final_loss"][name]) and res["final_loss"][name] > 0
        assert (out / "runs" / name / "backbone.safetensors").is_file()
        cfg = (out / "runs" / name / "config.yaml").read_text()
        assert f"method: {name}" in cfg and "epochs: 2" in cfg
    # the GT boxes went into the shards (2-3 per scene), where the ODIS run and the `mask` evaluation take them
    from odis.shards import iter_samples

    first = next(iter(iter_samples(out / "shards" / "train")))
    assert 2 <= len(first.meta["boxes"]) <= 3
    report = (out / "report.md").read_text()
    for row in ("| untrained |", "| ibot |", "| odis |"):
        assert row in report
    assert "odis train -c" in report and "odis eval knn" in report  # the flow as commands
    assert "k-NN top-1" in proc.stdout  # the table is printed too


def test_demo_tiny_with_yolo_boxes(yolo320, tmp_path):
    """--weights: the detector's boxes are extracted, sharded (keys by path, the detector's id scheme) and a third
    network trains on them; the GT shards are untouched."""
    from odis.shards import iter_samples

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "odis", "demo", "--out", str(out), "--size", "tiny",
                           "--no-progress", "--weights", str(yolo320)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["knn"]) == {"untrained", "ibot", "odis", "odis-yolo"}
    assert all(math.isfinite(r["top1"]) for r in res["knn"]["odis-yolo"].values())
    yolo = list(iter_samples(out / "shards" / "train-yolo"))
    assert len(yolo) == 96 and all(s.meta["scores"] == [] or min(s.meta["scores"]) < 1.0 for s in yolo)
    assert sum(len(s.meta["boxes"]) for s in yolo) > 0  # COCO's detector finds some of the shapes
    assert "--shards " + str(out / "shards" / "train-yolo") in " ".join(res["commands"])
    assert "| odis-yolo | YOLO boxes |" in (out / "report.md").read_text()


def test_demo_bad_arguments_fail_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "odis", "demo", "--out", str(tmp_path), "--size", "huge"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--size must be one of" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "odis", "demo", "--out", str(tmp_path), "--size", "tiny",
                           "--weights", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "nope: not found" in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before any work


def _mini_repro():
    spec = importlib.util.spec_from_file_location("mini_repro", REPO / "benchmarks" / "mini_repro.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mini_repro"] = mod  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_data(shared, tiny_imagenet, tmp_path_factory):
    data = tmp_path_factory.mktemp("mini-repro-data")
    env = dict(os.environ, ODIS_SHARED=str(shared))
    proc = subprocess.run([sys.executable, "benchmarks/mini_repro.py", "prepare", "--preset", "smoke", "--data",
                           str(data)], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return data


def test_mini_repro_smoke_run_path(smoke_data, tmp_path):
    info = json.loads((smoke_data / "smoke" / "prepared.json").read_text())
    assert info["ti"]["train"] == 150 and len(info["ti"]["classes"]) == 3 and info["ti"]["val"] >= 24
    assert info["mnist"] == {"train": 48, "val": 24}
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("| date | machine | command | figures |\n|---|---|---|---|\n")
    res = tmp_path / "results"
    proc = subprocess.run([sys.executable, "benchmarks/mini_repro.py", "run", "--preset", "smoke", "--data",
                           str(smoke_data), "--results", str(res), "--benchmarks", str(bench)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((res / "mini_repro.json").read_text())
    assert [j["status"] for j in out["jobs"]] == ["done"] * 8  # 2 datasets x (3 methods + untrained) x 1 seed
    for r in out["results"]:
        assert r["steps"] == (0 if r["method"] == "untrained" else 2)
        for mode in ("none", "mask"):
            assert math.isfinite(r["knn"][mode]["top1"]) and r["knn"][mode]["n_val"] in (24, info["ti"]["val"])
    table = (res / "mini_repro.md").read_text()
    assert table.count("| ti |") == 4 and table.count("| mnist |") == 4 and "not run" not in table
    assert (res / "BENCHMARKS-row.md").read_text().strip() == bench.read_text().splitlines()[-1]
    rows = bench.read_text().splitlines()
    assert len(rows) == 3 and "mini_repro.py run --preset smoke" in rows[-1] and "ti/odis" in rows[-1]


def test_mini_repro_time_guard_skips_and_kills(smoke_data, tmp_path):
    """A job that cannot finish before the deadline is not started; one running at the deadline is killed; both
    are listed, and no row claims a number it does not have."""
    mr = _mini_repro()
    p = mr.Preset(**{**mr.asdict(mr.PRESETS["smoke"]), "est_job_s": 1.0, "concurrency": 2})

    class Args:
        preset, data, budget_s = "smoke", str(smoke_data), 4.0

    jobs = mr.plan_jobs(p, tmp_path)
    wall = mr.run_jobs(Args, p, jobs, tmp_path)
    assert wall < 15
    status = [j.status for j in jobs]
    assert status[:2] == ["killed", "killed"]  # started (estimate 1 s), still running at 4 s
    assert "skipped" in status and "done" not in status
    table = mr.markdown_table(mr.summarize(jobs), p, "smoke")
    assert table.count("not run") == 2 * 8


def test_mnist_variants_run_path(shared, tmp_path):
    """benchmarks/mnist_variants.py: a scene variant is made, each method trained and evaluated, one row each."""
    res = tmp_path / "results"
    cmd = [sys.executable, "benchmarks/mnist_variants.py", "--name", "v", "--objects", "2,2", "--scale", "0.45,0.55",
           "--train", "40", "--val", "20", "--epochs", "1", "--methods", "untrained,odis", "--data",
           str(tmp_path / "data"), "--results", str(res), "-o", "max_steps=2", "-o", "data.batch_size=16",
           "-o", "data.shuffle_buffer=20", "-o", "data.local_object_aware=true"]
    env = dict(os.environ, ODIS_SHARED=str(shared))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (res / "variants.jsonl").read_text().splitlines()]
    assert [(r["method"], r["steps"]) for r in rows] == [("untrained", 0), ("odis", 2)]
    assert rows[1]["synth"]["objects"] == [2, 2] and "data.local_object_aware=true" in rows[1]["overrides"]
    assert all(math.isfinite(r["knn_top1"][m]) for r in rows for m in ("none", "mask"))
    # the same name with other scenes is refused, naming the cached variant; so is an unknown method
    other = [c if c != "0.45,0.55" else "0.3,0.4" for c in cmd]
    proc = subprocess.run(other, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "prepared.json: variant 'v' was made with other settings" in proc.stderr
    proc = subprocess.run(cmd[:2] + ["--name", "w", "--methods", "ibot,mae"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--methods 'ibot,mae'" in proc.stderr


def test_demo_unwritable_out_is_one_line_before_any_work(unwritable_outs):
    """A file as --out or its parent, or /proc, ended in a traceback."""
    from typer.testing import CliRunner

    from odis.cli import app

    for out in unwritable_outs("demo", folder=True):
        r = CliRunner().invoke(app, ["demo", "--out", str(out), "--size", "tiny"])
        assert r.exit_code == 2 and f"error: --out {out}: " in r.output, r.output
