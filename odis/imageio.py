"""Safe image loading: one place that turns a file (or its bytes) into an 8-bit RGB PIL image.

Why a helper: images that users bring are zero-byte, truncated, CMYK, 16-bit, paletted with alpha, EXIF-rotated
or decompression bombs. `load_image` either returns a plain RGB image in its displayed orientation or raises
`ImageDecodeError` whose message names the file and the reason. The pixel cap is checked from the header,
before any pixel is decoded.
"""
from __future__ import annotations

import io
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
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(src: Source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode `src` (a path or the file's bytes) into an RGB PIL image, EXIF orientation applied.

    Raises ImageDecodeError("<name>: <reason>") for anything unreadable; `name` defaults to the path.
    """
    name = name or (str(src) if not isinstance(src, (bytes, bytearray, memoryview)) else "<bytes>")
    img = _open(src, name)
    try:
        _check_pixels(img, name, max_pixels)  # the limit, ours: no process-wide warnings filter (decode threads)
        img.load()  # truncated files fail here (unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set)
        out = _to_rgb(ImageOps.exif_transpose(img))
        return out if out is not img else img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{name}: refused, decompression bomb ({e})") from None
    except OSError as e:  # truncated or corrupt data, or the read itself failed
        raise ImageDecodeError(f"{name}: {_os_reason(e, 'cannot decode')} ({e})") from None
    except (ValueError, SyntaxError) as e:  # PIL raises these too for corrupt data
        raise ImageDecodeError(f"{name}: cannot decode ({e})") from None
    finally:
        img.close()  # the file handle, now: loops over millions of files must not wait for the GC


def image_size(src: Source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only: no pixel decoding."""
    name = name or (str(src) if not isinstance(src, (bytes, bytearray, memoryview)) else "<bytes>")
    with _open(src, name) as img:
        _check_pixels(img, name, max_pixels)
        w, h = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block does not make the size unknown
            orientation = 1
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
