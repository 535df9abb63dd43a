"""Per-file facts gathered before planning: the key (image_id) of each file, its label, its manifest boxes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from odis.image_ids import image_id_list
from odis.manifest import manifest_metadata, sha256_of
from odis.pipelines.shard.settings import ShardError, ShardSettings


def id_scheme(s: ShardSettings) -> tuple[str, bool]:
    """The key rule: --id-scheme, else the manifest's (its boxes must match), else coco for COCO labels, else path;
    and whether the manifest's metadata chose it."""
    from_manifest = manifest_metadata(s.manifest).get("id_scheme") if s.manifest else None
    if s.id_scheme and from_manifest and s.id_scheme != from_manifest:
        raise ShardError(f"--id-scheme {s.id_scheme} differs from the manifest's id_scheme {from_manifest} "
                         f"({s.manifest}): its boxes would never match")
    if s.id_scheme or from_manifest:
        return s.id_scheme or from_manifest, not s.id_scheme
    return ("coco" if s.labels == "coco" else "path"), False


def image_ids(relpaths: list[str], scheme: str, scheme_from=None) -> list[str]:
    """The image_id of each relpath, in order (odis.manifest.image_id_list), its errors as ShardError; with
    `scheme_from` (the manifest whose metadata chose the scheme) the error says where the scheme came from: a
    manifest of other images fails here, before its ids are compared."""
    try:
        return image_id_list(relpaths, scheme)
    except ValueError as e:
        if not scheme_from:
            raise ShardError(str(e)) from None
        what = str(e).split("; use --id-scheme", 1)[0]  # another scheme would not match the manifest's ids either
        raise ShardError(f"--manifest {scheme_from} keys its images by --id-scheme {scheme}, which does not fit "
                         f"these files (are they its images?): {what}") from None


def labels_for(s: ShardSettings, relpaths: list[str]) -> tuple[dict, list[str] | None, list[dict]]:
    """relpath -> label index, the class list, and warnings."""
    if s.labels == "none":
        return {}, None, []
    if s.labels == "folder":
        # The first folder under the root is the class: ImageNet (train/CLASS/x.JPEG) and Tiny-ImageNet
        # (train/CLASS/images/x.JPEG) alike.
        loose = [r for r in relpaths if "/" not in r]
        if loose:
            raise ShardError(f"--labels folder: {len(loose)} image(s) lie directly in {s.images}, not in a class "
                             f"folder, e.g. {loose[0]!r}")
        classes = sorted({r.split("/", 1)[0] for r in relpaths})
        pos = {c: i for i, c in enumerate(classes)}
        return {r: pos[r.split("/", 1)[0]] for r in relpaths}, classes, []
    if s.labels == "coco":
        return _coco_labels(s, relpaths)
    raise ShardError(f"--labels must be folder, coco or none, got {s.labels!r}")


def default_coco_json(images: str | os.PathLike) -> Path:
    """COCO's own layout: IMAGES=…/train2017 -> …/annotations/instances_train2017.json."""
    p = Path(images).resolve()
    return p.parent / "annotations" / f"instances_{p.name}.json"


def _coco_labels(s: ShardSettings, relpaths: list[str]) -> tuple[dict, list[str], list[dict]]:
    """COCO is multi-label; the sample's single label is the category of its largest non-crowd box."""
    path = Path(s.coco_json)
    try:
        coco = json.loads(path.read_bytes())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        anns = coco["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"--coco-json {path}: not a readable COCO instances file ({type(e).__name__}: {e})") from None
    pos = {c["id"]: i for i, c in enumerate(cats)}
    best: dict[str, tuple[float, int]] = {}
    for a in anns:
        if a.get("iscrowd"):
            continue
        f, area = files.get(a["image_id"]), a["bbox"][2] * a["bbox"][3]
        if f is not None and area > best.get(f, (-1.0, 0))[0]:
            best[f] = (area, pos[a["category_id"]])
    labels = {r: best[r][1] for r in relpaths if r in best}
    missing = [r for r in relpaths if r not in best]
    warnings = [{"path": r, "reason": f"no non-crowd annotation in {path.name}: label null"} for r in missing]
    return labels, [c["name"] for c in cats], warnings


def manifest_boxes(s: ShardSettings, ids: dict[str, str]) -> tuple[dict, dict, list[dict], dict | None]:
    """image_id -> (boxes, scores, (w, h)) from the manifest, read through odis.manifest_boxes (one id, one image;
    every row accounted for); rows of images not under the root are left out and counted in a warning, a clipped
    box is named with its image (`ids`: image_id -> relpath). Returns (boxes, inputs, warnings, row counts)."""
    from odis.manifest import ManifestError
    from odis.manifest_boxes import read_box_rows

    if not s.manifest:
        return {}, {}, [], None
    try:
        r = read_box_rows(s.manifest)
    except ManifestError as e:
        raise ShardError(f"--manifest {e}") from None
    out: dict[str, list] = {}
    stray, clipped = set(), {}
    for i, iid in enumerate(r.image_id):
        if iid not in ids:
            stray.add(iid)
            continue
        entry = out.setdefault(iid, [[], [], (int(r.width[i]), int(r.height[i]))])
        if r.used[i]:
            entry[0].append(tuple(float(v) for v in r.boxes[i]))
            entry[1].append(float(r.score[i]))
        if r.clipped[i]:
            clipped.setdefault(iid, []).append(i)
    if stray and not out:
        meta = manifest_metadata(s.manifest)
        raise ShardError(f"--manifest {s.manifest}: none of its {len(stray)} image ids matches a file under "
                         f"{s.images} (manifest images root: {meta.get('images_root')}, id scheme: "
                         f"{meta.get('id_scheme')}; e.g. {sorted(stray)[0]!r})"
                         + ("" if meta.get("id_scheme") else "; it carries no odis metadata (pandas drops it): give "
                            "--id-scheme, the key rule its ids were made with (path, stem or coco)"))
    warnings = []
    c = r.counts
    if r.dropped.any():
        i = int(np.flatnonzero(r.dropped)[0])
        warnings.append({"path": str(s.manifest), "reason": f"{int(r.dropped.sum())} box(es) left out "
                         f"(dropped_not_finite {c['dropped_not_finite']}: NaN, infinite or partly null coordinates "
                         f"or score; dropped_empty {c['dropped_empty']}: empty inside the image), e.g. row {i} "
                         f"({r.image_id[i]!r}): {tuple(float(v) for v in r.given[i])}"})
    for iid, rows in clipped.items():
        w, h = out[iid][2]
        warnings.append({"path": ids[iid], "reason": f"{len(rows)} box(es) outside the {w}x{h} image, e.g. "
                         f"{[round(float(v), 1) for v in r.given[rows[0]]]}: clipped to it"})
    if c["duplicate_rows_dropped"]:
        warnings.append({"path": str(s.manifest), "reason": f"duplicate_rows_dropped {c['duplicate_rows_dropped']}"
                         " (rows repeated exactly: each used once)"})
    if stray:
        warnings.append({"path": str(s.manifest), "reason": f"{len(stray)} manifest image id(s) match no file under "
                         f"{s.images}, e.g. {sorted(stray)[0]!r}"})
    boxes = {k: (tuple(v[0]), tuple(v[1]), v[2]) for k, v in out.items()}
    return boxes, {"manifest_sha256": sha256_of(s.manifest)}, warnings, {**c, "images_not_under_root": len(stray)}
