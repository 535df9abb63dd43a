"""Shared test fixtures: the real data in ../shared, a small Ray runtime, offline ultralytics."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ODIS_SHARED", REPO.parent / "shared"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="odis-yolo-cfg-"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared: data and weights. Missing in CI is a failure, never a skip."""
    assert (SHARED / "data").is_dir(), f"shared data not found at {SHARED} (set ODIS_SHARED)"
    return SHARED


@pytest.fixture(scope="session")
def coco_tiny(shared) -> Path:
    return shared / "data" / "coco_tiny"


@pytest.fixture(scope="session")
def tiny_imagenet(shared) -> Path:
    return shared / "data" / "tiny-imagenet-200-subset" / "tiny-imagenet-200"


@pytest.fixture(scope="session")
def yolo320(shared) -> Path:
    return shared / "weights" / "yolov8n_320_int8_openvino_model"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def compiled_graphs():
    """A function giving the number of graphs torch.compile has built since the test began: a compiled path that
    silently ran eager builds none."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture
def unwritable_outs(tmp_path):
    """`unwritable_outs(name, folder=False)`: output paths no command can write, each refused before any work: one
    under a file, the wrong kind (an existing folder where a file is written, a file where a folder is), and one
    under /proc, where nothing can be created (not even by root)."""
    (tmp_path / "a-file").write_text("x")

    def outs(name: str, folder: bool = False) -> list[Path]:
        return [tmp_path / "a-file" / name, tmp_path / "a-file" if folder else tmp_path, Path("/proc/odis-none") / name]
    return outs
