"""Image ids: the id schemes and the rule that one id names one file.

An image id keys a sample at every stage (manifest, shard, train), so every stage computes it here. A manifest
records its scheme as `odis.id_scheme`; any stage that must match keys uses the same one.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

ID_SCHEMES = ("path", "stem", "coco")
_UNSAFE = re.compile(r"[^\w\-]", re.UNICODE)  # keep letters, digits, '_' and '-'; everything else becomes '_'
# The same rule as a byte table for ASCII text (nearly every path): a translate is several times faster than the
# regex, and ids are computed for every file `odis shard` writes.
_SAFE_ASCII = bytes(c if chr(c).isalnum() or chr(c) in "_-" else ord("_") for c in range(128)) + b"_" * 128
_SAFE_ASCII_NUL = b"\0" + _SAFE_ASCII[1:]  # _SAFE_ASCII that keeps NUL, the separator of _plain_path_ids

# A COCO image's file stem: its id (up to 12 digits, zero-padded or not), after `COCO_train2014_` in COCO-2014.
_COCO_STEM = re.compile(r"(?:COCO_[A-Za-z0-9]+_)?(\d{1,12})", re.ASCII)


def _sanitise(text: str) -> str:
    """`text` with every character other than letters, digits, '_' and '-' replaced by '_'."""
    if text.isascii():
        return text.encode("ascii").translate(_SAFE_ASCII).decode("ascii")
    return _UNSAFE.sub("_", text)


def image_id_for(relpath: str, scheme: str = "path") -> str:
    """The stable, unique, dot-free key of the image at `relpath` (POSIX path relative to the images root).

    Schemes:
    - "path" (folders, the default): every character other than letters, digits, '_' and '-' ('/' and '.'
      included) becomes '_', then '-' and the first 10 hex digits of SHA-1(relpath) are appended, so two paths
      that sanitise alike ('a/b.jpg', 'a_b.jpg', 'a/b.png') still get different ids.
      `train/dog 1.jpg` -> `train_dog_1_jpg-<sha1[:10]>`.
    - "stem" (ImageNet, Tiny-ImageNet, whose file stems are unique): the file stem, unsafe characters -> '_'.
    - "coco": the number that ends a COCO file name, `NNNNNNNNNNNN.jpg` (2017) or `COCO_<split>_NNNNNNNNNNNN.jpg`
      (2014), 12-digit zero-padded (`000000000139`): the JSON's image id, as import-boxes keys COCO rows. Any other
      stem is a ValueError naming the file (its digits would make a wrong id, e.g. the 2014 of the split).
    """
    if type(relpath) is str and relpath.isascii() and "\\" not in relpath and relpath[:1] != "/":
        rel = relpath  # nearly every path: ASCII is already NFC, with no '\\' to turn, so skip the normalising
    else:
        rel = unicodedata.normalize("NFC", str(relpath).replace("\\", "/")).lstrip("/")
    if not rel:
        raise ValueError("image_id_for: empty path")
    if scheme == "path":
        return f"{_sanitise(rel)}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:10]}"
    stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if scheme == "stem":
        return _sanitise(stem)
    if scheme == "coco":
        m = _COCO_STEM.fullmatch(stem)
        if m is None:
            raise ValueError(f"{relpath}: not a COCO image name (NNNNNNNNNNNN.jpg or COCO_<split>_NNNNNNNNNNNN.jpg), "
                             "so it has no --id-scheme coco id; use --id-scheme stem (unique file stems) or path")
        return coco_image_id(m.group(1))
    raise ValueError(f"image_id_for: unknown scheme {scheme!r}, expected one of {ID_SCHEMES}")


def coco_image_id(image_id) -> str:
    """The image_id of a COCO image: its numeric id, 12-digit zero-padded (`000000000139`, the stem of COCO-2017
    file names); what import-boxes keys COCO rows by and the `coco` scheme gives."""
    return f"{int(image_id):012d}"


def image_ids_of(relpaths, scheme: str) -> dict[str, str]:
    """relpath -> image_id for a whole file list (see image_id_list)."""
    relpaths = list(relpaths)
    return dict(zip(relpaths, image_id_list(relpaths, scheme)))


def image_id_list(relpaths: list[str], scheme: str) -> list[str]:
    """image_id_for of each path, in order. ValueError naming the file when a name has no id under `scheme`, and
    when two files share one id: a key names one sample at every later stage (manifest, shard, train). An unknown
    scheme is an error about the option, whatever the files."""
    if scheme not in ID_SCHEMES:
        raise ValueError(f"--id-scheme {scheme!r}: expected one of {', '.join(ID_SCHEMES)}")
    ids = _plain_path_ids(relpaths) if scheme == "path" else None
    if ids is not None and len(set(ids)) == len(ids):
        return ids
    ids, owner = [], {}
    for r in relpaths:
        try:
            i = image_id_for(r, scheme)
        except ValueError as e:  # named by its file once (the coco scheme's message starts with it already)
            msg = str(e).removeprefix("image_id_for: ")
            raise ValueError(msg if msg.startswith(f"{r}: ") else f"{r}: {msg}") from None
        if i in owner:
            raise ValueError(f"image_id {i!r} (--id-scheme {scheme}) is shared by {owner[i]}, {r}; ids must be "
                             "unique: use --id-scheme path (ids from the whole relative path)")
        owner[i] = r
        ids.append(i)
    return ids


def _plain_path_ids(relpaths: list[str]) -> list[str] | None:
    """The "path" ids of a list of plain paths (ASCII, no '\\', none empty or starting with '/'), the same as
    image_id_for's, but sanitised by one translate of the NUL-joined list rather than one per path (a whole
    folder's ids at once). None when any path is not plain (image_id_for then)."""
    try:
        joined = "\0".join(relpaths)
    except TypeError:  # not all str
        return None
    if (not joined.isascii() or "\\" in joined or joined.count("\0") != len(relpaths) - 1 or not relpaths
            or joined[:1] in ("", "/", "\0") or joined[-1] == "\0" or "\0\0" in joined or "\0/" in joined):
        return None
    raw = joined.encode("ascii")
    safe = raw.translate(_SAFE_ASCII_NUL).decode("ascii").split("\0")
    return [f"{name}-{hashlib.sha1(path).hexdigest()[:10]}" for name, path in zip(safe, raw.split(b"\0"))]
