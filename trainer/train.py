"""The training loop: composes the loader (trainer/data.py), the augmentation on the device and the Distiller.

One process per device; under `torchrun` it joins the process group (gloo on CPU, NCCL on GPU) and only rank 0
writes. Everything needed to continue a run lives in checkpoint.pt, and the data stream is a function of
(seed, step), so a killed run resumed with `--resume auto` continues with the same batches and the same losses.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from odis import schedules
from odis.distill import Distiller, Views, clip_gradients
from odis.model import check_obj_mask, export_backbone, load_error
from odis.trainer.config import Config, save_config, to_dict
from odis.trainer.metrics import MetricsLog

CHECKPOINT = "checkpoint.pt"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def process_group_backend(device: str) -> str:
    """NCCL for GPUs (`auto` included: the default recipes say auto), gloo for CPU processes."""
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if on_gpu else "gloo"


def setup_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes in the environment (a no-op for one process)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(requested: str, d: Dist) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was asked for, but no CUDA device is visible (use --device "
                             "cpu or auto)")
        # cuda:N names the GPU of a single process; under torchrun each process takes its LOCAL_RANK's
        index = int(requested.partition(":")[2]) if ":" in requested and d.world == 1 else d.local_rank
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def build_distiller(cfg: Config) -> Distiller:
    m, lo = cfg.model, cfg.loss
    return Distiller(cfg.method, m.arch, cfg.data.global_size, m.patch_size, drop_path_rate=m.drop_path_rate,
                     out_dim=m.out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim,
                     norm_last_layer=m.norm_last_layer, student_temp=lo.student_temp,
                     center_momentum=lo.center_momentum, lambda_obj=lo.lambda_obj, lambda_patch=lo.lambda_patch,
                     attn_impl=m.attn_impl, depth=m.depth, centering=lo.centering,
                     lambda_koleo=lo.lambda_koleo)


@dataclass
class State:
    """What the loop carries between steps besides the modules (saved in the checkpoint)."""

    step: int = 0
    bad_steps: int = 0  # non-finite losses skipped, in total
    bad_in_a_row: int = 0
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    """Every RNG this process's loop touches (its own GPU's only), as tensors and plain types (loadable with
    weights_only=True). The checkpoint holds one per rank: each rank draws its own drop-path masks."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(s["python"])
    if torch.cuda.is_available() and isinstance(s.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(s["cuda"])


def save_checkpoint(path: Path, distiller: Distiller, opt: torch.optim.Optimizer, state: State, cfg: Config,
                    data_states: list[dict], rng_states: list[dict], scaler=None) -> None:
    """Atomic and durable (write_durably): a crash leaves the old checkpoint or the new one, whole."""
    payload = {
        "step": state.step, "bad_steps": state.bad_steps, "bad_in_a_row": state.bad_in_a_row,
        "data": data_states,  # each rank's exact data position
        "rng": rng_states,  # each rank's random state
        "distiller": distiller.state_dict(), "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,  # fp16's loss scale
        "config": to_dict(cfg), "method": cfg.method,
        # what load_backbone reads: the teacher backbone under timm names
        "backbone_config": distiller.teacher.backbone.config(),
        "teacher_backbone": distiller.teacher.backbone.vit.state_dict(),
    }
    write_durably(path, lambda tmp: torch.save(payload, tmp))


def write_json(path: Path, obj) -> None:
    import json

    write_durably(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n"))


def write_durably(path: Path, write) -> None:
    """`write(tmp)`, then fsync, rename over `path` and fsync the folder: after a crash, of the process or of the
    node, `path` is the old file or the new one, whole (a rename alone may reach the disk before the data)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: Path, distiller: Distiller, opt: torch.optim.Optimizer, cfg: Config,
                    scaler=None) -> State:
    try:  # weights_only=True: a checkpoint from elsewhere cannot run code on load.
        ck = torch.load(path, map_location="cpu", weights_only=True)
        changed = config_changes(ck["config"], to_dict(cfg))
    except Exception as e:  # noqa: BLE001 -- truncated, not a checkpoint, not odis's: say which file
        raise load_error(path, e, "a readable odis checkpoint") from None
    if changed:
        raise ValueError(f"{path} was trained with another configuration; resuming would not continue that run:\n  "
                         + "\n  ".join(changed) + "\nStart a new run with another --out, or resume with the old "
                         "values (its config.yaml beside the checkpoint: -c that file).")
    distiller.load_state_dict(ck["distiller"])  # strict: a mismatch is an error, never silently random weights
    opt.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler"):  # a run that changed precision on resume starts a fresh scale
        scaler.load_state_dict(ck["scaler"])
    # The RNG state is applied by the caller once the data loader has started (starting it draws from torch's RNG).
    return State(step=ck["step"], bad_steps=ck["bad_steps"], bad_in_a_row=ck["bad_in_a_row"],
                 extra={"data": ck.get("data") or [], "rng": ck["rng"]})


# What a resume may change: where the data and the run live, how often to log, and how to run the same
# computation. Anything else (model, method, losses, schedules, batch, views, seed) changes what is trained.
RESUME_MAY_CHANGE = {"out", "max_steps", "log_every", "checkpoint_every", "max_bad_steps", "device", "precision",
                     "data.shards", "data.boxes", "data.num_workers", "model.compile"}


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every setting that differs and may not change on resume (keys in both only: a
    setting added by a newer odis is not a change)."""
    changes = []
    for key in old.keys() & new.keys():
        name, a, b = prefix + key, old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, name + ".")
        elif a != b and name not in RESUME_MAY_CHANGE:
            changes.append(f"{name}: {a!r} -> {b!r}")
    return sorted(changes)


# A run folder's own files: what --overwrite removes (and nothing else in the folder).
RUN_FILES = (CHECKPOINT, "backbone.safetensors", "metrics.csv", "config.yaml", "tb", "plots")


def prepare_run_folder(out: Path, resume: str | None, overwrite: bool, dd: Dist) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run. A fresh run never replaces a finished or
    resumable one unless asked (`overwrite`: only the run's own files are removed)."""
    ck = resolve_resume(resume, out)
    if ck is not None and overwrite:
        raise ValueError(f"--resume and --overwrite contradict each other ({ck} exists): choose one")
    old = [name for name in (CHECKPOINT, "backbone.safetensors") if (out / name).is_file()]
    if ck is None and old and not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(old)}): --resume auto continues it, --overwrite "
                         "starts over (removing its files), or choose another --out")
    if ck is None and overwrite and dd.main:
        for name in RUN_FILES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if dd.world > 1:
        dist.barrier()  # no rank may start before rank 0 has cleared the folder
    return ck


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        p = out / CHECKPOINT
        return p if p.is_file() else None
    p = Path(resume)
    p = p / CHECKPOINT if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {p}")
    return p


