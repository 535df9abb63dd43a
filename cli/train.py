"""The train command (also `torchrun ... -m odis train`)."""
from __future__ import annotations

import typer

from odis.cli.common import app, fail


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    shards: str = typer.Option(None, help="Training shards: a folder with index.json, an index.json, a brace "
                               "pattern (shards/in1k-{000000..000127}.tar) or URLs (s3/gs/http via pipe:)."),
    boxes: str = typer.Option(None, help="Box manifest (parquet) joined by image_id, the only box source when "
                              "given (an image it does not list is trained whole). Default: the shards' own boxes."),
    config: str = typer.Option(None, "--config", "-c", help="A shipped recipe by name (tiny_cpu, mini_cpu, "
                               "vit_small_coco, vit_small_in1k, vit_base_in1k, vit_large_in1k) or a YAML file of "
                               "your own. Without it: the defaults of trainer/config.py (ODIS, ViT-S/16 at 224 px; "
                               "on a small CPU machine start from tiny_cpu)."),
    method: str = typer.Option(None, help="odis | ibot | dino (overrides the recipe; default odis)."),
    out: str = typer.Option(None, help="Run folder (default: the recipe's `out`)."),
    resume: str = typer.Option(None, help="'auto' (continue from OUT/checkpoint.pt if present) or a checkpoint. "
                               "It must have been trained with the same recipe (a changed setting is refused)."),
    overwrite: bool = typer.Option(False, help="Start over in an --out that already holds a run (removes its "
                                   "checkpoint, export, metrics, config, tb/ and plots/; nothing else)."),
    max_steps: int = typer.Option(None, help="Stop after this many steps (the schedules still span the epochs)."),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N (default auto: the GPU when there is one)."),
    precision: str = typer.Option(None, help="auto | bf16 | fp16 | fp32 (default auto: bf16 on GPUs that have it, "
                                  "else fp16 with loss scaling, as on a V100 or T4; fp32 on CPU)."),
    box_sampling: str = typer.Option(None, help="uniform | area: how one box per image is drawn each step."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Pretrain a ViT with ODIS (or the iBOT / DINO baselines, same code).

    Extra arguments are dotted config overrides, e.g. `optim.epochs=10 data.batch_size=32 model.arch=vit_tiny_patch16_224`.
    Under torchrun (`torchrun --nproc_per_node 8 -m odis train ...`) each process trains on its own device and
    only rank 0 writes OUT: config.yaml, checkpoint.pt, backbone.safetensors, metrics.csv, tb/, plots/.
    """
    from odis.trainer.recipes import load_config
    from odis.trainer.train import train as run_training

    options = {"data.shards": shards, "data.boxes": boxes, "method": method, "out": out, "max_steps": max_steps,
               "device": device, "precision": precision, "data.box_sampling": box_sampling}
    try:
        cfg = load_config(config, list(ctx.args), options)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if not cfg.data.shards:
        fail("no training data: give --shards (or data.shards in the config)")
    try:
        final = run_training(cfg, resume=resume, progress=not quiet, overwrite=overwrite)
    except (FileNotFoundError, FloatingPointError, ValueError) as e:
        fail(str(e))
    if final:
        typer.echo(f"step {final['step']}: loss {final['loss']:.4f} -> {cfg.out}")
