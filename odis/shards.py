"""Webdataset shards (DESIGN.md §2): the format, the reader API and `verify_shards`.

A shard set is a folder `NAME/` holding `PREFIX-000000.tar …` and `index.json` (written last). Each sample is
`KEY.jpg|png|webp` (the image bytes) + `KEY.json` = {"image_id", "label", "width", "height", "boxes", "scores"},
with `KEY == image_id`, dot-free and unique across the set; boxes are `[x0, y0, x1, y1]` in pixels of the stored
image, whose pixels are exactly what a plain decoder returns (no EXIF rotation left to apply).

Reader API (used by the trainer and the evaluators):
    list_shards(spec) -> list[str]          a folder, an index.json (path or http(s) URL), a brace pattern,
                                            any URL webdataset opens (pipe:, https:, gs:, …), or a list of these
    read_index(folder_or_index) -> dict      the parsed, checked index.json
    iter_samples(spec) -> Iterator[Sample]   every sample in order, for evaluators and tools
    verify_shards(spec, decode=False) -> VerifyReport
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from odis.imageio import DEFAULT_MAX_PIXELS
from odis.names import plain_name, sample_key_problem, under

INDEX_NAME = "index.json"
INDEX_FORMAT = "odis-shards"
INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "png", "webp")
META_KEYS = ("image_id", "label", "width", "height", "boxes", "scores")
# Tolerance (pixels) for boxes touching the image border after float scaling.
BOX_EPS = 1e-6

def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def is_remote(s: str) -> bool:
    """True for URLs webdataset opens with a helper (pipe:, https:, gs:, …); a bare path or file: is local."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", s)
    return bool(m) and m.group(1).lower() != "file" and len(m.group(1)) > 1  # "C:" is a drive, not a scheme


def local_path(s: str) -> Path:
    return Path(s[len("file://"):] if s.startswith("file://") else s[len("file:"):] if s.startswith("file:") else s)


# Private names the trainer imported before these were public.
_is_remote, _local_path = is_remote, local_path


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
        for key, files in _iter_tar_samples(url):
            ext = next((e for e in IMAGE_EXTS if e in files), None)
            if ext is None or "json" not in files:
                raise ValueError(f"{url}: sample {key!r} lacks an image or its json (has {sorted(files)})")
            yield Sample(key, ext, files[ext], json.loads(files["json"]), url)


def _open_shard(url: str):
    if is_remote(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(local_path(url), "rb")


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.nbytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) the way webdataset splits a member name: key up to the first dot of the base name."""
    d, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext if dot else ""


_split_member = split_member


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
            else:  # long names, GNU headers, ...: tarfile reads them (4x slower)
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


def sample_key(name: str) -> str | None:
    """The sample key webdataset gives a tar member, or None for a member it leaves out: metadata (`__x__`,
    `__meta__/...`) and names without a key and an extension (`README`, `._x.jpg` AppleDouble files, `.x.jpg`)."""
    from webdataset import tariterators

    if "/" not in name and name.startswith(tariterators.meta_prefix) and name.endswith(tariterators.meta_suffix):
        return None
    if re.match(r"__[^/]*__($|/)", name):  # tar_file_iterator's skip_meta
        return None
    return tariterators.base_plus_ext(name)[0]


def sample_offsets(path: Path) -> list[int] | None:
    """Byte offset of each sample's first header in a local tar (a sample: consecutive members sharing a key, as
    webdataset groups them), so that a reader can seek to the n-th sample; None where plain_tar_members is None."""
    members = plain_tar_members(path)
    if members is None:
        return None
    offsets, last = [], None
    for name, offset in members:
        key = sample_key(name)
        if key is not None and key != last:
            offsets.append(offset)
            last = key
    return offsets


def plain_tar_members(path: Path) -> list[tuple[str, int]] | None:
    """(name, offset of its first header) of each regular file in a tar of ustar headers (pax 'x' headers
    included: webdataset writes one per member), read straight from its 512-byte headers, checksums checked; None
    when it holds anything else, for tarfile to read. With --boxes the trainer reads every key of the training set
    at start (IN1K: 2.6M members); tarfile spends ~20 us a member building TarInfos."""
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                return _walk_headers(m)
            except ValueError:  # a number field that is not octal: a damaged header, tarfile says how
                return None


def _walk_headers(m) -> list[tuple[str, int]] | None:
    """plain_tar_members on a mapped tar."""
    members: list[tuple[str, int]] = []
    pos, end, pax, first = 0, len(m), {}, None
    while pos + 512 <= end:
        h = m[pos:pos + 512]
        if h.count(0) == 512:  # the end-of-archive block
            return members
        kind = h[156:157]
        if h[124] & 0x80 or kind not in (b"0", b"\0", b"5", b"x") or h[257:262] != b"ustar" \
                or int(h[148:156].split(b"\0")[0] or b"0", 8) != sum(h[:148]) + 256 + sum(h[156:]):
            return None
        size = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
        if kind == b"x":  # records "LEN key=value\n" for the next member: path and size may change
            records = [line.partition(b" ")[2] for line in m[pos + 512:pos + 512 + size].splitlines()]
            if pos + 512 + size > end or not all(b"=" in r for r in records):
                return None  # truncated or malformed: tarfile says how
            pax = dict(r.split(b"=", 1) for r in records)
            first = pos
        else:
            size = int(pax.get(b"size", size))
            if kind != b"5":
                prefix = h[345:500].split(b"\0")[0] if h[257:263] == b"ustar\0" else b""  # POSIX only
                name = (prefix + b"/" if prefix else b"") + h[:100].split(b"\0")[0]
                path = pax.get(b"path", name).decode("utf-8", "surrogateescape")  # as tarfile
                members.append((path, pos if first is None else first))
            pax, first = {}, None
        pos += 512 + (size + 511) // 512 * 512
    return None  # no end-of-archive block: truncated, tarfile says how


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


def _iter_tar_samples(url: str, reader: _HashingReader | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members with the same key as webdataset does.

    A key that repeats an extension inside one group starts a new group, so a duplicate shows up as a repeat."""
    f = reader if reader is not None else _open_shard(url)
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            key, files = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = split_member(m.name)
                data = tar.extractfile(m).read()
                if k != key or ext in files:
                    if key is not None:
                        yield key, files
                    key, files = k, {}
                files[ext] = data
            if key is not None:
                yield key, files
    finally:
        if reader is None:
            f.close()