def set_schedules(opt, cfg: Config, it: int, spe: int, total: int, batch_total: int) -> dict:
    o = cfg.optim
    lr = schedules.lr(it, spe, o.epochs, o.lr, o.min_lr, o.warmup_epochs, batch_total)
    wd = schedules.weight_decay(it, total, o.weight_decay, o.weight_decay_end)
    for g in opt.param_groups:
        g["lr"] = lr
        if g.get("apply_wd"):
            g["weight_decay"] = wd
    lo = cfg.loss
    patch_warmup, patch_final = (lo.warmup_teacher_temp if lo.warmup_teacher_patch_temp is None
                                 else lo.warmup_teacher_patch_temp,
                                 lo.teacher_temp if lo.teacher_patch_temp is None else lo.teacher_patch_temp)
    return {"lr": lr, "wd": wd,
            "teacher_temp": schedules.teacher_temp(it, spe, lo.warmup_teacher_temp, lo.teacher_temp,
                                                   lo.warmup_teacher_temp_epochs),
            "teacher_patch_temp": schedules.teacher_temp(it, spe, patch_warmup, patch_final,
                                                         lo.warmup_teacher_temp_epochs),
            "momentum": schedules.teacher_momentum(it, total, o.momentum_teacher)}


def to_views(batch: dict, device: torch.device, method: str, step: int, seed: int, rank: int) -> Views:
    from odis.trainer.data import augment_batch

    # The photometric randomness is a function of (seed, step, rank): resuming needs no generator state.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    g, loc = augment_batch(batch, device, gen)
    obj = batch["obj_mask"].to(device, non_blocking=True) if method == "odis" else None
    valid = batch["obj_valid"].to(device, non_blocking=True) if method == "odis" else None
    mim = batch["mim_mask"].to(device, non_blocking=True) if method != "dino" else None
    return Views(g, loc if loc is not None and loc.shape[0] else None, obj, valid, mim)


