"""Run logging on rank 0: metrics.csv, TensorBoard, a tqdm progress bar, and loss-curve PNGs."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.distributed as dist

COLUMNS = ["step", "epoch", "loss", "loss_obj", "loss_patch", "loss_koleo", "loss_img", "t_entropy", "t_batch_entropy", "lr", "wd",
           "teacher_temp", "momentum", "img_per_s", "data_wait", "fallbacks", "bad_steps", "loss_scale"]


class MetricsLog:
    def __init__(self, out: Path, enabled: bool, start_step: int, total: int, progress: bool = True):
        self.out, self.enabled, self.last = Path(out), enabled, {}
        self.bar = self.tb = None
        if not enabled:
            return
        path = self.out / "metrics.csv"
        rows = []
        if start_step and path.is_file():  # resuming: keep only what the checkpoint covers
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.file = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step or None)
        except ImportError:  # tensorboard is a dependency; a broken install should not stop training
            self.tb = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)

    def info(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar else print)(msg)

    @staticmethod
    def reduce(row: dict, proc) -> dict:
        """Average tensor metrics over all processes (`proc`: trainer.dist.Dist); every rank must call this at the
        same step."""
        keys = [k for k, v in row.items() if isinstance(v, torch.Tensor)]
        if keys:
            vec = torch.stack([row[k].float().reshape(()) for k in keys])
            if proc.world > 1:
                dist.all_reduce(vec)
                vec /= proc.world
            row.update({k: float(v) for k, v in zip(keys, vec.cpu())})
        return row

    def write(self, row: dict) -> None:
        self.last = row
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.file.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])
        if self.bar:
            self.bar.n = row["step"]
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                 img_s=f"{row['img_per_s']:.0f}", wait=f"{row['data_wait']:.0%}")

    def plot(self) -> None:
        plot_metrics(self.out / "metrics.csv", self.out / "plots")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()
            if self.bar:
                self.bar.close()


def plot_metrics(csv_path: Path, out_dir: Path) -> list[Path]:
    """loss.png (total and parts) and schedules.png from a metrics.csv; a figure with nothing to show (a run that
    logged no row) is skipped, not an error that would hide why the run logged nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cols in (("loss", ["loss", "loss_obj", "loss_patch"]), ("schedules", ["lr", "teacher_temp"])):
        cols = [c for c in cols if c in df and df[c].notna().any()]
        if not cols:
            continue
        fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3), squeeze=False)
        for ax, c in zip(axes[0], cols):
            ax.plot(df["step"], df[c])
            ax.set_title(c)
            ax.set_xlabel("step")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
