"""Two torchrun "nodes" on this machine (CPU, gloo): `--nnodes 2 --nproc_per_node 1`, rendezvous on 127.0.0.1.

What is compared, and why:
- two nodes x 1 process == one node x 2 processes, step by step (losses, schedules) and in the exported weights.
  Both are world 2 with ranks 0 and 1, so the same data streams (trainer/stream.py: each rank's samples and random
  views are a function of the seed, the rank and the world size), the same drop-path and photometric randomness
  per rank, and the same all-reduces: the node boundary must change nothing.
- one process with data.batch_size doubled (the same global batch) is NOT an equality, by design: PassPlan cuts
  each pass into one contiguous range per (rank, worker), so the single process's step 1 takes the first 2B
  samples of the whole range (chunk-permuted with its own rank's seed) while ranks 0 and 1 take B from each half,
  and the views' randomness is seeded by the rank. What must hold is checked instead: the same schedules step by
  step (lr, weight decay, teacher temperature and momentum follow the global batch), the same epoch length, and
  over one epoch the same set of images (the two halves of the range are the single process's range), while
  step 1's images differ.
- a two-node run stopped at step 2 and resumed with `--resume auto` on the same two nodes ends where the
  uninterrupted two-node run does (losses of steps 3-4, final weights): the checkpoint that rank 0 wrote holds
  both ranks' data positions and random states, and the rank on the other node reads it.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from odis.trainer.recipes import load_config

pytestmark = pytest.mark.slow  # end-to-end runs of the real CLI, part of CI (about a minute on 2 CPU cores)

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
BATCH = 4  # per process; the single-process comparison runs 2 x BATCH
# ViT-tiny with 2 blocks, 8-px patches, 32-px globals, 2 x 16-px locals (as tests/test_train.py), the loader in
# the training process. No lr warm-up and a fast teacher EMA: in 4 steps the weights move far more than the
# tolerances below (checked), so equal weights are not just two barely trained networks.
SMALL = ["model.arch=vit_tiny_patch16_224", "model.patch_size=8", "model.depth=2", "model.out_dim=128",
         "model.hidden_dim=128", "model.bottleneck_dim=64", "model.drop_path_rate=0.1", "data.global_size=32",
         "data.local_size=16", "data.n_local=2", "data.num_workers=0", "data.shuffle_buffer=50", "optim.epochs=4",
         "optim.warmup_epochs=0", "optim.lr=0.02", "optim.momentum_teacher=0.9", "log_every=1", "device=cpu"]
ATOL = 1e-6  # on the weights (rtol 1e-5); each run moves them by more than 100 x this
TIMEOUT = 240  # seconds for one torchrun set-up (a hang in a rendezvous or a collective fails, never waits)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCHEDULES = ("epoch", "lr", "wd", "teacher_temp", "momentum")


@pytest.fixture(scope="module")
def tin_shards(tiny_imagenet, tmp_path_factory) -> Path:
    """3 classes x 50 real Tiny-ImageNet images with their GT boxes, sharded by the real `odis shard` (as in
    tests/test_train.py)."""
    root = tmp_path_factory.mktemp("tin")
    images = root / "train"
    wnids = sorted(os.listdir(tiny_imagenet / "train"))[:3]
    for wnid in wnids:
        shutil.copytree(tiny_imagenet / "train" / wnid, images / wnid)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    manifest = root / "gt.parquet"
    _odis("import-boxes", "--format", "tiny-imagenet", "--images", str(root), "--out", str(manifest))
    out = root / "shards"
    _odis("shard", "--images", str(images), "--out", str(out), "--labels", "folder", "--manifest", str(manifest),
          "--max-samples", "40")
    return out


def _odis(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "odis", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=TIMEOUT, env=ENV)
    assert res.returncode == 0, f"odis {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "odis", "train", "--shards", str(shards), "--out", str(out), "--quiet", *SMALL, *extra]


class Launch:
    """One training set-up started in the background: `python -m torch.distributed.run` once per node (all on
    this machine, rendezvous on 127.0.0.1), or with nnodes=0 one plain `python -m odis train`."""

    def __init__(self, nnodes: int, nproc: int, shards: Path, out: Path, *extra: str):
        self.what = f"torchrun --nnodes {nnodes} --nproc_per_node {nproc}" if nnodes else "one process"
        self.out, self.logs, self.procs, self.stopped, port = out, [], [], False, _free_port()
        for node in range(max(1, nnodes)):
            launcher = ["-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
                        "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
            self.logs.append(open(out.parent / f"{out.name}.node{node}.log", "w+"))
            self.procs.append(subprocess.Popen(
                [sys.executable, *(launcher if nnodes else []), *_train_args(shards, out, *extra)], cwd=REPO,
                env=ENV, stdout=self.logs[-1], stderr=subprocess.STDOUT))

    def failed(self) -> bool:
        return any(p.poll() not in (None, 0) for p in self.procs)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        # torchrun starts its workers in sessions of their own: SIGTERM makes the agent stop them, then itself
        for p in self.procs:
            if p.poll() is None:
                self.stopped = True
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def text(self) -> str:
        out = []
        for node, f in enumerate(self.logs):
            f.seek(0)
            out.append(f"--- node {node} ---\n" + f.read())
            f.close()
        return "\n".join(out)


def _run(*launches: Launch) -> list[str]:
    """Wait for set-ups started together; each must end with 0 within TIMEOUT. A failing process stops them all
    (its peers would wait in a rendezvous or a collective). Returns their logs."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(ln.running() for ln in launches) and not any(ln.failed() for ln in launches):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for ln in launches:
            ln.stop()
    texts = [ln.text() for ln in launches]
    for ln, text in sorted(zip(launches, texts), key=lambda lt: lt[0].stopped):  # the one that failed first
        rcs = [p.returncode for p in ln.procs]
        why = f" (stopped: {TIMEOUT} s passed or another set-up failed)" if ln.stopped else ""
        assert rcs == [0] * len(rcs), f"{ln.what} -> {ln.out.name}: exit codes {rcs}{why}\n{text[-6000:]}"
    return texts


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _losses(run: Path) -> list[list[float]]:
    return [[float(r[k]) for k in ("loss", "loss_obj", "loss_patch")] for r in _rows(run)]