def train(cfg: Config, resume: str | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or continue) a training run into cfg.out. Returns the final metrics of rank 0."""
    from odis.trainer.data import make_train_loader

    dd = setup_distributed(cfg.device)
    device = pick_device(cfg.device, dd)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    distiller = build_distiller(cfg).to(device)
    amp, scaler, precision = mixed_precision(cfg.precision, device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 head logits (odis/heads.py) at TF32 speed
    if cfg.method == "odis":  # before the run folder is touched: a refused run removes nothing (--overwrite)
        check_attention(distiller.teacher.backbone, amp, device, dd)
    ck = prepare_run_folder(out, resume, overwrite, dd)
    if cfg.model.compile:
        distiller.compile_backbones()  # before DDP wraps it; compiles lazily at the first steps
    opt = torch.optim.AdamW(distiller.param_groups(), lr=0.0)
    state = load_checkpoint(ck, distiller, opt, cfg, scaler) if ck else State()
    steps = _gather(state.step, dd)
    if any(st != steps[0] for st in steps):
        raise ValueError(f"the processes start from different steps {steps}: every node must see the same {out} "
                         "(put --out on a filesystem all nodes share)")
    model = wrap_ddp(distiller, device, dd)
    data_states = state.extra.get("data") or []
    if data_states and len(data_states) != dd.world and dd.main:
        logging.getLogger("odis.train").warning(
            f"the checkpoint holds the data positions of {len(data_states)} process(es), this run has {dd.world}: "
            "the resumed data stream differs from the uninterrupted run's")
    loader = make_train_loader(cfg, distiller.student.backbone.patch_size, dd.rank, dd.world,
                               start_step=state.step,
                               state=data_states[dd.rank] if len(data_states) == dd.world else None)
    if dd.main:  # written once the checkpoint and the data have passed their checks: a refused run leaves no trace
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    spe = loader.steps_per_epoch
    total = cfg.optim.epochs * spe
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
    batch_total = cfg.data.batch_size * dd.world
    log = MetricsLog(out, enabled=dd.main, start_step=state.step, total=stop, progress=progress)
    if dd.main:
        log.info(f"{cfg.method}: {stop - state.step} steps to go (epoch = {spe} steps of {batch_total} images), "
                 f"device {device} ({precision}), {dd.world} process(es)" + (f", resumed from {ck}" if ck else ""))
        if loader.box_report:  # every manifest row is a used box or a counted one: said, and kept with the run
            log.info("boxes: " + ", ".join(f"{k} {v}" for k, v in loader.box_report.items()))
            write_json(out / "boxes.json", loader.box_report)
        if cfg.model.compile:
            log.info("model.compile=true: the first steps compile the backbones" + (
                " (on a CPU compiled steps were slower than eager ones, BENCHMARKS.md: model.compile=false runs "
                "eager)" if device.type == "cpu" else ""))
    distiller.train()
    pace = Pace()
    it = start_batches(loader, state, cfg.seed, dd, resumed=ck is not None, stop=stop)
    while state.step < stop:
        batch = next(it)
        pace.got_batch()
        sched = set_schedules(opt, cfg, state.step, spe, total, batch_total)
        views = to_views(batch, device, cfg.method, state.step, cfg.seed, dd.rank)  # augmentation in float32
        with amp:
            parts = model(views, teacher_temp=sched["teacher_temp"], teacher_patch_temp=sched["teacher_patch_temp"])
        optimise(parts["loss"], distiller, opt, cfg, state, sched["momentum"], epoch=state.step // spe, dd=dd,
                 scaler=scaler)
        state.step += 1
        if state.step % cfg.log_every == 0 or state.step == stop:
            n_steps = cfg.log_every if state.step % cfg.log_every == 0 else max(1, state.step % cfg.log_every)
            row = log.reduce({"step": state.step, "epoch": round(state.step / spe, 4),
                              **{k: v.detach().float() for k, v in parts.items()}, **sched}, dd)
            log.write({**row, **pace.take(n_steps * batch_total), "bad_steps": state.bad_steps,
                       "fallbacks": float(batch["fallbacks"].float().mean()) if "fallbacks" in batch else 0.0,
                       **({"loss_scale": scaler.get_scale()} if scaler else {})})
        if state.step % cfg.checkpoint_every == 0 or state.step == stop:
            per_rank = _gather((loader.state_dict(), rng_state()), dd)
            if dd.main:
                save_checkpoint(out / CHECKPOINT, distiller, opt, state, cfg, [d for d, _ in per_rank],
                                [r for _, r in per_rank], scaler)
        pace.step_done()
    _check_ranks_agree(distiller, dd)
    if dd.main:
        log.info(f"data: {loader.stats}")
        write_json(out / "data.json", {"steps": [loader.spec.start_step, state.step], **loader.stats})
        write_durably(out / "backbone.safetensors", lambda tmp: export_backbone(distiller.teacher.backbone, tmp))
        log.plot()
        log.info(f"done: {out / 'backbone.safetensors'} (teacher backbone, timm names)")
    final = log.last if dd.main else None  # one summary line under torchrun, not one per rank
    log.close()
    if dd.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


class Pace:
    """Images per second and the share of the time spent waiting for the loader, between two log rows."""

    def __init__(self):
        self.t_wait = self.t_last = time.perf_counter()
        self.wait = 0.0

    def got_batch(self) -> None:
        self.wait += time.perf_counter() - self.t_wait

    def step_done(self) -> None:
        self.t_wait = time.perf_counter()

    def take(self, images: int) -> dict:
        now = time.perf_counter()
        seconds = max(now - self.t_last, 1e-9)
        row = {"img_per_s": images / seconds, "data_wait": self.wait / seconds}
        self.t_last, self.wait = now, 0.0
        return row


def check_attention(backbone, amp, device: torch.device, dd: Dist) -> None:
    """Refuse to train on an OBJ mask this device's attention kernels get wrong (odis.model.check_obj_mask), and
    name the other implementation where it passes: a silent error would cost the whole run. Every rank checks its
    own GPU and all of them stop if one fails (a rank stopping alone would leave the others waiting)."""
    problem = None
    impl = backbone.attn_impl
    with amp:
        found = check_obj_mask(backbone)
        if found is not None:
            other = "split" if impl == "mask" else "mask"
            backbone.attn_impl = other
            other_ok = check_obj_mask(backbone) is None
            backbone.attn_impl = impl
            problem = (f"model.attn_impl={impl} on {device} (PyTorch {torch.__version__}): {found}; " + (
                f"model.attn_impl={other} passes this check, use it" if other_ok else
                f"model.attn_impl={other} fails too: try precision=fp32 or another PyTorch"))
    problems = [p for p in _gather(problem, dd) if p]
    if problems:
        raise ValueError(problems[0])


def wrap_ddp(distiller: Distiller, device: torch.device, dd: Dist) -> torch.nn.Module:
    """The module the loop calls: DDP-wrapped under torchrun (after the checkpoint has loaded)."""
    if dd.world == 1:
        return distiller
    # Buffers (the centers) are all-reduced by the loss itself, not re-broadcast from rank 0 every forward; the
    # one sync at init is harmless: every rank starts from the same seed or checkpoint.
    return torch.nn.parallel.DistributedDataParallel(
        distiller, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)


def start_batches(loader, state: State, seed: int, dd: Dist, resumed: bool, stop: int):
    """The loader's batches, with this rank's RNG set as the checkpoint left it (or freshly seeded).

    Starting the loader's workers draws from torch's RNG, so the first batch is fetched before the RNG state is
    set - in fresh and resumed runs alike - or a resumed run's drop-path would see shifted random numbers."""
    it = iter(loader)
    if state.step < stop:
        it = itertools.chain([next(it)], it)
    rngs = state.extra.get("rng") or []
    rngs = [rngs] if isinstance(rngs, dict) else rngs  # a checkpoint of an older odis: rank 0's state only
    if resumed and len(rngs) == dd.world:
        set_rng_state(rngs[dd.rank])
    else:  # a different stream of randomness (drop-path) per rank; a resume on another number of processes
        torch.manual_seed(seed * 7919 + dd.rank + 104729 * state.step)  # cannot continue the old streams
    return it


