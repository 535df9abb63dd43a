"""The training loop: composes the loader (trainer/data.py), the augmentation on the device and the Distiller.

One process per device (trainer/dist.py); only rank 0 writes the run folder (trainer/checkpoint.py). The data stream
is a function of (seed, step) and the checkpoint holds every rank's position and random state, so a resumed run
continues with the same batches and the same losses.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from odis import schedules
from odis.distill import Distiller, Views, clip_gradients
from odis.files import write_json
from odis.model import check_obj_mask
from odis.trainer.checkpoint import (CHECKPOINT, State, export_teacher, load_checkpoint, prepare_run_folder,
                                     rng_state, save_checkpoint, set_rng_state)
from odis.trainer.config import Config
from odis.trainer.recipes import save_config
from odis.trainer.dist import (Dist, all_finite, check_ranks_agree, finish, gather, training_device,
                               setup_distributed, wrap_ddp)
from odis.trainer.metrics import MetricsLog


def build_distiller(cfg: Config) -> Distiller:
    m, lo = cfg.model, cfg.loss
    return Distiller(cfg.method, m.arch, cfg.data.global_size, m.patch_size, drop_path_rate=m.drop_path_rate,
                     out_dim=m.out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim,
                     norm_last_layer=m.norm_last_layer, student_temp=lo.student_temp,
                     center_momentum=lo.center_momentum, lambda_obj=lo.lambda_obj, lambda_patch=lo.lambda_patch,
                     attn_impl=m.attn_impl, depth=m.depth, centering=lo.centering,
                     lambda_koleo=lo.lambda_koleo, lambda_img=lo.lambda_img)


def set_schedules(opt, cfg: Config, it: int, steps_per_epoch: int, total: int, batch_total: int) -> dict:
    """Set step `it`'s lr and weight decay in `opt`; returns them with the teacher's temperatures and momentum."""
    o = cfg.optim
    lr = schedules.lr(it, steps_per_epoch, o.epochs, o.lr, o.min_lr, o.warmup_epochs, batch_total)
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
            "teacher_temp": schedules.teacher_temp(it, steps_per_epoch, lo.warmup_teacher_temp, lo.teacher_temp,
                                                   lo.warmup_teacher_temp_epochs),
            "teacher_patch_temp": schedules.teacher_temp(it, steps_per_epoch, patch_warmup, patch_final,
                                                         lo.warmup_teacher_temp_epochs),
            "momentum": schedules.teacher_momentum(it, total, o.momentum_teacher)}


def to_views(batch: dict, device: torch.device, method: str, step: int, seed: int, rank: int) -> Views:
    from odis.augment import augment_batch

    # The photometric randomness is a function of (seed, step, rank): resuming needs no generator state.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    g, loc = augment_batch(batch, device, gen)
    obj = batch["obj_mask"].to(device, non_blocking=True) if method == "odis" else None
    valid = batch["obj_valid"].to(device, non_blocking=True) if method == "odis" else None
    mim = batch["mim_mask"].to(device, non_blocking=True) if method != "dino" else None
    local_masks = {name: batch[name].to(device, non_blocking=True) for name in ("local_obj_mask", "local_mim_mask")
                   if name in batch}  # present only with the Table 5 switches on
    return Views(g, loc if loc is not None and loc.shape[0] else None, obj, valid, mim, **local_masks)


def train(cfg: Config, resume: str | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or continue) a training run into cfg.out. Returns the final metrics of rank 0."""
    run = _open_run(cfg, resume, overwrite)
    proc, state, steps_per_epoch = run.proc, run.state, run.loader.steps_per_epoch
    total = cfg.optim.epochs * steps_per_epoch
    stop = total if cfg.max_steps is None else min(total, cfg.max_steps)
    log = MetricsLog(run.out, enabled=proc.main, start_step=state.step, total=stop, progress=progress)
    if proc.main:
        log.info(f"{cfg.method}: {stop - state.step} steps to go (epoch = {steps_per_epoch} steps of "
                 f"{cfg.data.batch_size * proc.world} images), device {run.device} ({run.precision}), "
                 f"{proc.world} process(es)" + (f", resumed from {run.checkpoint}" if run.checkpoint else ""))
        _report_start(log, cfg, run.loader, run.out, run.device)
    _run_steps(run, cfg, log, stop, total)
    check_ranks_agree(run.distiller, proc)
    if proc.main:
        log.info(f"data: {run.loader.stats}")
        write_json(run.out / "data.json", {"steps": [run.loader.spec.start_step, state.step], **run.loader.stats})
        backbone = export_teacher(run.out, run.distiller)
        log.plot()
        log.info(f"done: {backbone} (teacher backbone, timm names)")
    final = log.last if proc.main else None  # one summary line under torchrun, not one per rank
    log.close()
    finish(proc)
    return final


