"""The one rule for names that come from files others made: an index.json's shard names, a folder listing, a
manifest's or a COCO JSON's image paths, a tar member's sample key.

Such a name is a plain name resolved under the folder (or URL) it came with. It can never become a URL scheme
(`pipe:` makes webdataset run a command), a command, an absolute path or a path outside that folder. Only what a
user types on the command line may be a `pipe:` or other webdataset URL.
"""
from __future__ import annotations

import os
import re
import urllib.parse

# A ':' is refused anywhere in a file name: it is how a name turns into a URL scheme (`pipe:`, `https:`) or a
# drive; odis never writes one. Control characters (NUL, newline) are refused too.
_UNSAFE_CHARS = re.compile(r"[:\\\x00-\x1f\x7f]")


class UnsafeName(ValueError):
    """A name from a file is not a plain name under its folder; the message names where it came from."""


def _why_unsafe(part: str, strict: bool = True) -> str | None:
    """Why one path component is not a plain name; `strict` (names a webdataset reader opens) also refuses a
    leading '.', ':', '\\' and control characters."""
    if not part:
        return "it is empty"
    if part in (".", ".."):
        return "it leaves its folder"
    if "\x00" in part:
        return "it holds a NUL byte"
    if strict and part.startswith("."):
        return "it starts with '.' (hidden or temporary files are never read)"
    m = _UNSAFE_CHARS.search(part) if strict else None
    if m:
        return f"it holds {m.group()!r} (a ':' could make it a URL or a command)"
    return None


def plain_name(name, where: str) -> str:
    """`name` if it is one plain file name (no folder part), else UnsafeName naming `where` and the reason."""
    if not isinstance(name, str):
        raise UnsafeName(f"{where}: {name!r} is not a file name")
    why = "it holds '/'" if "/" in name else _why_unsafe(name)
    if why:
        raise UnsafeName(f"{where}: {name!r} is not a plain file name: {why}")
    return name


def plain_relpath(relpath, where: str) -> str:
    """`relpath` if it is a relative POSIX path (`a/b.jpg`) of an image under a local root, else UnsafeName: never
    absolute, never `.` or `..`, no empty part (`a//b`). Local image paths are only ever opened as files, so a ':'
    (`12:00.jpg`) is allowed here; `under` anchors the result to its root."""
    if not isinstance(relpath, str):
        raise UnsafeName(f"{where}: {relpath!r} is not a path")
    if relpath.startswith("/"):
        raise UnsafeName(f"{where}: {relpath!r} is absolute; paths here are relative to their folder")
    for part in relpath.split("/"):
        why = _why_unsafe(part, strict=False)
        if why:
            raise UnsafeName(f"{where}: {relpath!r} is not a relative path under its folder: {why}")
    return relpath


def under(base: str | os.PathLike, name: str, where: str, nested: bool = False) -> str:
    """`name` (a plain file name, or with `nested` a plain relative path) resolved under `base`: a folder path, or
    an http(s) URL of a folder or of a file in it (an index.json). The result is never a URL of another kind."""
    base = os.fspath(base)
    remote = base.startswith(("http://", "https://"))
    name = plain_relpath(name, where) if nested and not remote else plain_name(name, where)  # URLs: the strict rule
    if remote:
        return urllib.parse.urljoin(base, urllib.parse.quote(name))
    # os.path.join keeps a "./" that pathlib drops: "." + "x" is "./x", never a bare name a reader could parse.
    return os.path.join(base or ".", name)


def sample_key_problem(key) -> str | None:
    """Why a tar sample's key is not a plain key (the contract: a dot-free file name), or None."""
    if not isinstance(key, str):
        return f"key {key!r} is not text"
    if "/" in key or "." in key or _why_unsafe(key):
        return f"key {key!r} is not a plain name (no '/', '.', ':', leading dot or control characters)"
    return None
