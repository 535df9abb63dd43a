"""`odis demo`: the whole flow on generated data, with no download, and a short report.

    synth (shapes, exact boxes) -> import-boxes (COCO JSON -> manifest) -> shard -> train ODIS and iBOT
    -> k-NN on objects, without (`none`) and with the target's box (`mask`) -> report.md + PNGs

With `weights` (a YOLO model) the detector's boxes are also extracted and a third network is trained on them.

Layering: this module is a pipeline, so it may call odis/ and pipelines/ in-process but never imports trainer/.
Training runs as a subprocess of the real command, `python -m odis train ...`, which is also what a user would
type; every step's equivalent command is written to the report, so the demo doubles as a tour of the CLI.
"""
from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

RECIPE = "mini_cpu"  # a shipped recipe, found by name (configs/mini_cpu.yaml)
METHODS = ("ibot", "odis")
BOX_MODES = ("none", "mask")


@dataclass(frozen=True)
class DemoSize:
    train: int          # synthetic train scenes
    val: int            # synthetic val scenes
    epochs: int         # training epochs per network (the whole schedule; no early stop)
    batch_size: int
    objects: str = "1-2"  # target (+ a smaller distractor of another class: then the image label is ambiguous)
    knn_k: int = 20


SIZES = {
    # 10 epochs of 2000 scenes per network (310 steps of 64): about a minute per network on 2 cores.
    "default": DemoSize(train=2000, val=500, epochs=10, batch_size=64),
    # the test suite's end-to-end run: every step, seconds of training
    "tiny": DemoSize(train=96, val=48, epochs=2, batch_size=32, knn_k=10),
}


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step and where its log is."""


@dataclass
class DemoResult:
    out: str
    size: str
    seconds: dict = field(default_factory=dict)      # step -> wall seconds
    knn: dict = field(default_factory=dict)          # network -> box mode -> {"top1", "top5", "k"}
    final_loss: dict = field(default_factory=dict)   # network -> last logged loss
    commands: list = field(default_factory=list)     # the equivalent `odis ...` command of each step
    files: dict = field(default_factory=dict)        # report files


class _Steps:
    """Times each step, records its equivalent command and prints one line per step."""

    def __init__(self, result: DemoResult, echo: Callable[[str], None], progress: bool = True):
        self.result, self.echo, self.progress = result, echo, progress

    def run(self, name: str, command: list[str], fn: Callable[[], object]):
        self.result.commands.append(" ".join(shlex.quote(str(c)) for c in command))
        self.echo(f"[demo] {name}: {self.result.commands[-1]}")
        t0 = time.perf_counter()
        value = fn()
        self.result.seconds[name] = round(time.perf_counter() - t0, 1)
        self.echo(f"[demo] {name}: done in {self.result.seconds[name]:.1f} s")
        return value


# ---- data: synth, import, shard ---------------------------------------------------------------------------------

def make_data(out: Path, size: DemoSize, steps: _Steps, progress: bool) -> dict:
    """Synthetic scenes, their GT manifests and shards. Returns the paths the later steps need."""
    from odis.importers import import_coco
    from odis.manifest import write_manifest
    from odis.synth import SynthConfig
    from odis.synth_dataset import write_dataset
    from odis.pipelines.shard import ShardSettings, run_shard

    data, man, sh = out / "data", out / "manifests", out / "shards"
    lo, hi = (int(v) for v in size.objects.split("-"))
    # 32-px gray scenes: what a 0.4M-parameter ViT learns from in a minute on a CPU (colour is a nuisance it cannot
    # get past that fast; README, mini reproduction)
    cfg = SynthConfig(size=32, objects=(lo, hi), scale=(0.5, 0.8), max_iou=0.3, clutter=0.3, palette="gray", seed=0)
    steps.run("synth", ["odis", "synth", "--out", data, "--train", size.train, "--val", size.val, "--size", cfg.size,
                        "--objects", size.objects, "--scale", "-".join(map(str, cfg.scale)), "--max-iou", cfg.max_iou,
                        "--clutter", cfg.clutter, "--palette", cfg.palette, "--format", "jpg", "--overwrite"],
              lambda: write_dataset(data, cfg, size.train, size.val, fmt="jpg", overwrite=True, progress=progress))
    paths = {"data": data}
    for split in ("train", "val"):
        ann = data / "annotations" / f"instances_{split}.json"
        m = man / f"{split}-gt.parquet"

        def do_import(split=split, ann=ann, m=m):
            res = import_coco(data / split, ann)
            m.parent.mkdir(parents=True, exist_ok=True)
            write_manifest(res.table, m, res.metadata)

        steps.run(f"import-boxes {split}", ["odis", "import-boxes", "--format", "coco", "--images", data / split,
                                            "--annotations", ann, "--out", m, "--overwrite"], do_import)
        s = ShardSettings(images=str(data / split), out=str(sh / split), labels="folder", manifest=str(m))
        steps.run(f"shard {split}", ["odis", "shard", "--images", data / split, "--out", sh / split, "--labels",
                                     "folder", "--manifest", m, "--overwrite"],
                  lambda s=s: run_shard(s, overwrite=True, num_workers=1))
        paths[f"{split}_manifest"], paths[f"{split}_shards"] = m, sh / split
    return paths


def extract_detector_boxes(out: Path, images: Path, weights: str, steps: _Steps) -> tuple[Path, Path]:
    """YOLO boxes for the train images (a Ray job, run as the real command), sharded into their own shard set.

    The detector's manifest keys images by path (it knows no COCO ids), so its boxes are joined at shard time,
    where the shard keys follow the manifest's id scheme; the GT shards keep their COCO-id keys."""
    from odis.pipelines.shard import ShardSettings, run_shard

    m = out / "manifests" / "train-yolo.parquet"
    cmd = ["extract-boxes", "--detector", "yolo", "--weights", weights, "--images", images, "--out", m,
           "--imgsz", "320", "--conf", "0.1", "--overwrite", "--quiet"]
    steps.run("extract-boxes yolo", ["odis", *cmd], lambda: _odis(cmd, out / "logs" / "extract-boxes.log"))
    sh = out / "shards" / "train-yolo"
    s = ShardSettings(images=str(images), out=str(sh), labels="folder", manifest=str(m))
    steps.run("shard train (yolo boxes)", ["odis", "shard", "--images", images, "--out", sh, "--labels", "folder",
                                           "--manifest", m, "--overwrite"],
              lambda: run_shard(s, overwrite=True, num_workers=1))
    return m, sh


