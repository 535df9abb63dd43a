"""Reading shard tars the way webdataset does: member names to sample keys, the samples of a tar stream, and a
fast scan of a local tar's headers (names and offsets, no member data read).

    sample_key(name)             the key webdataset gives a member, or None for one it leaves out
    split_member(name)           (key, extension) of a member name
    iter_tar_samples(f)          (key, {ext: bytes}) per sample of an open tar stream
    plain_tar_members(path)      (name, offset) of each file of a plain ustar/pax tar, from its headers
    sample_offsets(path)         the byte offset of each sample, for a reader that seeks to the n-th one
"""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) the way webdataset splits a member name: key up to the first dot of the base name."""
    d, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext if dot else ""


def sample_key(name: str) -> str | None:
    """The sample key webdataset gives a tar member, or None for a member it leaves out: metadata (`__x__`,
    `__meta__/...`) and names without a key and an extension (`README`, `._x.jpg` AppleDouble files, `.x.jpg`)."""
    from webdataset import tariterators

    if "/" not in name and name.startswith(tariterators.meta_prefix) and name.endswith(tariterators.meta_suffix):
        return None
    if re.match(r"__[^/]*__($|/)", name):  # tar_file_iterator's skip_meta
        return None
    return tariterators.base_plus_ext(name)[0]


def iter_tar_samples(f: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of the tar stream `f`, grouping consecutive members with the same key as
    webdataset does. A key that repeats an extension inside one group starts a new group, so a duplicate shows up
    as a repeat. The caller opens and closes `f`."""
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
    at start (millions of members), and tarfile spends far longer a member building TarInfos."""
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
