"""Find the image files under a root: sorted POSIX relative paths with their sizes, the other files kept to be
counted, and what could not be listed (with the reason)."""
from __future__ import annotations

import os
from typing import NamedTuple

from odis.imageio import IMAGE_EXTENSIONS
from odis.pipelines.shard.native import native


class Scan(NamedTuple):
    images: list[tuple[str, int]]   # (relpath, size in bytes), sorted by relpath
    others: list[str]               # files that are not images (by extension), sorted
    warnings: list[dict]            # {"path", "reason"}: folders and files left out, and why


FILE, FOLDER, UNREADABLE = 0, 1, 2  # a folder entry's kind; its value: the size, 0, the reason


def scan_images(root: str) -> Scan:
    """odis.imageio.list_images (same extensions, hidden entries skipped, POSIX paths relative to `root`), plus
    each file's size, and symlinked folders followed.

    Folders reached through symbolic links are walked like real ones (a dataset is often assembled from links),
    but each folder (device, inode) is walked once: a link back to an ancestor would loop forever, and a second
    link to the same folder would put every image in twice. The walk is depth-first, each folder's entries in
    name order, so the same path to a folder is the one kept on every run; the others are listed in the warnings.
    Strings and folder listings, not pathlib: pathlib objects per file add minutes on ImageNet."""
    images, others, warnings = [], [], []
    seen: dict[tuple[int, int], str] = {}
    stack = [("", root)]  # (relative path + "/", path on disk); subfolders pushed in reverse name order
    while stack:
        prefix, path = stack.pop()
        entries = _list_folder(prefix, path, seen, warnings)
        # the common case, a folder of image files, in one comprehension: the loop below is the slow path
        files = [(prefix + name, value) for name, kind, value in entries
                 if kind == FILE and name.lower().endswith(IMAGE_EXTENSIONS)]
        images += files
        if len(files) == len(entries):
            continue
        subdirs = []
        for name, kind, value in entries:
            rel = prefix + name
            if kind == FOLDER:
                subdirs.append((rel + "/", os.path.join(path, name)))
            elif kind == UNREADABLE:  # a broken link, a file gone since listing, no permission
                warnings.append({"path": rel, "reason": f"cannot read ({value}): left out"})
            elif not name.lower().endswith(IMAGE_EXTENSIONS):
                others.append(rel)
        stack += reversed(subdirs)
    return Scan(_utf8_only(sorted(images), warnings), sorted(others), warnings)


def _utf8_only(images: list[tuple[str, int]], warnings: list) -> list[tuple[str, int]]:
    """The images whose names are UTF-8; the others (no manifest or index can hold their names) are left out by
    name, with their bytes shown escaped. All names are tried at once first: one call, not one a file."""
    try:
        "\0".join(rel for rel, _ in images).encode("utf-8")
        return images
    except UnicodeEncodeError:
        pass
    ok = []
    for rel, size in images:
        try:
            rel.encode("utf-8")
            ok.append((rel, size))
        except UnicodeEncodeError:
            shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            warnings.append({"path": shown, "reason": "the name is not UTF-8 (no manifest or index can hold it): "
                             "left out; rename the file"})
    return ok


def _list_folder(prefix: str, path: str, seen: dict, warnings: list) -> list[tuple[str, int, int | str]]:
    """(name, kind, value) of the visible entries of a folder not walked before, sorted by name; [] (and a
    warning) otherwise."""
    shown = prefix.rstrip("/") or "."
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            warnings.append({"path": shown, "reason": f"the folder {seen[key]!r} again (symbolic link): not "
                             "walked twice"})
            return []
        seen[key] = shown
        return sorted(_entries(path))  # names are unique: the order is by name
    except OSError as err:
        warnings.append({"path": shown, "reason": f"cannot list this folder ({err.strerror or err}): left out"})
        return []


def _entries_python(path: str) -> list[tuple[str, int, int | str]]:
    """The folder's visible entries, unsorted: is_dir() and stat() follow symbolic links."""
    out = []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                out.append((e.name, FOLDER, 0) if e.is_dir() else (e.name, FILE, e.stat().st_size))
            except OSError as err:
                out.append((e.name, UNREADABLE, err.strerror or str(err)))
    return out


def _entries(path: str) -> list[tuple[str, int, int | str]]:
    """_entries_python, in C when built (_fastpack.list_folder)."""
    fast = native("list_folder")
    return fast(path) if fast else _entries_python(path)
