"""The trainer end to end on real shards (Tiny-ImageNet subset): a short run, exact resume, DDP with gloo,
and a box manifest that only partly matches the shards."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file

from odis.trainer.recipes import load_config
from odis.trainer.train import build_distiller, set_schedules, train

REPO = Path(__file__).resolve().parents[1]
# A tiny but complete recipe: ViT-tiny with 2 blocks, 8-px patches, 32-px globals, 2 x 16-px locals.
SMALL = ["model.arch=vit_tiny_patch16_224", "model.patch_size=8", "model.depth=2", "model.out_dim=128",
         "model.hidden_dim=128", "model.bottleneck_dim=64", "model.drop_path_rate=0.1", "data.global_size=32",
         "data.local_size=16", "data.n_local=2", "data.batch_size=8", "data.num_workers=2",
         "data.shuffle_buffer=50", "optim.epochs=4", "optim.warmup_epochs=1", "log_every=1", "device=cpu"]


@pytest.fixture(scope="module")
def tin_shards(tiny_imagenet, tmp_path_factory) -> Path:
    """3 classes x 50 real Tiny-ImageNet images with their GT boxes, sharded by the real `odis shard`."""
    root = tmp_path_factory.mktemp("tin")
    images = root / "train"  # the tiny-imagenet-200 layout: ROOT/train/<wnid>/images/*.JPEG + <wnid>_boxes.txt
    wnids = sorted(os.listdir(tiny_imagenet / "train"))[:3]
    for wnid in wnids:
        shutil.copytree(tiny_imagenet / "train" / wnid, images / wnid)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    manifest = root / "gt.parquet"
    run(["import-boxes", "--format", "tiny-imagenet", "--images", str(root), "--out", str(manifest)])
    out = root / "shards"
    run(["shard", "--images", str(images), "--out", str(out), "--labels", "folder", "--manifest", str(manifest),
         "--max-samples", "40"])
    return out


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "odis", *args], cwd=REPO, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"odis {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _cfg(shards: Path, out: Path, *extra: str):
    return load_config(overrides=[*SMALL, f"data.shards={shards}", f"out={out}", *extra])  # paths as typed


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss_obj"]), float(r["loss_patch"])) for r in csv.DictReader(f)]


def test_short_run_writes_a_loadable_backbone(tin_shards, tmp_path):
    out = tmp_path / "run"
    final = train(_cfg(tin_shards, out, "max_steps=12"), progress=False)
    rows = _losses(out)
    assert [r[0] for r in rows] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(r[1:])).all() for r in rows)
    assert final["step"] == 12
    for name in ("config.yaml", "checkpoint.pt", "backbone.safetensors", "metrics.csv", "plots/loss.png"):
        assert (out / name).is_file(), name
    exported = load_file(str(out / "backbone.safetensors"))
    vit = timm.create_model("vit_tiny_patch16_224", patch_size=8, depth=2, img_size=32, num_classes=0)
    vit.load_state_dict(exported, strict=True)
    assert load_config(out / "config.yaml") == _cfg(tin_shards, out, "max_steps=12")
    # the exported backbone is the teacher's; the teacher followed the student by EMA (moved from its initial
    # weights, yet not equal to the student); the head's last layer stayed frozen through epoch 1 (12 of 18 steps)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    w = ck["distiller"]
    assert all(torch.equal(v, ck["teacher_backbone"][k]) for k, v in exported.items())
    assert all(torch.equal(v, w[f"teacher.backbone.vit.{k}"]) for k, v in exported.items())
    cfg = _cfg(tin_shards, out, "max_steps=12")
    torch.manual_seed(cfg.seed)  # as train() does before building the networks
    init = build_distiller(cfg).state_dict()
    qkv = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(w[f"teacher.{qkv}"], init[f"teacher.{qkv}"])
    assert not torch.equal(w[f"teacher.{qkv}"], w[f"student.{qkv}"])
    for name in ("student.head.last_layer_v", "student.head.last_layer_g"):
        assert torch.equal(w[name], init[name]), name
    assert not torch.equal(w["student.head.mlp.0.weight"], init["student.head.mlp.0.weight"])


def test_resume_continues_with_the_same_losses(tin_shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(tin_shards, straight, "max_steps=10"), progress=False)
    train(_cfg(tin_shards, split, "max_steps=4"), progress=False)
    train(_cfg(tin_shards, split, "max_steps=10"), resume=str(split / "checkpoint.pt"), progress=False)
    a, b = _losses(straight), _losses(split)
    assert [r[0] for r in b] == list(range(1, 11))  # no duplicated or missing rows after the resume
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-6), (ra, rb)
    wa = torch.load(straight / "checkpoint.pt", weights_only=True)["distiller"]
    wb = torch.load(split / "checkpoint.pt", weights_only=True)["distiller"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fp16_trains_with_loss_scaling_and_resumes_the_same(tin_shards, tmp_path):
    """precision=fp16 (GPUs without bf16; here on the CPU): autocast in float16 with a GradScaler, the scale logged
    and checkpointed, and a resume continues the same losses."""
    fp32, straight, split = tmp_path / "fp32", tmp_path / "straight", tmp_path / "split"
    train(_cfg(tin_shards, fp32, "max_steps=2"), progress=False)
    train(_cfg(tin_shards, straight, "max_steps=6", "precision=fp16"), progress=False)
    train(_cfg(tin_shards, split, "max_steps=3", "precision=fp16"), progress=False)
    train(_cfg(tin_shards, split, "max_steps=6", "precision=fp16"), resume="auto", progress=False)
    a, b = _losses(straight), _losses(split)
    assert a[0] != _losses(fp32)[0]  # float16 arithmetic: not the fp32 numbers
    assert a == b
    with open(straight / "metrics.csv") as f:
        scales = [float(r["loss_scale"]) for r in csv.DictReader(f)]
    ck = torch.load(split / "checkpoint.pt", weights_only=True)
    assert ck["scaler"]["scale"] == scales[-1] and 1 <= scales[-1] <= 2.0 ** 16
    assert torch.load(fp32 / "checkpoint.pt", weights_only=True)["scaler"] is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # no CUDA here: autocast and the scaler say they are off
@pytest.mark.parametrize("capability, chosen", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                ((9, 0), "bf16")])
def test_auto_precision_follows_the_gpu_generation(monkeypatch, capability, chosen):
    """bf16 from Ampere on; before (V100 7.0, T4 7.5) fp16 with a GradScaler: torch's is_bf16_supported() says
    True there too (emulated, slow)."""
    from odis.trainer.train import mixed_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    _, scaler, precision = mixed_precision("auto", torch.device("cuda", 0))
    assert precision == chosen and (scaler is not None) == (chosen == "fp16")
    assert mixed_precision("auto", torch.device("cpu"))[2] == "fp32"


def test_compiled_backbones_train_like_eager_ones(tin_shards, tmp_path, compiled_graphs):
    """model.compile=true reaches the trainer: the backbones are compiled (inductor's C++ on a CPU), the losses are
    the eager run's, checkpoints and the export keep their names. (Early steps barely move the weights at this lr:
    the compiled gradients themselves are checked in test_distill.py.)"""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    steps = ["max_steps=3", "model.drop_path_rate=0.0"]  # drop-path draws differ between eager and compiled code
    train(_cfg(tin_shards, eager, *steps), progress=False)
    train(_cfg(tin_shards, compiled, *steps, "model.compile=true"), progress=False)
    assert compiled_graphs() >= 3  # compiled for real: teacher globals, student globals and locals
    a, b = _losses(eager), _losses(compiled)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-4, abs=1e-5), (ra, rb)
    wa = torch.load(eager / "checkpoint.pt", weights_only=True)["distiller"]
    wb = torch.load(compiled / "checkpoint.pt", weights_only=True)["distiller"]
    assert wa.keys() == wb.keys()
    exported = [load_file(str(run / "backbone.safetensors")).keys() for run in (eager, compiled)]
    assert exported[0] == exported[1]


def test_killed_run_resumes_from_its_last_checkpoint(tin_shards, tmp_path):
    """SIGKILL in the middle of a run; the checkpoint on disk stays whole and the rerun finishes the job."""
    out = tmp_path / "killed"
    args = ["train", "--shards", str(tin_shards), "--out", str(out), "--quiet", *SMALL,
            "checkpoint_every=2", "max_steps=14"]
    proc = subprocess.Popen([sys.executable, "-m", "odis", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = 240
        import time

        t0 = time.time()
        while not (out / "checkpoint.pt").is_file() and time.time() - t0 < deadline:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").is_file(), "no checkpoint was written"
        proc.kill()
    finally:
        proc.wait()
    done = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= done < 14
    res = run([*args, "--resume", "auto"])
    assert f"resumed from {out / 'checkpoint.pt'}" in res.stdout + res.stderr
    steps = [r[0] for r in _losses(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 14


def _torchrun(shards: Path, out: Path, *extra: str, env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "odis", "train", "--shards", str(shards), "--out", str(out), "--quiet", *SMALL,
           "data.num_workers=1", *extra]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def test_ddp_two_cpu_processes_and_their_resume(tin_shards, tmp_path):
    """torchrun with gloo: the ranks train on different samples and end with identical weights (the trainer
    compares them across ranks at the end and fails otherwise); a run stopped at step 2 and resumed ends exactly
    where the uninterrupted one does, each rank continuing its own data and drop-path streams."""
    straight, split = tmp_path / "ddp", tmp_path / "ddp-split"
    assert "2 process(es)" in _torchrun(tin_shards, straight, "max_steps=4")
    assert (straight / "backbone.safetensors").is_file()
    ck = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert len(ck["data"]) == 2 and len(ck["rng"]) == 2  # each rank's data position and random state
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    _torchrun(tin_shards, split, "max_steps=2")
    assert "resumed from" in _torchrun(tin_shards, split, "max_steps=4", "--resume", "auto")
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["distiller"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["distiller"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ddp_with_the_gpu_recipes_model_settings(tin_shards, tmp_path):
    """The GPU recipes compile the backbones and use attn_impl=mask, under DDP: torchrun trains that way too (the
    backbones are compiled in place before DDP wraps the distiller; the trainer fails if the ranks' weights end
    apart). Inductor's cache, empty before, shows the compiling happened."""
    cache = tmp_path / "inductor"
    out = _torchrun(tin_shards, tmp_path / "r", "max_steps=3", "model.compile=true", "model.attn_impl=mask",
                    env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert "2 process(es)" in out and "model.compile=true: the first steps compile" in out
    assert (tmp_path / "r" / "backbone.safetensors").is_file()
    assert any(p.suffix == ".py" for p in cache.rglob("*")), "nothing compiled"


def test_ranks_draw_different_samples(tin_shards):
    from odis.trainer.data import make_train_loader

    cfg = _cfg(tin_shards, "unused", "data.num_workers=0")
    keys = [next(iter(make_train_loader(cfg, 8, rank, 2)))["key"] for rank in (0, 1)]
    assert keys[0] != keys[1]


def test_partial_manifest_reports_counts(tin_shards, tmp_path):
    """--boxes with a manifest that covers only some shard images, plus ids that are in no shard."""
    index = pd.read_json(tin_shards / "index.json", typ="series")
    from odis.shards import list_shards
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(list_shards(str(tin_shards)), shardshuffle=False)]
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest

    cols = empty_columns()
    for k in keys[:30]:
        add_row(cols, k, f"{k}.JPEG", 64, 64, "yolo", box=(8, 8, 40, 40), score=0.9)
    for i in range(5):
        add_row(cols, f"not_in_shards_{i}", f"x{i}.JPEG", 64, 64, "yolo", box=(0, 0, 10, 10), score=0.9)
    manifest = tmp_path / "partial.parquet"
    write_manifest(table_from_columns(cols), manifest, make_metadata("yolo", tmp_path, "stem"))
    res = run(["train", "--shards", str(tin_shards), "--boxes", str(manifest), "--out", str(tmp_path / "p"),
               "--quiet", *SMALL, "max_steps=2"])
    text = res.stdout + res.stderr
    assert "boxes:" in text
    report = text[text.index("boxes:"):].splitlines()[0]
    assert "shard_images_with_manifest_boxes 30," in report and "manifest_ids_not_in_shards 5" in report, report
    assert "only 30 of 150 shard images are in this manifest" in text  # fewer than half: said
    assert len(index["shards"]) >= 1


