"""The project's one image decoder: a file (or its bytes) -> 8-bit RGB in its displayed orientation.

Images that users bring are zero-byte, truncated, CMYK, 16-bit, paletted with alpha, EXIF-rotated or
decompression bombs. `decode_rgb` (a numpy array; the trainer's and evaluators' form) and `load_image` (the same
pixels as a PIL image) either return plain RGB or raise `ImageDecodeError` whose message names the file and the
reason. The pixel cap is checked from the header, before any pixel is decoded. extract-boxes, shard, the trainer,
every evaluator and `odis show` decode through here, so one image gives the same pixels everywhere.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 Mpx: above any photo odis expects; a 20k x 20k bomb (400 Mpx) is refused before decoding.
DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# EXIF orientations 5..8 transpose the image, so the displayed width and height are swapped.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class ImageDecodeError(ValueError):
    """An image could not be read; the message starts with the file name."""


def _open(src: Source, name: str) -> Image.Image:
    data = src if isinstance(src, (bytes, bytearray, memoryview)) else None
    try:
        if data is not None:
            if len(data) == 0:
                raise ImageDecodeError(f"{name}: empty file (0 bytes)")
            return Image.open(io.BytesIO(bytes(data)))
        if os.path.getsize(src) == 0:
            raise ImageDecodeError(f"{name}: empty file (0 bytes)")
        return Image.open(src)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{name}: file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the second: if made an error
        raise ImageDecodeError(f"{name}: refused, decompression bomb ({e})") from None
    except OSError as e:
        raise ImageDecodeError(f"{name}: {_os_reason(e, 'cannot open')} ({e})") from None


def _os_reason(e: OSError, pil_reason: str) -> str:
    """An OSError with an errno is the system's (permissions, an I/O error on a network filesystem: it may pass
    next time, and `extract-boxes` redoes it on resume); one without is PIL's verdict on the file's content."""
    return "cannot read" if e.errno is not None else pil_reason


def _check_pixels(img: Image.Image, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{name}: invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError(f"{name}: refused, {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} "
                               "(possible decompression bomb)")


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit and float grey are rescaled (not clipped), alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_rgb(src: Source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None,
               max_reduction=None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode `src` (a path or the file's bytes) -> (RGB uint8 HWC array, (width, height) as displayed).

    Plain JPEGs (RGB or grey, with their end marker) decode with OpenCV (libjpeg-turbo straight into numpy, EXIF
    orientation applied; the same pixels as PIL, faster); anything else with PIL. `max_reduction(w, h)` may allow
    a large JPEG to decode at 1/2, 1/4 or 1/8 scale (PIL draft, DCT-domain scaling): the size returned is then
    still the full one, the array smaller. Raises ImageDecodeError("<name>: <reason>").
    """
    name = name or (str(src) if not isinstance(src, (bytes, bytearray, memoryview)) else "<bytes>")
    data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else _read_file(src, name)
    img = _open(data, name)  # the file is read once: PIL's header and OpenCV use the same bytes
    try:
        _check_pixels(img, name, max_pixels)  # the limit, ours: no process-wide warnings filter (decode threads)
        w, h = img.size
        r = max_reduction(w, h) if max_reduction is not None and img.format == "JPEG" else 1.0
        if img.format == "JPEG" and img.mode in ("RGB", "L") and r < 2:
            arr = _cv2_jpeg(data)
            if arr is not None:
                return arr, (arr.shape[1], arr.shape[0])
        if r >= 2:
            img.draft("RGB", (math.ceil(w / r), math.ceil(h / r)))
        img.load()  # first: corrupt data fails here (a PNG's getexif would load it and hide the error)
        if _orientation(img) in _TRANSPOSING_ORIENTATIONS:
            w, h = h, w
        return np.asarray(_to_rgb(ImageOps.exif_transpose(img))), (w, h)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{name}: refused, decompression bomb ({e})") from None
    except OSError as e:  # truncated or corrupt data, or the read itself failed
        raise ImageDecodeError(f"{name}: {_os_reason(e, 'cannot decode')} ({e})") from None
    except (ValueError, SyntaxError) as e:  # PIL raises these too for corrupt data
        raise ImageDecodeError(f"{name}: cannot decode ({e})") from None
    finally:
        img.close()  # the file handle, now: loops over millions of files must not wait for the GC


def _read_file(path, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageDecodeError(f"{name}: file not found") from None
    except OSError as e:  # a folder, permissions, I/O: the system's reason, as _open gives it
        raise ImageDecodeError(f"{name}: {_os_reason(e, 'cannot open')} ({e})") from None


def _cv2_jpeg(data: bytes) -> np.ndarray | None:
    """A complete JPEG decoded by OpenCV as RGB, or None (truncated, or OpenCV refuses it: PIL then says why)."""
    import cv2

    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # no end marker: PIL names the error
        return None
    buf = np.frombuffer(data, np.uint8)
    if hasattr(cv2, "IMREAD_COLOR_RGB"):  # OpenCV >= 4.11 decodes straight to RGB
        return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    arr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return None if arr is None else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def exif_orientation(src: Source) -> int:
    """The EXIF orientation tag of a file (1 when absent or unreadable), from its header."""
    with _open(src, "<image>") as img:
        return _orientation(img)


def _orientation(img: Image.Image) -> int:
    try:
        return img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the image as stored
        return 1


def load_image(src: Source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """`decode_rgb`'s pixels as an RGB PIL image (for resizing, drawing, saving)."""
    return Image.fromarray(decode_rgb(src, max_pixels, name)[0])


def image_size(src: Source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only: no pixel decoding."""
    name = name or (str(src) if not isinstance(src, (bytes, bytearray, memoryview)) else "<bytes>")
    with _open(src, name) as img:
        _check_pixels(img, name, max_pixels)
        w, h = img.size
        orientation = _orientation(img)
    return (h, w) if orientation in _TRANSPOSING_ORIENTATIONS else (w, h)


def list_images(root: Union[str, os.PathLike]) -> tuple[list[str], list[str]]:
    """Image files under `root` by extension, as sorted POSIX paths relative to root; plus the other files.

    Returning the skipped files lets callers count them instead of dropping them silently.
    """
    root = Path(root)
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.startswith("."):
                continue
            rel = (Path(dirpath) / f).relative_to(root).as_posix()
            (images if f.lower().endswith(IMAGE_EXTENSIONS) else others).append(rel)
    return sorted(images), sorted(others)
