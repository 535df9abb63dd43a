"""The `odis` command line: parse, call the library or a pipeline, print. No logic lives here.

Each stage of the flow has its section below (boxes, shards, training, evaluation, pictures, demo).
"""
from __future__ import annotations

import os

# Offline and quiet by default, before any of these libraries is imported by a command.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import typer

app = typer.Typer(
    name="odis",
    help="ODIS: object-level self-distillation for ViT pretraining with bounding boxes.\n\n"
    "Flow: import-boxes / extract-boxes -> shard -> train -> eval / show.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Evaluate frozen features: k-NN, linear probe, dense nearest-neighbour retrieval.",
                       no_args_is_help=True)
show_app = typer.Typer(help="Pictures: boxes on images, OBJ attention maps, the ODIS views of a sample.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(show_app, name="show")


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ---- boxes: import-boxes, extract-boxes, stats -------------------------------------------------------------

# ---- shards: shard, verify ---------------------------------------------------------------------------------

# ---- training: train ---------------------------------------------------------------------------------------

# ---- evaluation: eval knn | linear | dense-nn ----------------------------------------------------------------

# ---- pictures: show boxes | attention | views ----------------------------------------------------------------

# ---- synthetic data and the demo: synth, demo ----------------------------------------------------------------


if __name__ == "__main__":
    app()