def test_non_finite_losses_are_skipped_then_stop_the_run(tin_shards, tmp_path, monkeypatch):
    """A non-finite loss skips its step (no update, counted); max_bad_steps of them in a row stop the run with a
    clear error. The EMA centers survive the skipped steps."""
    from odis.distill import Distiller

    forward, calls, poison = Distiller.forward, [0], set()

    def maybe_nan(self, views, teacher_temp, teacher_patch_temp=None):
        out = forward(self, views, teacher_temp, teacher_patch_temp)
        calls[0] += 1
        if calls[0] in poison:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Distiller, "forward", maybe_nan)
    poison.update({3, 6})
    out = tmp_path / "nan"
    train(_cfg(tin_shards, out, "max_steps=6", "checkpoint_every=3"), progress=False)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # a bad last step still ends with a checkpoint
    assert (ck["step"], ck["bad_steps"], ck["bad_in_a_row"]) == (6, 2, 1)
    assert [r[0] for r in _losses(out)] == list(range(1, 7))  # and bad steps are logged rows
    assert torch.isfinite(ck["distiller"]["centers.obj"]).all()
    calls[0] = 0
    poison.update(range(1, 100))
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 2"):
        train(_cfg(tin_shards, tmp_path / "nan2", "max_steps=6", "max_bad_steps=3"), progress=False)