@dataclass
class _Run:
    """What a training run holds between its steps."""

    proc: Dist
    device: torch.device
    out: Path
    distiller: Distiller
    model: torch.nn.Module  # the distiller, DDP-wrapped under torchrun
    opt: torch.optim.Optimizer
    state: State
    loader: Any
    amp: Any
    scaler: Any
    precision: str
    checkpoint: Path | None


def _open_run(cfg: Config, resume: str | None, overwrite: bool) -> _Run:
    """The processes, the networks, the optimiser, the checkpoint and the data, each checked before the run folder
    is written: a refused run leaves no trace."""
    from odis.trainer.data import make_train_loader

    proc = setup_distributed(cfg.device)
    device = training_device(cfg.device, proc)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    distiller = build_distiller(cfg).to(device)
    amp, scaler, precision = mixed_precision(cfg.precision, device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 head logits (odis/heads.py) at TF32 speed
    if cfg.method == "odis":  # before the run folder is touched: a refused run removes nothing (--overwrite)
        check_attention(distiller.teacher.backbone, amp, device, proc)
    ck = prepare_run_folder(out, resume, overwrite, proc)
    if cfg.model.compile:
        distiller.compile_backbones()  # before DDP wraps it; compiles lazily at the first steps
    opt = torch.optim.AdamW(distiller.param_groups(), lr=0.0)
    state = load_checkpoint(ck, distiller, opt, cfg, scaler) if ck else State()
    steps = gather(state.step, proc)
    if any(st != steps[0] for st in steps):
        raise ValueError(f"the processes start from different steps {steps}: every node must see the same {out} "
                         "(put --out on a filesystem all nodes share)")
    model = wrap_ddp(distiller, device, proc)
    data_states = state.extra.get("data") or []
    if data_states and len(data_states) != proc.world and proc.main:
        logging.getLogger("odis.train").warning(
            f"the checkpoint holds the data positions of {len(data_states)} process(es), this run has {proc.world}: "
            "the resumed data stream differs from the uninterrupted run's")
    loader = make_train_loader(cfg, distiller.student.backbone.patch_size, proc.rank, proc.world,
                               start_step=state.step,
                               state=data_states[proc.rank] if len(data_states) == proc.world else None)
    if proc.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return _Run(proc, device, out, distiller, model, opt, state, loader, amp, scaler, precision, ck)


def _run_steps(run: _Run, cfg: Config, log: MetricsLog, stop: int, total: int) -> None:
    """Steps until `stop`: a log row every `log_every`, a checkpoint every `checkpoint_every` and at the end."""
    proc, state, steps_per_epoch = run.proc, run.state, run.loader.steps_per_epoch
    batch_total = cfg.data.batch_size * proc.world
    run.distiller.train()
    pace = Pace()
    it = start_batches(run.loader, state, cfg.seed, proc, resumed=run.checkpoint is not None, stop=stop)
    while state.step < stop:
        batch = next(it)
        pace.got_batch()
        sched = set_schedules(run.opt, cfg, state.step, steps_per_epoch, total, batch_total)
        views = to_views(batch, run.device, cfg.method, state.step, cfg.seed, proc.rank)  # augmentation in float32
        with run.amp:
            parts = run.model(views, teacher_temp=sched["teacher_temp"],
                              teacher_patch_temp=sched["teacher_patch_temp"])
        optimise(parts["loss"], run.distiller, run.opt, cfg, state, sched["momentum"],
                 epoch=state.step // steps_per_epoch, proc=proc, scaler=run.scaler)
        state.step += 1
        if state.step % cfg.log_every == 0 or state.step == stop:
            n_steps = cfg.log_every if state.step % cfg.log_every == 0 else max(1, state.step % cfg.log_every)
            row = log.reduce({"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                              **{k: v.detach().float() for k, v in parts.items()}, **sched}, proc)
            log.write({**row, **pace.take(n_steps * batch_total), "bad_steps": state.bad_steps,
                       "fallbacks": float(batch["fallbacks"].float().mean()) if "fallbacks" in batch else 0.0,
                       **({"loss_scale": run.scaler.get_scale()} if run.scaler else {})})
        if state.step % cfg.checkpoint_every == 0 or state.step == stop:
            per_rank = gather((run.loader.state_dict(), rng_state()), proc)
            if proc.main:
                save_checkpoint(run.out / CHECKPOINT, run.distiller, run.opt, state, cfg, [d for d, _ in per_rank],
                                [r for _, r in per_rank], run.scaler)
        pace.step_done()


def _report_start(log: MetricsLog, cfg: Config, loader, out: Path, device: torch.device) -> None:
    """Rank 0's lines on the boxes and the compiling before the first step."""
    if loader.box_report:  # every manifest row is a used box or a counted one: said, and kept with the run
        log.info("boxes: " + ", ".join(f"{k} {v}" for k, v in loader.box_report.items()))
        write_json(out / "boxes.json", loader.box_report)
    if cfg.model.compile:
        log.info("model.compile=true: the first steps compile the backbones" + (
            " (on a CPU compiled steps were slower than eager ones, BENCHMARKS.md: model.compile=false runs "
            "eager)" if device.type == "cpu" else ""))


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


def check_attention(backbone, amp, device: torch.device, proc: Dist) -> None:
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
    problems = [p for p in gather(problem, proc) if p]
    if problems:
        raise ValueError(problems[0])


def start_batches(loader, state: State, seed: int, proc: Dist, resumed: bool, stop: int):
    """The loader's batches, with this rank's RNG set as the checkpoint left it (or freshly seeded).

    Starting the loader's workers draws from torch's RNG, so the first batch is fetched before the RNG state is
    set - in fresh and resumed runs alike - or a resumed run's drop-path would see shifted random numbers."""
    it = iter(loader)
    if state.step < stop:
        it = itertools.chain([next(it)], it)
    rngs = state.extra.get("rng") or []
    rngs = [rngs] if isinstance(rngs, dict) else rngs  # a checkpoint of an older odis: rank 0's state only
    if resumed and len(rngs) == proc.world:
        set_rng_state(rngs[proc.rank])
    else:  # a different stream of randomness (drop-path) per rank; a resume on another number of processes
        torch.manual_seed(seed * 7919 + proc.rank + 104729 * state.step)  # cannot continue the old streams
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
             momentum: float, epoch: int, proc: Dist, scaler=None) -> None:
    """Backward, clipping, last-layer freezing, the optimiser and EMA steps (with fp16's GradScaler: the loss
    scaled, the gradients unscaled before clipping, a step with inf/NaN gradients skipped by the scaler, as
    iBOT does). A non-finite loss skips all of it on every rank (counted in `state`); `cfg.max_bad_steps` of them
    in a row stop the run."""
    opt.zero_grad(set_to_none=True)
    if not all_finite(loss, proc):
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


