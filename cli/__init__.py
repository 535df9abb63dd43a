"""The `odis` command line: parse, call the library or a pipeline, print. No logic lives here.

Each stage of the flow has its module here: boxes, shards, train, evaluate (k-NN, linear, dense-nn), linear_seg,
retrieval, show, demo; common.py holds what they share.
"""
from __future__ import annotations

import os

# Offline and quiet by default, before any of these libraries is imported by a command.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

# Each module registers its commands on import; this order is the order of `odis --help` (the flow's order).
from odis.cli import boxes, shards, train, evaluate, linear_seg, retrieval, show, demo, experiment  # noqa: E402,F401,I001
from odis.cli.common import app  # noqa: E402

def main() -> None:
    """The console command `odis`, also `python -m odis` and `torchrun ... -m odis train ...`."""
    app(prog_name="odis")
