"""The run folder: the checkpoint that continues a run, the exported backbone, and what a fresh run or a resume may
do to the folder.

Everything needed to continue a run lives in checkpoint.pt (modules, optimiser, loss scale, each rank's data position
and random state), so a killed run resumed with `--resume auto` continues with the same batches and the same
losses. Files are written with odis.files.write_atomic: a crash leaves the old file or the new one, whole.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from odis.distill import Distiller
from odis.files import write_atomic
from odis.model import export_backbone, load_error
from odis.outdir import OutputFolder, changed_settings, describe_changes
from odis.trainer.config import Config, to_dict
from odis.trainer.dist import Dist, barrier

CHECKPOINT = "checkpoint.pt"
BACKBONE = "backbone.safetensors"
# A run folder's own files and folders: what --overwrite removes (and nothing else in the folder).
RUN_FILES = (CHECKPOINT, BACKBONE, "metrics.csv", "config.yaml")
RUN_DIRS = ("tb", "plots")


@dataclass
class State:
    """What the loop carries between steps besides the modules (saved in the checkpoint)."""

    step: int = 0
    bad_steps: int = 0  # non-finite losses skipped, in total
    bad_in_a_row: int = 0
    extra: dict = field(default_factory=dict)  # from a checkpoint: "data" and "rng", one entry per rank


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
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


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


def export_teacher(out: Path, distiller: Distiller) -> Path:
    """The run's result: the teacher backbone as backbone.safetensors (timm names)."""
    return write_atomic(out / BACKBONE, lambda tmp: export_backbone(distiller.teacher.backbone, tmp))


# What a resume may change: where the data and the run live, how often to log, and how to run the same
# computation. Anything else (model, method, losses, schedules, batch, views, seed) changes what is trained.
RESUME_MAY_CHANGE = {"out", "max_steps", "log_every", "checkpoint_every", "max_bad_steps", "device", "precision",
                     "data.shards", "data.boxes", "data.num_workers", "model.compile"}


def config_changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting that differs and may not change on resume (keys in both only: a
    setting added by a newer odis is not a change)."""
    return describe_changes(changed_settings(old, new, ignore=RESUME_MAY_CHANGE))


def run_folder(out: Path) -> OutputFolder:
    return OutputFolder(out, files=RUN_FILES, dirs=RUN_DIRS)


def prepare_run_folder(out: Path, resume: str | None, overwrite: bool, proc: Dist) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run. A fresh run never replaces a finished or
    resumable one unless asked (`overwrite`: only the run's own files are removed)."""
    ck = resolve_resume(resume, out)
    if ck is not None and overwrite:
        raise ValueError(f"--resume and --overwrite contradict each other ({ck} exists): choose one")
    old = [name for name in (CHECKPOINT, BACKBONE) if (out / name).is_file()]
    if ck is None and old and not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(old)}): --resume auto continues it, --overwrite "
                         "starts over (removing its files), or choose another --out")
    if ck is None and overwrite and proc.main:
        run_folder(out).clear()
    barrier(proc)  # no rank may start before rank 0 has cleared the folder
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
