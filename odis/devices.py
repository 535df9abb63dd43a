"""The one rule for `--device`: auto | cpu | cuda | cuda:N, for training and every evaluator."""
from __future__ import annotations

import torch


def pick_device(requested: str = "auto", local_rank: int | None = None) -> str:
    """The device to run on: `auto` is the GPU when there is one. Under torchrun (`local_rank` given) a CUDA
    request means the process's own GPU, whatever N says. Asking for CUDA where there is none is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was asked for, but no CUDA device is visible (use --device "
                             "cpu or auto)")
        index = local_rank if local_rank is not None else int(requested.partition(":")[2] or 0)
        return f"cuda:{index}"
    if requested != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    return "cpu"
