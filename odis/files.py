"""Writing a file so that a reader, or a run killed half-way, never sees half of it: the one atomic-write rule.

    write_atomic(path, write)     write(tmp) -> fsync -> rename over path -> fsync the folder
    write_json(path, obj)         the same for a JSON document
    tmp_pattern(name)             a regex for the temporary names a killed write_atomic leaves
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any], tmp: str | os.PathLike | None = None) -> Path:
    """`write(tmp)` into a hidden temporary name beside `path`, then fsync, rename over `path` and fsync the
    folder: after a crash, of the process or of the node, `path` is the old file or the new one, whole (a rename
    alone may reach the disk before the data). The temporary name is per process, so two writers never share it;
    `tmp` names it instead where the folder's owner must recognise what a killed run left (a shard's `.partial`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")  # what tmp_pattern finds
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """`obj` as JSON (UTF-8, non-ASCII kept; objects JSON cannot hold, such as paths, written as text)."""
    return write_atomic(path, lambda tmp: tmp.write_text(
        json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n", encoding="utf-8"))


def tmp_pattern(name: str) -> str:
    """A regex for the temporary files write_atomic leaves, when killed, beside files whose names match the regex
    `name`: the folder's owner counts them as its own (odis.outdir)."""
    return rf"\.(?:{name})\.tmp-[0-9]+"
