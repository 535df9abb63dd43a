"""Find the image files under a root: sorted POSIX relative paths, the other files kept to be counted."""
from __future__ import annotations

import os

from odis.imageio import IMAGE_EXTENSIONS


def scan_images(root: str) -> tuple[list[str], list[str]]:
    """odis.imageio.list_images (same extensions, hidden entries skipped, sorted POSIX relative paths, the other
    files returned to be counted), with string paths: pathlib cost ~100 µs a file, minutes on ImageNet."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        for f in filenames:
            if not f.startswith("."):
                (images if f.lower().endswith(IMAGE_EXTENSIONS) else others).append(prefix + f)
    return sorted(images), sorted(others)
