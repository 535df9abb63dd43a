"""Evaluation command: eval retrieval (revisited Oxford / Paris)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from odis.cli.common import check_out_path, eval_app
from odis.cli.evaluate import _BACKBONE_HELP, _run


@eval_app.command("retrieval")
def eval_retrieval_cmd(
    backbone: Path = typer.Option(..., "--backbone", help=_BACKBONE_HELP),
    dataset: str = typer.Option(..., "--dataset", help="roxford5k | rparis6k."),
    root: Path = typer.Option(..., "--root", help="The folder holding DATASET/gnd_DATASET.pkl (or a converted "
                              ".json, preferred when both are there) and DATASET/jpg/NAME.jpg (revisitop's layout)."),
    gnd: Optional[Path] = typer.Option(None, "--gnd", help="Another ground-truth file (.pkl or .json with imlist, "
                                       "qimlist, gnd). Pickles are read with an allow-list: no code runs."),
    imsize: int = typer.Option(224, "--imsize", min=1, help="Each image is shrunk so its long side is at most this "
                               "(aspect kept, never enlarged; DINO: 224, or 512 with --multiscale)."),
    multiscale: bool = typer.Option(False, "--multiscale/--single-scale", help="Average the features at scales 1, "
                                    "1/sqrt(2) and 1/2 (DINO's --multiscale)."),
    query_crop: bool = typer.Option(True, "--query-crop/--no-query-crop", help="Crop each query to its bbx before "
                                    "the resize (revisitop's protocol); --no-query-crop: the whole query image, as "
                                    "DINO's script does."),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm architecture for checkpoints without odis metadata."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images of the same size run together."),
    workers: int = typer.Option(2, "--workers", min=0, help="Image-decoding processes."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    max_db: Optional[int] = typer.Option(None, "--max-db", min=1, help="Only the first N database images (a "
                                         "quick check; not the benchmark's number)."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", min=1, help="Only the first N queries."),
    out: Optional[Path] = typer.Option(None, "--out", help="Result JSON (with the AP of each query)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Another result JSON to print side by side."),
) -> None:
    """Image retrieval on the revisited Oxford / Paris, as DINO's eval_image_retrieval.py: the [OBJ]/[CLS] token
    of the whole image, L2-normalised, cosine ranking; mAP and mP@1/5/10 for the Medium and Hard protocols
    (revisitop's evaluation: junk images taken out of the ranking).

    \b
    odis eval retrieval --backbone runs/odis-s16 --dataset roxford5k --root data/revisitop --out rox.json
    odis eval retrieval --backbone runs/odis-s16 --dataset rparis6k --root data/revisitop --imsize 512 \\
        --multiscale --compare rpar-dino.json
    """
    from odis.eval.protocols import run_retrieval
    from odis.eval.settings import RetrievalSettings

    check_out_path(out, "--out")
    _run(run_retrieval, RetrievalSettings(backbone, dataset, root, gnd, imsize, multiscale, query_crop, arch,
                                          batch_size, workers, device, max_db, max_queries), out, compare)
