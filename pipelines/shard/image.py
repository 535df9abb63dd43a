"""One source image -> the bytes to store, its size, and whether it is readable at all.

Bytes are copied unchanged unless the image must be re-encoded: `resize_short` (short side > N), an EXIF
orientation other than 1 (re-encoded upright, so that any decoder sees the pixels the boxes describe), or a format
outside jpg/png/webp (stored as png). Unreadable files raise ImageDecodeError("<name>: <reason>").
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from odis.imageio import ImageDecodeError, decode_rgb, load_image
from odis.pipelines.shard.settings import ShardSettings

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Prepared:
    ext: str
    data: bytes
    width: int            # of the stored image
    height: int
    src_width: int        # of the source image, upright (EXIF applied): the manifest's pixel frame
    src_height: int


def _looks_complete(fmt: str, data: bytes) -> bool:
    """Cheap end-of-file checks that catch truncated files without decoding them."""
    if fmt == "JPEG":  # most files end on the EOI marker; a few carry trailing bytes after it
        return data.endswith(b"\xff\xd9") or data.find(b"\xff\xd9", max(0, len(data) - 4096)) >= 0
    if fmt == "PNG":
        return b"IEND" in data[-64:]
    if fmt == "WEBP":
        return len(data) >= 8 + int.from_bytes(data[4:8], "little")
    return True


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment when the file has no APP1 (EXIF/XMP, which may rotate it);
    None whenever anything is unusual, and PIL decides. 10x faster than PIL's header parser on small files."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
        elif m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
        elif m == 0xE1 or m in (0xD8, 0xD9, 0xDA):  # EXIF/XMP, or scan data before a frame header
            return None
        elif m in _SOF_MARKERS:
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (w, h) if w and h else None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _orientation(im) -> int:
    try:
        if im.format == "PNG" and "exif" not in im.info:
            return 1  # PIL would decode the whole PNG to look for a late eXIf chunk
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 (a broken EXIF block: treat as upright, as decoders do)
        return 1


def target_size(w: int, h: int, resize_short: int | None) -> tuple[int, int] | None:
    """Size with the short side = resize_short (aspect kept, rounded), or None if the image is small enough."""
    short = min(w, h)
    if not resize_short or short <= resize_short:
        return None
    if w <= h:
        return resize_short, max(1, round(h * resize_short / w))
    return max(1, round(w * resize_short / h)), resize_short


def prepare_image(data: bytes, name: str, s: ShardSettings) -> Prepared:
    """The bytes to store for one image, or ImageDecodeError("<name>: <reason>")."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    im, fmt, w, h, orient = _header(data, name, s)
    uw, uh = (h, w) if orient in (5, 6, 7, 8) else (w, h)
    size = target_size(uw, uh, s.resize_short)
    ext = FORMAT_EXT.get(fmt)
    if size is None and orient == 1 and ext is not None:  # stored as is: the common case
        if s.check == "decode":  # the project's one decoder: the trainer will see exactly this
            decode_rgb(data, s.max_pixels, name)
        return Prepared(ext, data, w, h, w, h)
    return _reencode(data, name, s, ext or "png", size, uw, uh)


def _header(data: bytes, name: str, s: ShardSettings) -> tuple:
    """(PIL image or None, format, width, height, EXIF orientation), checked against the pixel cap and for
    truncation. Plain JPEGs (no EXIF/XMP) are read by jpeg_size alone: PIL's parser costs 10x more."""
    plain = jpeg_size(data) if s.check == "header" else None
    if plain is not None:  # a JPEG without EXIF/XMP: upright, size from its SOF segment
        im, fmt, (w, h) = None, "JPEG", plain
    else:
        from PIL import Image  # here, not per call: even a cached import statement costs time in this hot path

        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"{name}: refused, decompression bomb ({e})") from None
        except Exception as e:  # noqa: BLE001
            raise ImageDecodeError(f"{name}: not an image (format not recognised: {type(e).__name__})") from None
        fmt, (w, h) = im.format, im.size
    if w * h > s.max_pixels:
        raise ImageDecodeError(f"{name}: refused, {w}x{h} = {w * h} pixels exceeds max_pixels={s.max_pixels} "
                               "(possible decompression bomb)")
    if not _looks_complete(fmt, data):
        raise ImageDecodeError(f"{name}: truncated (no {fmt} end marker)")
    return im, fmt, w, h, 1 if im is None else _orientation(im)


def _reencode(data: bytes, name: str, s: ShardSettings, ext: str, size: tuple | None, uw: int, uh: int) -> Prepared:
    """Decode (EXIF orientation applied), resize to `size` if given, encode as `ext`."""
    from PIL import Image

    rgb = load_image(data, max_pixels=s.max_pixels, name=name)  # decoded, EXIF applied, RGB
    if size is not None:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    q = s.quality if size is not None else max(s.quality, 95)  # only rotated: stay close to the original
    opts = {"jpg": dict(format="JPEG", quality=q), "png": dict(format="PNG"),
            "webp": dict(format="WEBP", quality=q)}[ext]
    rgb.save(buf, **opts)
    return Prepared(ext, buf.getvalue(), rgb.width, rgb.height, uw, uh)
