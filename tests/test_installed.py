"""odis installed as a user installs it: non-editable, into a fresh virtual environment, and run from a folder
outside the repository (synth -> import-boxes -> shard -> torchrun -m odis train -> eval knn).

What it proves: the wheel holds every module and the recipes (found by name), nothing resolves against the
checkout, and everything installs under the one name `odis` (no generic top-level module in site-packages).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "build", "dist", "runs", "shards", "*.egg-info", "__pycache__", "*.so",
                              ".pytest_cache", ".hypothesis", "tests")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv that sees the system's packages (torch, ray, ... are not downloaded again) with odis installed
    from a copy of the source tree, not in editable mode."""
    root = tmp_path_factory.mktemp("installed")
    src, env_dir = root / "src", root / "venv"
    shutil.copytree(REPO, src, ignore=SKIP)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True)
    pip = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(src)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(src)  # the installed copy must not need its source
    return env_dir


def _run(venv: Path, cwd: Path, *args: str, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ODIS_SHARED")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_installed_package_runs_the_flow_outside_the_checkout(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    py = str(venv / "bin" / "python")
    where = _run(venv, work, py, "-c", "import odis, odis.cli, odis.trainer, odis.pipelines, odis.configs; "
                 "print(odis.__file__)").strip().splitlines()[-1]
    assert Path(where).is_relative_to(venv), f"odis imported from {where}, not from the installed copy"
    site = Path(where).parents[1]
    generic = [n for n in ("cli", "cli.py", "trainer", "pipelines", "configs") if (site / n).exists()]
    assert generic == [], f"generic top-level modules installed: {generic}"

    odis = str(venv / "bin" / "odis")
    _run(venv, work, odis, "synth", "--out", "data", "--train", "48", "--val", "24", "--size", "32",
         "--objects", "1", "--format", "jpg")
    for split in ("train", "val"):
        _run(venv, work, odis, "import-boxes", "--format", "coco", "--images", f"data/{split}",
             "--annotations", f"data/annotations/instances_{split}.json", "--out", f"m-{split}.parquet")
        _run(venv, work, odis, "shard", "--images", f"data/{split}", "--out", f"sh-{split}", "--labels", "folder",
             "--manifest", f"m-{split}.parquet")
    # multi-process training needs no repository path: torchrun -m odis, a recipe by name (the venv's python
    # runs torchrun's module: the console script lives in the system's bin)
    log = _run(venv, work, py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
               "-m", "odis", "train", "-c", "tiny_cpu", "--shards", "sh-train", "--out", "run", "--quiet",
               "max_steps=2", "data.batch_size=8", "data.num_workers=0", "data.global_size=32",
               "data.local_size=16", "data.n_local=2")
    assert "2 process(es)" in log
    assert (work / "run" / "backbone.safetensors").is_file()
    _run(venv, work, odis, "eval", "knn", "--backbone", "run", "--train", "sh-train", "--val", "sh-val",
         "--k", "5", "--out", "knn.json")
    result = json.loads((work / "knn.json").read_text())
    assert result["n_val"] == 24, result
