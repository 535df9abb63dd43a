"""The bad-input corpus: files others could hand odis, generated on the fly (nothing is stored in ../shared), and
what each command does with each kind. `TABLE` is the table of docs/files-from-others.md; test_bad_inputs.py
asserts every line of it and checks that the page shows it as rendered here."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# kind -> (what extract-boxes / shard do, what train / eval / verify do)
TABLE = {
    "truncated JPEG": ("error row `cannot decode`; not stored, listed in index.json `skipped`", "-"),
    "zero-byte file": ("error row `empty file`; not stored, listed", "-"),
    "text named `.jpg`": ("error row `not an image`; not stored, listed", "-"),
    "decompression bomb (over `--max-pixels`)": ("error row `refused`; not stored, listed", "-"),
    "CMYK, 16-bit PNG, RGBA, palette, greyscale, 1x1": ("decoded to 8-bit RGB (16-bit rescaled, not clipped)",
                                                        "the same pixels in every command"),
    "EXIF orientation 2-8": ("displayed orientation and size", "stored upright: the same pixels"),
    "names with spaces, non-ASCII": ("rows and samples like any other", "-"),
    "names that are not UTF-8": ("error row `not UTF-8`; not stored, listed", "-"),
    "dangling symlink, symlink loop": ("left out by name (`cannot read`), printed", "-"),
    "folder cycle (symlink to an ancestor)": ("each folder walked once; the link listed", "-"),
    "manifest: box out of bounds / NaN / +-inf / zero area": (
        "import-boxes: clipped / dropped and counted; shard: the same counts in index.json `boxes`",
        "train: the same counts printed and in `RUN/boxes.json`; eval: same boxes"),
    "manifest: one id for two images": ("`stats` and `shard --manifest`: an error naming both rows",
                                        "train/eval `--boxes`: the same error"),
    "manifest: exact duplicate row": ("dropped once, counted (`duplicate_rows_dropped`)", "same"),
    "manifest: missing column, not parquet": ("one error naming the file", "same"),
    "manifest: pandas round-trip": ("read as the original (`stats` says the metadata is gone)", "same"),
    "COCO JSON: 3-number bbox, unknown / repeated image id, NaN bbox": (
        "import-boxes: an error naming the entry, or counted (`dropped_not_finite`)", "-"),
    "index.json names with a scheme (`pipe:`, `https:`), absolute, `..`": (
        "-", "train, eval, verify, show: one error naming the entry; nothing runs"),
    "a shard file named `pipe:...` in a folder without index": ("-", "refused by name; nothing runs"),
    "YOLO `.pt` weights whose pickle runs code": ("extract-boxes: refused before any image is read; nothing runs", "checkpoints: loaded with `weights_only`, the same"),
    "truncated tar, missing shard": (
        "-", "train: every lost sample counted in `bad_samples`, eval in its `errors`; verify: named"),
    "tar members named `../x`, `/abs/x`, `a/b`": ("-", "train: skipped and counted; verify: `bad-sample`"),
    "a sample json's boxes out of bounds / NaN / empty": (
        "-", "train: clipped / dropped, counted in `RUN/data.json` (`json_boxes_*`); verify: `bad-box`"),
}


def render_table() -> str:
    lines = ["| input | import-boxes, extract-boxes, shard, stats | train, eval, verify, show |", "|---|---|---|"]
    lines += [f"| {k} | {a} | {b} |" for k, (a, b) in TABLE.items()]
    return "\n".join(lines)


# ---- images ---------------------------------------------------------------------------------------------------

def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny (wrong) payload."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD_DECODES = ("cmyk.jpg", "gray16.png", "rgba.png", "palette.png", "grey.jpg", "one_px.png", "space name.jpg",
                "ünïcode.jpg") + tuple(f"exif_{o}.jpg" for o in range(2, 9))
ERRORS = {"truncated.jpg": "cannot decode", "zero.jpg": "empty file", "text.jpg": "not an image",
          "bomb.png": "refused"}
LEFT_OUT = ("dangling.jpg", "loop_a.jpg", "loop_b.jpg")
NOT_UTF8 = b"\xffbad.jpg"


def image_corpus(root: Path, good: Path, n_good: int = 12) -> dict[str, np.ndarray | None]:
    """Every image kind under `root` (+ a folder cycle); returns name -> the reference RGB pixels (PIL, EXIF
    applied, 16-bit rescaled by its own formula) or None where the file must be an error."""
    root.mkdir(parents=True, exist_ok=True)
    photo = Image.open(good).convert("RGB").resize((96, 72))
    ref: dict[str, np.ndarray | None] = {}
    for i in range(n_good):  # enough plain images for a training batch
        photo.rotate(i * 30).save(root / f"good_{i:02d}.jpg", "JPEG", quality=90)
        ref[f"good_{i:02d}.jpg"] = np.asarray(Image.open(root / f"good_{i:02d}.jpg").convert("RGB"))
    jpg = (root / "good_00.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("a text file with a .jpg name\n")
    (root / "bomb.png").write_bytes(png_bomb(9000, 9000))  # 81 Mpx > the 64 Mpx cap
    ref.update(dict.fromkeys(ERRORS))
    photo.convert("CMYK").save(root / "cmyk.jpg", "JPEG", quality=95)
    ref["cmyk.jpg"] = np.asarray(Image.open(root / "cmyk.jpg").convert("RGB"))
    g16 = (np.linspace(0, 65535, 72 * 96).reshape(72, 96)).astype(np.uint16)
    Image.fromarray(g16).save(root / "gray16.png")
    ref["gray16.png"] = np.repeat(np.clip(g16 / 65535.0 * 255 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, 2)
    photo.convert("RGBA").save(root / "rgba.png")
    ref["rgba.png"] = np.asarray(photo)
    pal = photo.convert("P")
    pal.save(root / "palette.png")
    ref["palette.png"] = np.asarray(pal.convert("RGB"))
    photo.convert("L").save(root / "grey.jpg", "JPEG", quality=95)
    ref["grey.jpg"] = np.asarray(Image.open(root / "grey.jpg").convert("RGB"))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_px.png")
    ref["one_px.png"] = np.array([[[200, 10, 10]]], np.uint8)
    for o in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        photo.save(root / f"exif_{o}.jpg", "JPEG", quality=95, exif=exif.tobytes())
        from PIL import ImageOps
        ref[f"exif_{o}.jpg"] = np.asarray(ImageOps.exif_transpose(Image.open(root / f"exif_{o}.jpg")).convert("RGB"))
    for name in ("space name.jpg", "ünïcode.jpg"):
        (root / name).write_bytes(jpg)
        ref[name] = ref["good_00.jpg"]
    with open(os.path.join(os.fsencode(root), NOT_UTF8), "wb") as f:
        f.write(jpg)
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "loop_a.jpg").symlink_to(root / "loop_b.jpg")
    (root / "loop_b.jpg").symlink_to(root / "loop_a.jpg")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(root)  # a folder cycle
    (root / "notes.txt").write_text("not an image")
    return ref


def coco_json(images: list[tuple[int, str, int, int]], annotations: list[dict]) -> str:
    return json.dumps({"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
                       "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})


def tar_with_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar holding exactly these member names (tarfile would normalise some of them away)."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