def mixed_precision(precision: str, device: torch.device):
    """(autocast context, GradScaler or None, the precision chosen) for `precision` on `device`. The heads' logits
    and the losses run in float32 whatever this says (odis/heads.py, odis/losses.py)."""
    if precision == "auto":
        # compute capability >= 8 (Ampere on): torch's is_bf16_supported() also says True where bf16 is only
        # emulated (V100, T4), and slowly
        bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        precision = "fp32" if device.type != "cuda" else "bf16" if bf16 else "fp16"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), None, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    # fp16 overflows without loss scaling; iBOT and DINO train in fp16 with a GradScaler, the same way as here
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler, precision


def optimise(loss: torch.Tensor, distiller: Distiller, opt: torch.optim.Optimizer, cfg: Config, state: State,
             momentum: float, epoch: int, dd: Dist, scaler=None) -> None:
    """Backward, clipping, last-layer freezing, the optimiser and EMA steps (with fp16's GradScaler: the loss
    scaled, the gradients unscaled before clipping, a step with inf/NaN gradients skipped by the scaler, as
    iBOT does). A non-finite loss skips all of it on every rank (counted in `state`); `cfg.max_bad_steps` of them
    in a row stop the run."""
    opt.zero_grad(set_to_none=True)
    if not _all_finite(loss, dd):
        state.bad_steps += 1
        state.bad_in_a_row += 1
        if state.bad_in_a_row >= cfg.max_bad_steps:
            raise FloatingPointError(
                f"{state.bad_in_a_row} non-finite losses in a row at step {state.step}: stopping. Lower "
                f"optim.lr, check the data, or resume from the last checkpoint in {cfg.out}")
        return
    state.bad_in_a_row = 0
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if cfg.optim.clip_grad:
        if scaler is not None:
            scaler.unscale_(opt)
        clip_gradients(distiller.student, cfg.optim.clip_grad)
    if epoch < cfg.optim.freeze_last_layer_epochs:
        distiller.cancel_last_layer_grads()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    distiller.update_teacher(momentum)


def _check_ranks_agree(distiller: Distiller, dd: Dist) -> None:
    """DDP keeps replicas identical; a silent divergence (e.g. a rank skipping a step alone, or centers that were
    not all-reduced: buffers are checked too) must not pass."""
    if dd.world == 1:
        return
    sums = _gather([float(t.detach().double().sum()) for t in (*distiller.parameters(), *distiller.buffers())], dd)
    if any(s != sums[0] for s in sums[1:]):
        raise RuntimeError("the processes ended with different weights or centers: the replicas diverged")


def _gather(obj, dd: Dist) -> list:
    if dd.world == 1:
        return [obj]
    out = [None] * dd.world
    dist.all_gather_object(out, obj)
    return out


def _all_finite(loss: torch.Tensor, dd: Dist) -> bool:
    """Every rank must agree to skip a step, or DDP's gradient all-reduce would hang."""
    ok = torch.isfinite(loss.detach()).float()
    if dd.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)