# ---- verify ------------------------------------------------------------------------------------------------

@dataclass
class Problem:
    kind: str        # missing | sha256 | count | unreadable | duplicate-key | bad-sample | bad-json | bad-box | decode
    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.shard}" + (f" [{self.key}]" if self.key else "")
        return f"{self.kind}: {where}: {self.message}"


@dataclass
class VerifyReport:
    folder: str
    shards_listed: int = 0
    shards_ok: int = 0
    samples: int = 0
    decoded: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def summary(self, max_lines: int = 50) -> str:
        head = (f"{self.folder}: {self.shards_ok}/{self.shards_listed} shards ok, {self.samples} samples read"
                + (f", {self.decoded} decoded" if self.decoded else ""))
        if self.ok:
            return head + ": OK"
        lines = [head + f": {len(self.problems)} problem(s) " + json.dumps(self.counts())]
        lines += [f"  {p}" for p in self.problems[:max_lines]]
        if len(self.problems) > max_lines:
            lines.append(f"  … and {len(self.problems) - max_lines} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "shards_listed": self.shards_listed,
                "shards_ok": self.shards_ok, "samples": self.samples, "decoded": self.decoded,
                "problems": [vars(p) for p in self.problems]}


def verify_shards(folder_or_index, decode: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                  progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check a shard set against its index: every listed shard exists with its sha256 and sample count, no key
    repeats across the set, every sample has one image + a json that parses, matches the contract and whose boxes
    lie inside the image; `decode=True` also decodes every image and checks its size against the json.
    Never raises for a bad shard set: every finding is a `Problem` in the report. `progress(samples, bytes)`
    is called after each shard."""
    index = read_index(folder_or_index)
    p = local_path(os.fspath(folder_or_index))
    folder = p if p.is_dir() else p.parent
    report = VerifyReport(str(folder), shards_listed=len(index["shards"]))
    n_classes = len(index["classes"]) if index.get("classes") else None
    seen: dict[str, str] = {}
    for sh in index["shards"]:
        path = Path(under(str(folder), sh["name"], "index.json"))
        n_before = len(report.problems)
        if not path.is_file():
            report.problems.append(Problem("missing", sh["name"], None, f"listed in the index but {path} is absent"))
            continue
        count, nbytes = _verify_one(path, sh, seen, report, decode, n_classes, max_pixels)
        if progress:
            progress(count, nbytes)
        if len(report.problems) == n_before:
            report.shards_ok += 1
    return report


def _verify_one(path: Path, entry: dict, seen: dict, report: VerifyReport, decode: bool,
                n_classes: int | None, max_pixels: int) -> tuple[int, int]:
    name, count = entry["name"], 0
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            for key, files in _iter_tar_samples(str(path), reader):
                count += 1
                if key in seen:
                    where = "earlier in this shard" if seen[key] == name else f"in {seen[key]}"
                    report.problems.append(Problem("duplicate-key", name, key, f"key already seen {where}"))
                seen.setdefault(key, name)
                for prob in check_sample(key, files, n_classes, decode, max_pixels):
                    report.problems.append(Problem(prob[0], name, key, prob[1]))
                report.decoded += int(decode and any(e in files for e in IMAGE_EXTS))
            reader.drain()
        except (tarfile.TarError, OSError, EOFError) as e:
            report.problems.append(Problem("unreadable", name, None, f"tar stream broken after {count} "
                                           f"sample(s): {type(e).__name__}: {e}"))
            reader.drain()
    report.samples += count
    digest = reader.sha.hexdigest()
    if digest != entry["sha256"]:
        report.problems.append(Problem("sha256", name, None, f"sha256 {digest[:16]}… differs from the index's "
                                       f"{entry['sha256'][:16]}… ({reader.nbytes} bytes on disk)"))
    if count != entry["count"]:
        report.problems.append(Problem("count", name, None, f"{count} samples, the index says {entry['count']}"))
    return count, reader.nbytes


def check_sample(key: str, files: dict[str, bytes], n_classes: int | None = None, decode: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, str]]:
    """(kind, message) for every way one sample breaks the contract; empty when it is good."""
    if "." in key or not key:
        return [("bad-sample", "key is empty or contains a dot (webdataset splits keys at the first dot)")]
    problem = sample_key_problem(key)
    if problem:
        return [("bad-sample", problem + ": it could name a path outside the shard set")]
    imgs = [e for e in files if e in IMAGE_EXTS]
    extra = sorted(set(files) - set(IMAGE_EXTS) - {"json"})
    if len(imgs) != 1 or "json" not in files or extra:
        return [("bad-sample", f"expected one image (jpg/png/webp) and a json, found {sorted(files)}")]
    try:
        meta = json.loads(files["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [("bad-json", f"json does not parse: {e}")]
    probs = check_meta(key, meta, n_classes)
    if decode and not probs:
        probs += _check_decode(files[imgs[0]], meta, max_pixels)
    return probs


def check_meta(key: str, meta, n_classes: int | None = None) -> list[tuple[str, str]]:
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        have = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        return [("bad-json", f"json must hold {list(META_KEYS)}, has {have}")]
    if meta["image_id"] != key:
        return [("bad-json", f"image_id {meta['image_id']!r} differs from the key")]
    w, h, label = meta["width"], meta["height"], meta["label"]
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        return [("bad-json", f"width/height must be positive ints, got {w!r}x{h!r}")]
    if label is not None and not (isinstance(label, int) and 0 <= label < (n_classes or 1 << 62)):
        return [("bad-json", f"label {label!r} is not null or a class index < {n_classes}")]
    boxes, scores = meta["boxes"], meta["scores"]
    if not isinstance(boxes, list) or not isinstance(scores, list) or len(boxes) != len(scores):
        return [("bad-json", "boxes and scores must be lists of the same length")]
    probs = []
    for i, b in enumerate(boxes):
        ok = isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
        if not ok or not (-BOX_EPS <= b[0] < b[2] <= w + BOX_EPS and -BOX_EPS <= b[1] < b[3] <= h + BOX_EPS):
            probs.append(("bad-box", f"boxes[{i}] = {b} is not inside the {w}x{h} image (0 <= x0 < x1 <= w)"))
    return probs


def _check_decode(data: bytes, meta: dict, max_pixels: int) -> list[tuple[str, str]]:
    """Decode with the project's one decoder (odis.imageio): what the trainer and the evaluators will see."""
    from odis.imageio import ImageDecodeError, decode_rgb, exif_orientation

    try:
        _, size = decode_rgb(data, max_pixels, name="image")
        orientation = exif_orientation(data)
    except ImageDecodeError as e:
        return [("decode", f"image does not decode: {e}")]
    probs = []
    if size != (meta["width"], meta["height"]):
        probs.append(("decode", f"decoded size {size[0]}x{size[1]} differs from json {meta['width']}x{meta['height']}"))
    if orientation not in (1, None):
        probs.append(("decode", f"EXIF orientation {orientation} left in a stored image (decoders disagree on it)"))
    return probs
