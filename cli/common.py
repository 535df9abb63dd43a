"""What the commands share: the typer apps, `fail`, option checks typer cannot say, output paths."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="odis",
    help="ODIS: object-level self-distillation for ViT pretraining with bounding boxes.\n\n"
    "Flow: import-boxes / extract-boxes -> shard -> train -> eval / show.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Evaluate frozen features: k-NN, linear probe, linear segmentation, dense "
                       "nearest-neighbour retrieval, image retrieval.",
                       no_args_is_help=True)
show_app = typer.Typer(help="Pictures: boxes on images, OBJ attention maps, the ODIS views of a sample.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(show_app, name="show")


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ---- checks shared by the commands: option ranges typer's min=/max= cannot say, output paths ------------------

def positive(value):
    """Option callback: a number that must be > 0 (typer's min= includes the bound; NaN is refused too)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


def number_list(cast, ok, expected: str, required: bool = True):
    """Option callback: comma-separated numbers, each `ok`, as a tuple (at least one when `required`)."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated {'integers' if cast is int else 'numbers'}, "
                                     f"got {text!r}") from None
        if required and not values:
            raise typer.BadParameter(f"expected at least one value, got {text!r}")
        bad = [v for v in values if not ok(v)]
        if bad:
            raise typer.BadParameter(f"each value must be {expected}, got {bad[0]}")
        return values
    return parse


def check_out_path(path: Optional[Path], option: str, folder: bool = False, suffixes: tuple = ()) -> None:
    """An output that cannot be written is a one-line error naming it, before any work: a folder given for a file
    or the reverse, a parent that is a file, a place where nothing can be created (read-only, /proc, /sys), a
    file name whose suffix names no format that can be written."""
    if path is None:
        return
    if suffixes and path.suffix.lower() not in suffixes:
        first = (".png", ".jpg", ".webp", ".pdf", ".svg")
        common = sorted(suffixes, key=lambda e: (first.index(e) if e in first else len(first), e))
        fail(f"{option} {path}: expected a file name ending in {', '.join(common[:5])}"
             + (f" (or {len(common) - 5} other formats)" if len(common) > 5 else ""))
    if path.is_dir() and not folder:
        fail(f"{option} {path}: is a folder, not a file")
    if folder and os.path.lexists(path) and not path.is_dir():
        fail(f"{option} {path}: is a file, not a folder")
    where = path if path.is_dir() else path.parent  # the nearest existing folder: what is missing gets created
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    if not where.is_dir():
        fail(f"{option} {path}: {where} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        fail(f"{option} {path}: cannot write in {where} ({e.strerror or e})")


@contextlib.contextmanager
def writing(path: Path, option: str):
    """An OSError while writing `path` (disk full, a folder gone since the check) is a one-line error naming it."""
    try:
        yield
    except OSError as e:
        fail(f"{option} {path}: cannot write it ({e.strerror or e})")


def picture_suffixes() -> tuple:
    """File suffixes Pillow can write (`odis show --out`)."""
    from PIL import Image

    Image.init()
    return tuple(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


def save_picture(pic, out: Path) -> None:
    with writing(out, "--out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        pic.save(out)