def _initial_weights(run: Path) -> dict[str, torch.Tensor]:
    from odis.trainer.train import build_distiller

    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.seed)  # as train() does before building the networks
    return build_distiller(cfg).state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    """The exported teacher backbones, and the checkpoints' whole distiller (student, heads, centers), agree; and
    both moved from their initial values by far more than the tolerance."""
    init = _initial_weights(a)
    wa, wb = load_file(str(a / "backbone.safetensors")), load_file(str(b / "backbone.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=ATOL, msg=k)
    assert max(float((wa[k] - init[f"teacher.backbone.vit.{k}"]).abs().max()) for k in wa) > 100 * ATOL
    da = torch.load(a / "checkpoint.pt", weights_only=True)["distiller"]
    db = torch.load(b / "checkpoint.pt", weights_only=True)["distiller"]
    assert da.keys() == db.keys() == init.keys()
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=1e-5, atol=ATOL, msg=k)
    assert max(float((da[k].float() - init[k].float()).abs().max()) for k in da if k.startswith("student.")) \
        > 100 * ATOL


@pytest.fixture(scope="module")
def runs(tin_shards, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every set-up the tests compare, {name: (run folder, log)}; the independent ones run at the same time (their
    processes are single-threaded, and none waits on another set-up's): two nodes to STEPS steps ("two-nodes"),
    the same stopped at step 2 ("split") then resumed to STEPS ("resumed", the same folder), one node with two
    processes ("one-node"), one process with 2 x BATCH ("one-process")."""
    root = tmp_path_factory.mktemp("multinode")
    steps, batch = f"max_steps={STEPS}", f"data.batch_size={BATCH}"
    first = {"two-nodes": Launch(2, 1, tin_shards, root / "two-nodes", steps, batch),
             "split": Launch(2, 1, tin_shards, root / "split", "max_steps=2", batch),
             "one-process": Launch(0, 0, tin_shards, root / "one-process", steps, f"data.batch_size={2 * BATCH}")}
    done = dict(zip(first, zip((ln.out for ln in first.values()), _run(*first.values()))))
    assert torch.load(root / "split" / "checkpoint.pt", weights_only=True)["step"] == 2
    second = {"one-node": Launch(1, 2, tin_shards, root / "one-node", steps, batch),
              "resumed": Launch(2, 1, tin_shards, root / "split", steps, batch, "--resume", "auto")}
    done.update(zip(second, zip((ln.out for ln in second.values()), _run(*second.values()))))
    return done


@pytest.fixture(scope="module")
def two_nodes(runs) -> Path:
    """The uninterrupted two-node run to STEPS steps."""
    out, text = runs["two-nodes"]
    assert "2 process(es)" in text and f"steps of {2 * BATCH} images" in text
    assert [int(r["step"]) for r in _rows(out)] == list(range(1, STEPS + 1))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == STEPS and len(ck["data"]) == 2 and len(ck["rng"]) == 2  # both ranks' positions
    return out


def test_two_nodes_train_as_one_node_with_two_processes(runs, two_nodes):
    one_node, text = runs["one-node"]
    assert "2 process(es)" in text
    a, b = _rows(two_nodes), _rows(one_node)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_obj", "loss_patch", *SCHEDULES):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-4, abs=1e-6), (ra["step"], k, ra[k], rb[k])
    assert len({tuple(x) for x in _losses(two_nodes)}) == STEPS  # the losses moved: a real comparison
    _assert_same_weights(two_nodes, one_node)


def test_one_process_with_the_same_global_batch_follows_the_same_schedules(runs, two_nodes, tin_shards):
    """Not an equality of losses (the module docstring says why): the schedules, the epoch and, over an epoch,
    the images are the same; step 1's images are not."""
    single, text = runs["one-process"]
    assert "1 process(es)" in text and f"steps of {2 * BATCH} images" in text
    a, b = _rows(two_nodes), _rows(single)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in SCHEDULES:
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-6), (ra["step"], k, ra[k], rb[k])
    assert all(torch.isfinite(torch.tensor(x)).all() for x in _losses(single))
    assert _losses(single)[0] != pytest.approx(_losses(two_nodes)[0], rel=1e-4)  # other images, other losses,
    with pytest.raises(AssertionError):  # and other weights: the weight comparison tells runs apart
        _assert_same_weights(two_nodes, single)

    from odis.trainer.data import make_train_loader

    cfg = load_config(overrides=[*SMALL, f"data.shards={tin_shards}", "out=unused", f"data.batch_size={BATCH}"])
    two = [make_train_loader(cfg, 8, rank, 2) for rank in (0, 1)]
    cfg1 = load_config(overrides=[*SMALL, f"data.shards={tin_shards}", "out=unused", f"data.batch_size={2 * BATCH}"])
    one = make_train_loader(cfg1, 8, 0, 1)
    spe = one.steps_per_epoch
    assert spe == two[0].steps_per_epoch == two[1].steps_per_epoch
    keys_two = [[b["key"] for _, b in zip(range(spe), loader)] for loader in two]
    keys_one = [b["key"] for _, b in zip(range(spe), one)]
    assert set(keys_one[0]) != set(keys_two[0][0] + keys_two[1][0])  # step 1: other images
    epoch_one = [k for step in keys_one for k in step]
    epoch_two = [k for rank in keys_two for step in rank for k in step]
    assert len(epoch_one) == len(epoch_two) == spe * 2 * BATCH
    assert sorted(epoch_one) == sorted(epoch_two) and len(set(epoch_one)) == len(epoch_one)  # once each


def test_a_two_node_run_resumes_on_two_nodes(runs, two_nodes):
    split, text = runs["resumed"]
    assert f"resumed from {split / 'checkpoint.pt'}" in text
    assert "data position does not fit" not in text and "differs from the uninterrupted" not in text
    assert [int(r["step"]) for r in _rows(split)] == list(range(1, STEPS + 1))
    for la, lb in zip(_losses(two_nodes), _losses(split)):  # steps 1-2 from the first run, 3-4 resumed
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-6), (la, lb)
    _assert_same_weights(two_nodes, split)