# ---- training (subprocesses of the real command) ----------------------------------------------------------------

def _odis(args: list, log: Path) -> None:
    """Run `python -m odis ARGS`, output to `log`; on failure raise with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "odis", *map(str, args)], stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise DemoError(f"`odis {args[0]}` failed (exit {rc}); log {log}:\n{tail}")


def train_network(out: Path, name: str, method: str, shards: Path, size: DemoSize, steps: _Steps) -> Path:
    """ODIS takes its boxes from the shards' json; iBOT ignores them (random crops)."""
    run = out / "runs" / name
    cmd = ["train", "-c", RECIPE, "--shards", shards, "--method", method, "--out", run, "--quiet", "--overwrite",
           f"optim.epochs={size.epochs}", f"data.batch_size={size.batch_size}"]
    steps.run(f"train {name}", ["odis", *cmd], lambda: _odis(cmd, out / "logs" / f"train-{name}.log"))
    return run


def untrained_backbone(like: Path, out: Path, seed: int = 0) -> Path:
    """The same architecture as `like`, freshly initialised with `seed`: the baseline a trained network must beat
    (with the trained run's seed, its initialisation)."""
    import torch

    from odis.model import OdisViT, export_backbone, load_backbone

    ref = load_backbone(like)
    torch.manual_seed(seed)
    model = OdisViT(ref.arch, img_size=ref.img_size, patch_size=ref.patch_size, depth=ref.depth)
    out.mkdir(parents=True, exist_ok=True)
    export_backbone(model, out / "backbone.safetensors")
    return out


# ---- evaluation and the report ----------------------------------------------------------------------------------

