"""Webdataset shards: the format, index.json, and the reader API over a set of shards.

A shard set is a folder `NAME/` holding `PREFIX-000000.tar …` and `index.json` (written last). Each sample is
`KEY.jpg|png|webp` (the image bytes) + `KEY.json` = {"image_id", "label", "width", "height", "boxes", "scores"},
with `KEY == image_id`, dot-free and unique across the set; boxes are `[x0, y0, x1, y1]` in pixels of the stored
image, whose pixels are exactly what a plain decoder returns (no EXIF rotation left to apply).

Reader API (used by the trainer and the evaluators):
    list_shards(spec) -> list[str]          a folder, an index.json (path or http(s) URL), a brace pattern,
                                            any URL webdataset opens (pipe:, https:, gs:, …), or a list of these
    read_index(folder_or_index) -> dict      the parsed, checked index.json
    iter_samples(spec) -> Iterator[Sample]   every sample in order, for evaluators and tools
    shard_counts(spec, urls), shard_keys(urls)   samples per shard, every key, without reading the images
Reading the tars themselves is odis/tarscan.py; checking a set against its index is odis/verify.py.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from odis.names import plain_name, under
from odis.tarscan import iter_tar_samples, plain_tar_members, sample_key, sample_offsets

INDEX_NAME = "index.json"
INDEX_FORMAT = "odis-shards"
INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image members a sample may hold, in the order they are looked for
META_KEYS = ("image_id", "label", "width", "height", "boxes", "scores")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def is_remote(s: str) -> bool:
    """True for URLs webdataset opens with a helper (pipe:, https:, gs:, …); a bare path or file: is local."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", s)
    return bool(m) and m.group(1).lower() != "file" and len(m.group(1)) > 1  # "C:" is a drive, not a scheme


def local_path(s: str) -> Path:
    return Path(s[len("file://"):] if s.startswith("file://") else s[len("file:"):] if s.startswith("file:") else s)


# ---- the reader API ----------------------------------------------------------------------------------------

def list_shards(spec) -> list[str]:
    """Shard URLs/paths, in order, from a folder, an index.json, a brace pattern or any webdataset URL.

    - folder: the shards its index.json lists (only complete shards are ever listed), else its `*.tar` files
      (temporary `.NAME.tar.partial` files of a running or killed `odis shard` are never listed);
    - `…/index.json` (a path or an http(s) URL): the shards it lists, resolved next to it;
    - `shards/in1k-{000000..000127}.tar`, `pipe:aws s3 cp s3://b/in1k-{000000..000127}.tar -`, `https://…`:
      brace-expanded as webdataset does; local paths must exist;
    - a list of any of these, or several joined with `::`.
    Only the spec itself (what the user typed) may be a webdataset URL: every name read from an index.json or a
    folder listing is a plain file name resolved next to it (odis.names), never a scheme such as `pipe:`.
    Raises FileNotFoundError / ValueError naming the spec when nothing usable is found.
    """
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in list_shards(s)]
    s = os.fspath(spec)
    if "::" in s:
        return [u for part in s.split("::") if part for u in list_shards(part)]
    if is_remote(s):
        if s.endswith(".json") and s.startswith(("http://", "https://")):
            index = _load_index_json(_fetch_url(s), s)
            return [under(s, sh["name"], f"{s}: shards[{i}].name") for i, sh in enumerate(index["shards"])]
        return _braceexpand(s)
    p = local_path(s)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return _index_shards(p / INDEX_NAME)
        names = sorted(x.name for x in p.glob("*.tar") if not x.name.startswith("."))
        if not names:
            raise FileNotFoundError(f"{p}: no {INDEX_NAME} and no *.tar shards in this folder")
        return [under(str(p), n, f"{p} (a file in this folder)") for n in names]
    if p.suffix == ".json":
        return _index_shards(p)
    paths = _braceexpand(str(p))
    if paths == [str(p)] and not p.exists():  # a plain path, neither a folder, an index nor a shard
        raise FileNotFoundError(f"{s}: no such shard folder, index.json or .tar file")
    missing = [x for x in paths if not Path(x).is_file()]
    if missing:
        raise FileNotFoundError(f"{s}: {len(missing)} of {len(paths)} shard(s) not found, e.g. {missing[0]}")
    return paths


def _index_shards(index_path: Path) -> list[str]:
    """The shard paths an index.json lists, each name checked and resolved next to it."""
    return [under(str(index_path.parent), sh["name"], f"{index_path}: shards[{i}].name")
            for i, sh in enumerate(read_index(index_path)["shards"])]


def _braceexpand(s: str) -> list[str]:
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(s))


def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 (http/https only, checked by the caller)
        return r.read()


def read_index(folder_or_index) -> dict:
    """The index.json of a shard set (a folder or the file itself), checked for the fields readers rely on.

    Keys: format, version, prefix, shards [{name, count, sha256, bytes}], num_samples, classes (list or null),
    labels, source {images_root, manifest, manifest_sha256, coco_json}, settings, skipped [{path, reason}],
    warnings [{path, reason}], fingerprint, created_at, odis_version.
    """
    p = local_path(os.fspath(folder_or_index))
    if p.is_dir():
        p = p / INDEX_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no shard index here (is this an `odis shard` output folder?)")
    if p.suffix == ".tar":
        raise ValueError(f"{p}: one shard, not a shard set: give its folder or the folder's {INDEX_NAME}")
    return _load_index_json(p.read_bytes(), str(p))