def test_a_run_folder_is_never_replaced_or_mixed_silently(tin_shards, tmp_path):
    """A fresh run refuses an --out holding a run; --overwrite removes only the run's files; a resume with another
    recipe, or from a broken checkpoint, is refused and leaves the folder as it was. The --out is a string as
    typed, `#` and all (options are not YAML)."""
    out = tmp_path / "exp #3"
    run(["train", "--shards", str(tin_shards), "--out", str(out), "--quiet", *SMALL, "max_steps=2"])
    assert (out / "checkpoint.pt").is_file()
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(tin_shards, out, "max_steps=2"), progress=False)
    with pytest.raises(ValueError, match=r"model.depth: 2 -> 1"):
        train(_cfg(tin_shards, out, "max_steps=4", "model.depth=1"), resume="auto", progress=False)
    assert load_config(out / "config.yaml").model.depth == 2
    broken = tmp_path / "broken.pt"
    broken.write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="broken.pt: not a readable odis checkpoint") as e:
        train(_cfg(tin_shards, out, "max_steps=4"), resume=str(broken), progress=False)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)  # one line, no advice to run its code
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"junk.pt: not a readable odis checkpoint \(UnpicklingError: ") as e:
        train(_cfg(tin_shards, out, "max_steps=4"), resume=str(junk), progress=False)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    (out / "notes.txt").write_text("mine")
    train(_cfg(tin_shards, out, "max_steps=1"), overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert [r[0] for r in _losses(out)] == [1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1


def test_a_refused_run_leaves_no_folder(tmp_path):
    """Shards with nothing readable stop the run before it writes anything (no run folder with a lone
    config.yaml), and the message sends the user to `odis verify`, not to data.epoch_samples."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "bad-000000.tar").write_bytes(bytes(range(256)) * 20)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="not one readable sample in 1 shard.*odis verify"):
        train(_cfg(tmp_path / "shards", out, "max_steps=1"), progress=False)
    assert not out.exists()


def test_an_obj_mask_the_kernels_get_wrong_stops_the_run(tin_shards, tmp_path, monkeypatch):
    """A kernel that drops full attention masks (as cuDNN's once did, silently) breaks attn_impl=mask, not split:
    the run stops before touching its folder (--overwrite included), naming the implementation that passes; a
    kernel that drops every mask fails both, and the message says so."""
    out = tmp_path / "run"
    train(_cfg(tin_shards, out, "max_steps=1", "model.attn_impl=split"), progress=False)  # a run to keep
    before = sorted(p.name for p in out.iterdir())
    real = torch.nn.functional.scaled_dot_product_attention

    def drops_full_masks(q, k, v, attn_mask=None, **kw):
        return real(q, k, v, attn_mask=None if attn_mask is not None and attn_mask.shape[-2] > 1 else attn_mask, **kw)

    def drops_all_masks(q, k, v, attn_mask=None, **kw):
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", drops_full_masks)
    with pytest.raises(ValueError, match=r"model.attn_impl=mask on cpu \(PyTorch .*\): the OBJ token sees the patches "
                       r"outside its box; model.attn_impl=split passes this check, use it"):
        train(_cfg(tin_shards, out, "max_steps=1", "model.attn_impl=mask"), progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # --overwrite removed nothing
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", drops_all_masks)
    with pytest.raises(ValueError, match=r"model.attn_impl=split .*; model.attn_impl=mask fails too"):
        train(_cfg(tin_shards, out, "max_steps=1"), progress=False, overwrite=True)


def test_the_patch_teacher_temperature_has_its_own_schedule():
    """loss.warmup_teacher_patch_temp / loss.teacher_patch_temp (iBOT's patch temperatures, same warmup epochs);
    unset, the patch targets follow the OBJ/CLS schedule."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    own = load_config(overrides=["loss.warmup_teacher_patch_temp=0.02", "loss.teacher_patch_temp=0.08",
                                 "loss.warmup_teacher_temp_epochs=2"])
    first, later = (set_schedules(opt, own, it, 10, 100, 64) for it in (0, 50))
    assert (first["teacher_temp"], first["teacher_patch_temp"]) == (0.04, 0.02)
    assert (later["teacher_temp"], later["teacher_patch_temp"]) == pytest.approx((0.07, 0.08))
    same = load_config(overrides=["loss.warmup_teacher_temp_epochs=2"])
    for it in (0, 5, 50):
        s = set_schedules(opt, same, it, 10, 100, 64)
        assert s["teacher_patch_temp"] == s["teacher_temp"]


def test_gpu_processes_use_nccl_by_default(monkeypatch):
    from odis.trainer.dist import process_group_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [process_group_backend(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == ["nccl"] * 3 + ["gloo"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_group_backend("auto") == "gloo"


def test_dino_run_and_the_lr_warmup_in_the_metrics(tin_shards, tmp_path):
    """--method dino end to end (OBJ/CLS loss only), and the logged schedules: lr rising linearly through the
    warm-up epoch, the teacher temperature from its start value."""
    out = tmp_path / "dino"
    final = train(_cfg(tin_shards, out, "method=dino", "max_steps=6"), progress=False)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert final["step"] == 6 and all(r["loss_patch"] in ("", None) for r in rows)
    assert all(float(r["loss"]) == pytest.approx(float(r["loss_obj"])) for r in rows)
    lr = [float(r["lr"]) for r in rows]
    assert all(b > a for a, b in zip(lr, lr[1:])) and lr[1] - lr[0] == pytest.approx(lr[2] - lr[1], rel=1e-6)
    assert float(rows[0]["teacher_temp"]) == pytest.approx(0.04)


@pytest.mark.parametrize("override, message", [
    ("data.bogus=3", "unknown config key 'data.bogus'"),
    ("data.batch_size=abc", "config key 'data.batch_size' expects int, got 'abc'"),
    ("data.box_sampling=weird", "data.box_sampling must be uniform|area, got 'weird'"),
    ("method=foo", "method must be one of"),
    ("nodot", "must look like key.sub=value"),
])
def test_bad_config_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("|", r"\|")):
        load_config(overrides=[override])


def test_train_options_reach_the_config_and_bad_values_are_named(tin_shards, tmp_path):
    res = subprocess.run([sys.executable, "-m", "odis", "train", "--shards", str(tin_shards), "--out",
                          str(tmp_path / "r"), "--precision", "fp8"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0 and "precision must be auto|bf16|fp16|fp32, got 'fp8'" in res.stdout + res.stderr
    assert not (tmp_path / "r").exists()


def test_every_recipe_loads_and_the_vit_s_one_is_ibots():
    """configs/*.yaml all load (keys and types checked); the ViT-S/16 IN1K recipe has iBOT's published values
    (REFERENCE-hparams.md: the 800-epoch ViT-S/16 command, 16 GPUs x 64)."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    c = load_config(REPO / "configs" / "vit_small_in1k.yaml")
    got = (c.model.arch, c.model.out_dim, c.model.norm_last_layer, c.model.drop_path_rate, c.data.global_size,
           c.data.local_size, c.data.n_local, tuple(c.data.global_scale), tuple(c.data.local_scale),
           c.data.batch_size, c.optim.epochs, c.optim.lr, c.optim.min_lr, c.optim.warmup_epochs,
           c.optim.weight_decay, c.optim.weight_decay_end, c.optim.momentum_teacher, c.optim.clip_grad,
           c.optim.freeze_last_layer_epochs, c.loss.warmup_teacher_temp, c.loss.teacher_temp,
           c.loss.warmup_teacher_temp_epochs, c.loss.student_temp, c.loss.center_momentum)
    assert got == ("vit_small_patch16_224", 8192, False, 0.1, 224, 96, 10, (0.25, 1.0), (0.05, 0.25), 64, 800,
                   5e-4, 1e-6, 10, 0.04, 0.4, 0.996, 3.0, 1, 0.04, 0.07, 30, 0.1, 0.9)
    assert (c.data.mask_prob, tuple(c.data.mask_ratio)) == (0.5, (0.1, 0.5))
    # the GPU recipes run the fastest step measured on a GPU (BENCHMARKS.md): compiled, the mask in one SDPA call
    for name in ("vit_small_in1k", "vit_small_coco", "vit_base_in1k", "vit_large_in1k"):
        c = load_config(REPO / "configs" / f"{name}.yaml")
        assert (c.model.compile, c.model.attn_impl) == (True, "mask"), name