def knn_all(backbones: dict[str, Path], paths: dict, size: DemoSize, steps: _Steps, cache: Path) -> dict:
    """k-NN top-1/top-5 of every network in every box mode (val boxes: the GT in the shards; the largest box,
    which odis synth makes the target)."""
    from odis.eval.protocols import run_knn, write_result
    from odis.eval.settings import KnnSettings

    table: dict = {}
    for name, bb in backbones.items():
        for mode in BOX_MODES:
            res_path = cache.parent / "knn" / f"{name}-{mode}.json"
            cmd = ["odis", "eval", "knn", "--backbone", bb, "--train", paths["train_shards"], "--val",
                   paths["val_shards"], "--boxes-mode", mode, "--k", size.knn_k, "--out", res_path]
            res = steps.run(f"k-NN {name} {mode}", cmd, lambda bb=bb, mode=mode: run_knn(KnnSettings(
                bb, str(paths["train_shards"]), str(paths["val_shards"]), mode=mode, ks=(size.knn_k,),
                batch_size=128, workers=0, cache=str(cache), progress=steps.progress)))
            write_result(res, res_path)
            r = res["results"][0]
            table.setdefault(name, {})[mode] = {"top1": r["top1"], "top5": r["top5"], "k": r["k_effective"]}
    return table


def read_metrics(run: Path) -> dict[str, list[float]]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in ("step", "loss", "loss_obj",
                                                                                     "loss_patch")}
    return cols