def _load_index_json(data: bytes, where: str) -> dict:
    try:
        index = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # the second: a binary file
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{where}: not an odis shard index (expected format={INDEX_FORMAT!r})")
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{where}: index version {index.get('version')!r}, this odis reads {INDEX_VERSION}")
    shards = index.get("shards", [])
    if not isinstance(shards, list):
        raise ValueError(f"{where}: 'shards' must be a list, not {type(shards).__name__}")
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            raise ValueError(f"{where}: shards[{i}] must be an object, not {type(sh).__name__}")
        name = plain_name(sh.get("name", ""), f"{where}: shards[{i}].name")  # from a file others made
        for k, t in (("count", int), ("sha256", str)):
            if not isinstance(sh.get(k), t) or isinstance(sh.get(k), bool):
                raise ValueError(f"{where}: shards[{i}] ({name}) lacks {k!r}")
        if sh["count"] < 0:
            raise ValueError(f"{where}: shards[{i}] ({name}) has a negative count")
    return index


@dataclass
class Sample:
    key: str
    ext: str          # jpg | png | webp
    image: bytes      # the stored bytes, undecoded
    meta: dict        # the parsed json
    shard: str


def iter_samples(spec) -> Iterator[Sample]:
    """Every sample of the shards `spec` names, in shard order (no shuffling, no decoding)."""
    for url in list_shards(spec):
        f = _open_shard(url)
        try:
            for key, files in iter_tar_samples(f):
                ext = next((e for e in IMAGE_EXTS if e in files), None)
                if ext is None or "json" not in files:
                    raise ValueError(f"{url}: sample {key!r} lacks an image or its json (has {sorted(files)})")
                yield Sample(key, ext, files[ext], json.loads(files["json"]), url)
        finally:
            f.close()


def _open_shard(url: str):
    if is_remote(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(local_path(url), "rb")


def shard_keys(urls: list[str]) -> list[str] | None:
    """Every sample key of local shards from the tar headers alone (no member data is read); None if remote."""
    if any(is_remote(u) for u in urls):
        return None
    keys = []
    for u in urls:
        try:
            members = plain_tar_members(local_path(u))
            if members is not None:
                names = [name for name, _ in members]
            else:  # long names, GNU headers, ...: tarfile reads them, more slowly
                with tarfile.open(local_path(u), mode="r:") as tar:  # seekable: tarfile skips over member data
                    names = [m.name for m in tar if m.isfile()]
            keys.extend(k for k in map(sample_key, names) if k is not None)
        except (tarfile.TarError, OSError) as e:  # the readers skip and count such a shard; say it here too
            warnings.warn(f"{u}: unreadable shard, its keys are left out ({type(e).__name__}: {e}); "
                          "odis verify tells what is wrong", stacklevel=2)
    return keys


def shard_counts(spec_str: str, urls: list[str]) -> list[int] | None:
    """Samples per shard: from the index.json beside the spec or the shards, else from local tar headers; None
    for remote shards without an index."""
    indexes = []
    if is_remote(spec_str) and spec_str.startswith(("http://", "https://")) and spec_str.endswith(".json"):
        indexes.append(lambda: _load_index_json(_fetch_url(spec_str), spec_str))  # list_shards read it too
    candidates = [spec_str] if not is_remote(spec_str) else []
    if urls and not is_remote(urls[0]):
        candidates.append(str(local_path(urls[0]).parent / INDEX_NAME))
    for c in candidates:
        p = local_path(c)
        if (p.is_dir() and (p / INDEX_NAME).is_file()) or (p.suffix == ".json" and p.is_file()):
            indexes.append(lambda p=p: read_index(p))
    names = [u.rsplit("/", 1)[-1] for u in urls]
    for index in indexes:
        listed = {sh["name"].rsplit("/", 1)[-1]: int(sh["count"]) for sh in index()["shards"]}
        if all(n in listed for n in names):
            return [listed[n] for n in names]
    if any(is_remote(u) for u in urls):
        return None
    return [count_samples(local_path(u)) for u in urls]


def count_samples(path) -> int:
    """Samples in a local tar, from its headers; 0 (with a warning) for one that cannot be read."""
    try:
        offsets = sample_offsets(path)
        if offsets is not None:
            return len(offsets)
        with tarfile.open(path, mode="r:") as tar:
            keys = [sample_key(m.name) for m in tar if m.isfile()]
        return sum(1 for k, last in zip(keys, [None, *keys]) if k is not None and k != last)
    except (tarfile.TarError, OSError) as e:  # the readers count it when they meet it
        warnings.warn(f"{path}: unreadable shard ({type(e).__name__}: {e}); it counts as empty", stacklevel=2)
        return 0


def no_box_match_error(shards: str, manifest: str, shard_key: str, manifest_id: str) -> str:
    """The error for a box manifest that shares no image id with the shards: both id schemes, an id of each, and
    the fix. (Joined anyway, every image would silently fall back to the shards' own boxes or the whole image.)"""
    from odis.manifest import manifest_metadata

    m_scheme = manifest_metadata(manifest).get("id_scheme") or "?"
    try:
        s_scheme = read_index(shards).get("id_scheme") or "?"
    except (OSError, ValueError):  # a brace pattern or URL: no index to ask
        s_scheme = "?"
    fix = ("Make the manifest with the shards' scheme (odis extract-boxes --id-scheme {s}) or shard with the "
           "manifest's (odis shard --id-scheme {m})." if "?" not in (s_scheme, m_scheme) else
           "Make the manifest and the shards with the same --id-scheme (path, stem or coco).")
    return (f"--boxes {manifest}: none of the shards' image ids is in this manifest (shards {shards}: id scheme "
            f"{s_scheme}, e.g. {shard_key!r}; manifest: id scheme {m_scheme}, e.g. {manifest_id!r}). "
            + fix.format(s=s_scheme, m=m_scheme))
