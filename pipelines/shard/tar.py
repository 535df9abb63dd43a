"""A minimal deterministic tar writer: fixed metadata, so that the same samples always give the same bytes."""
from __future__ import annotations

import hashlib
import os
import queue
import tarfile
import threading

TAR_MTIME = 946684800  # 2000-01-01: fixed, so that reruns give byte-identical shards


class TarWriter:
    """A minimal deterministic tar writer (POSIX ustar, PAX headers for long or non-ASCII names) that hashes what
    it writes to the file descriptor `fd`.

    Why not tarfile.addfile: it streams every member through 16 KiB copies and rebuilds each header field by
    field; with millions of small images that overhead dominated `odis shard` (profiled). Here the caller's
    thread only lays out batches: small pieces (headers, padding, jsons, small images) are copied into one
    bytearray, large images are referenced, not copied. A second thread hashes each batch and hands it to the
    kernel with one writev. SHA-256 (of buffers over 2 KiB) and the write both release the GIL, so they overlap
    the reading of the next images; and a batch of small samples is one hash call and one write, not thousands."""

    BATCH_BYTES, BATCH_PIECES = 1 << 20, 600  # below the kernel's IOV_MAX (1024)
    COPY_BELOW = 16 << 10  # smaller data is copied into the batch buffer: cheaper than one more piece

    def __init__(self, fd: int):
        self.fd, self.sha, self.nbytes = fd, hashlib.sha256(), 0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._pieces: list = []          # the batch: bytearrays of small pieces, and large data by reference
        self._small = bytearray()        # the batch's current run of small pieces
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (pieces := self._queue.get()) is not None:
            if self._error is None:
                try:
                    for b in pieces:
                        self.sha.update(b)
                    _writev_all(self.fd, pieces)
                except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                    self._error = e

    def _member(self, name: str, data: bytes) -> None:
        """Header, data, zero padding to the next 512-byte block."""
        small, header = self._small, tar_header(name, len(data))
        small += header
        if len(data) < self.COPY_BELOW:
            small += data
        else:
            self._pieces += (small, data)
            self._small = small = bytearray()
        small += _ZEROS[:-len(data) % 512]
        n = len(header) + 512 * ((len(data) + 511) // 512)  # a long or non-ASCII name has a PAX header: > 512
        self._pending_bytes += n
        self.nbytes += n

    def add_sample(self, key: str, ext: str, data: bytes, meta: bytes) -> None:
        """One webdataset sample: KEY.EXT (the image) and KEY.json."""
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.json", meta)
        self._flush_if_full()

    def add_packed(self, data: bytes) -> None:
        """Append members already laid out as tar blocks (headers, data, padding), e.g. by _fastpack."""
        if data:
            self._pieces += (self._small, data)
            self._small = bytearray()
            self._pending_bytes += len(data)
            self.nbytes += len(data)
            self._flush_if_full()

    def add(self, *members: tuple[str, bytes]) -> None:
        """Append members (name, data) in this order."""
        for name, data in members:
            self._member(name, data)
        self._flush_if_full()

    def _flush_if_full(self) -> None:
        if self._pending_bytes >= self.BATCH_BYTES or len(self._pieces) >= self.BATCH_PIECES:
            self._flush()

    def _flush(self) -> None:
        if self._error is not None:
            raise self._error
        if self._small:
            self._pieces.append(self._small)
            self._small = bytearray()
        if self._pieces:
            self._queue.put(self._pieces)
            self._pieces, self._pending_bytes = [], 0

    def close(self) -> None:
        """End-of-archive (two zero blocks), padded to tar's 10 KiB record size as GNU tar and tarfile do; waits
        for the writer thread."""
        end = 1024 + (-(self.nbytes + 1024) % 10240)
        self._small += bytes(end)
        self.nbytes += end
        self._flush()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _writev_all(fd: int, pieces: list) -> None:
    """os.writev until every byte is written (a write may be partial; at most IOV_MAX pieces per call)."""
    views = [memoryview(p) for p in pieces if len(p)]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + 1024])
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def _ustar_template() -> bytearray:
    h = bytearray(512)
    for off, field in ((100, b"0000444\0"), (108, b"0000000\0"), (116, b"0000000\0"),
                       (136, b"%011o\0" % TAR_MTIME), (148, b" " * 8), (156, b"0"), (257, b"ustar\x0000")):
        h[off:off + len(field)] = field
    return h


# A ustar header is fixed except for the name (0:100), the size (124:136) and the checksum (148:156): the fixed
# parts are cut once, and a header is one join of seven pieces (tarfile builds each header field by field).
_USTAR = _ustar_template()
_USTAR_SUM = sum(_USTAR)  # checksum of the fixed fields (name and size zero, checksum field as spaces)
_MODE_TO_SIZE, _MTIME_TO_SUM, _TYPE_TO_END = bytes(_USTAR[100:124]), bytes(_USTAR[136:148]), bytes(_USTAR[156:])
_ZEROS = bytes(512)
USTAR_TEMPLATE = bytes(_USTAR)  # what _fastpack fills in the same way


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) tarfile would write for a regular file `name` of `size` bytes (mode 0444, uid/gid 0,
    fixed mtime), built directly for short ASCII names."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
            size, TAR_MTIME, 0o444, 0, 0, "", "")
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_USTAR_SUM + sum(raw) + sum(size_field))  # tarfile's layout: 6 digits, NUL, space
    return b"".join((raw, _ZEROS[len(raw):100], _MODE_TO_SIZE, size_field, _MTIME_TO_SUM, checksum, _TYPE_TO_END))