def plot_losses(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, run in runs.items():
        m = read_metrics(run)
        for ax, key, title in zip(axes, ("loss", "loss_obj", "loss_patch"),
                                  ("total loss", "L_OBJ (ODIS) / L_CLS (iBOT)", "L_PATCH (masked patches)")):
            if m[key]:
                ax.plot(m["step"][:len(m[key])], m[key], label=name)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _val_examples(manifest: Path, n: int) -> list[tuple[str, list[float]]]:
    """(image path, target box) of the first n val images; the target is the largest box."""
    from odis.manifest import manifest_metadata, read_manifest

    df = read_manifest(manifest).to_pandas().dropna(subset=["x0"])
    df["area"] = (df.x1 - df.x0) * (df.y1 - df.y0)
    root = Path(manifest_metadata(manifest)["images_root"])
    out = []
    for _, rows in list(df.groupby("image_id"))[:n]:
        t = rows.sort_values("area").iloc[-1]
        out.append((str(root / t.path), [float(t.x0), float(t.y0), float(t.x1), float(t.y1)]))
    return out


def attention_picture(backbones: dict[str, Path], manifest: Path, path: Path, n: int = 3, cell: int = 96) -> None:
    """Per val image, per network: the view, the OBJ/CLS attention (mean of heads, then each head) of the last
    block. Trained networks attend with the target box (as ODIS trains); `none` rows show the plain CLS."""
    from PIL import Image, ImageDraw

    from odis.eval.attention import obj_attention_maps
    from odis.imageio import load_image
    from odis.model import load_backbone
    from odis.viz import attention_figure

    rows = []
    for img_path, box in _val_examples(manifest, n):
        img = load_image(img_path)
        for name, bb in backbones.items():
            model = load_backbone(bb)
            for use_box in (False, True):
                view, att, vbox = obj_attention_maps(model, img, box if use_box else None)
                row = attention_figure(view, att, vbox, cell)
                label = Image.new("RGB", (150, cell), "white")
                ImageDraw.Draw(label).text((4, cell // 2 - 12), f"{name}\n{'box: mask' if use_box else 'no box'}",
                                           fill="black")
                both = Image.new("RGB", (label.width + row.width, cell), "white")
                both.paste(label, (0, 0))
                both.paste(row, (label.width, 0))
                rows.append(both)
    width = max(r.width for r in rows)
    pic = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        pic.paste(r, (0, y))
        y += r.height
    pic.save(path)


def boxes_picture(manifests: list[Path], path: Path, n: int = 8) -> dict:
    """The first val images with their GT boxes (and, when given, train images with the detector's boxes)."""
    from PIL import Image

    from odis.manifest import manifest_metadata
    from odis.viz import manifest_grid

    pics, counts = [], {}
    for m in manifests:
        pic, c = manifest_grid(m, manifest_metadata(m)["images_root"], n=n, cols=n, cell=128)
        pics.append(pic)
        counts[m.stem] = c
    out = Image.new("RGB", (max(p.width for p in pics), sum(p.height for p in pics)), "white")
    y = 0
    for p in pics:
        out.paste(p, (0, y))
        y += p.height
    out.save(path)
    return counts


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.1f}"


def write_report(result: DemoResult, out: Path, size: DemoSize, labels: dict[str, str]) -> Path:
    lines = [f"# odis demo ({result.size})", "",
             f"{size.train} train / {size.val} val synthetic scenes (32 px gray, 10 shapes, {size.objects} objects per "
             "image: the target, whose class is the image label, plus distractors of other classes). "
             f"Networks: timm `test_vit` on 8-px patches, {size.epochs} epochs each (recipe `configs/mini_cpu.yaml`).",
             "", f"## k-NN top-1 on the val targets (k={size.knn_k}, %)", "",
             "| network | trained on | no box (`none`) | target box (`mask`) | top-5 none | top-5 mask | final loss |",
             "|---|---|---|---|---|---|---|"]
    for name, modes in result.knn.items():
        n, m = modes.get("none", {}), modes.get("mask", {})
        loss = result.final_loss.get(name)
        lines.append(f"| {name} | {labels.get(name, '')} | {_fmt(n.get('top1'))} | {_fmt(m.get('top1'))} | "
                     f"{_fmt(n.get('top5'))} | {_fmt(m.get('top5'))} | "
                     f"{'-' if loss is None else f'{loss:.3f}'} |")
    total = sum(result.seconds.values())
    lines += ["", "`none`: the CLS/OBJ token sees the whole image (which holds several classes); `mask`: the OBJ "
              "token attends only to the target's box (ODIS's box-conditioned inference, paper App. D.1). "
              "The train bank uses the same mode with the train targets' GT boxes.", "",
              "## Pictures", "", "- `loss.png`: training losses", "- `boxes.png`: val images with their GT boxes"
              + (" (second row: train images with the detector's boxes)" if "odis-yolo" in result.knn else ""),
              "- `attention.png`: last-block OBJ/CLS attention, view | mean of heads | each head", "",
              f"## Steps ({total:.0f} s in all)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result.seconds.items()]
    lines += ["", "## The same flow as commands", "", "```"] + result.commands + ["```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---- the whole flow ---------------------------------------------------------------------------------------------

def run_demo(out: str | Path = "runs/demo", size: str = "default", weights: str | None = None,
             progress: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if not (resources.files("odis.configs") / f"{RECIPE}.yaml").is_file():
        raise DemoError(f"the demo recipe {RECIPE}.yaml is missing from the installed package")
    if weights is not None and not Path(weights).exists():
        raise DemoError(f"--weights {weights}: not found")
    sz, out = SIZES[size], Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out=str(out), size=size)
    steps = _Steps(result, echo, progress)
    t0 = time.perf_counter()
    paths = make_data(out, sz, steps, progress)
    runs = {m: train_network(out, m, m, paths["train_shards"], sz, steps) for m in METHODS}
    labels = {"untrained": "-", "ibot": "random crops (no boxes)", "odis": "GT boxes"}
    manifests = [paths["val_manifest"]]
    if weights is not None:
        yolo, yolo_shards = extract_detector_boxes(out, paths["data"] / "train", weights, steps)
        runs["odis-yolo"] = train_network(out, "odis-yolo", "odis", yolo_shards, sz, steps)
        labels["odis-yolo"] = "YOLO boxes"
        manifests.append(yolo)
    base = untrained_backbone(runs["odis"], out / "runs" / "untrained")
    backbones = {"untrained": base, **runs}
    result.knn = knn_all(backbones, paths, sz, steps, out / "cache")
    result.final_loss = {n: read_metrics(r)["loss"][-1] for n, r in runs.items()}
    plot_losses(runs, out / "loss.png")
    counts = boxes_picture(manifests, out / "boxes.png")
    attention_picture({"ibot": runs["ibot"], "odis": runs["odis"]}, paths["val_manifest"], out / "attention.png")
    result.seconds["report"] = round(time.perf_counter() - t0 - sum(result.seconds.values()), 1)
    result.files = {k: str(out / f) for k, f in (("report", "report.md"), ("loss", "loss.png"),
                                                   ("boxes", "boxes.png"), ("attention", "attention.png"),
                                                   ("results", "results.json"))}
    write_report(result, out, sz, labels)
    (out / "results.json").write_text(json.dumps({**asdict(result), "box_grid_counts": counts}, indent=2))
    return result
