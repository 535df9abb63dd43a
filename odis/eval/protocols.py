"""The evaluation protocols end to end (backbone + data -> result dict), the text tables and `--compare`.

What `odis eval knn|linear|dense-nn` calls; each returns a JSON-able dict with the settings it ran with.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from odis.eval.features import (Features, ViewConfig, extract_features, input_size, list_shard_urls, load_features,
                                read_classes, save_features, shard_loader)
from odis.samples import BoxTable


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _fingerprint(*parts) -> str:
    """Cache key of a feature extraction: the inputs' names, sizes and modification times and the settings."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        for path in str(p).split("::") if isinstance(p, (str, Path)) else ():
            if path and os.path.exists(path):
                st = os.stat(path)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def features_for(model, backbone: str, spec: str, cfg: ViewConfig, manifest_path: str | None, table: BoxTable | None,
                 n_last_blocks: int, batch_size: int, workers: int, device: str, cache: str | None,
                 split: str, progress: bool = True) -> Features:
    """Extract (or reuse from `cache`) the features of one shard set."""
    path = None
    if cache:
        key = _fingerprint(str(Path(backbone).resolve()), spec, manifest_path, asdict(cfg), n_last_blocks)
        path = Path(cache) / f"{split}-{cfg.mode}-{key}.safetensors"
        if path.is_file():
            return load_features(path)
    if table is not None:  # refused before extracting when no shard image is in the manifest (tar headers)
        from odis.shards import shard_keys

        table.check_match(spec, shard_keys(list_shard_urls(spec)) or [])
    loader = shard_loader(spec, cfg, table, batch_size, workers)
    f = extract_features(model, loader, device, n_last_blocks, desc=f"{split} features ({cfg.mode})",
                         progress=progress, total=_batches(spec, batch_size))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_features(f, path)
    return f


def _batches(spec: str, batch_size: int) -> int | None:
    """How many batches a shard set gives (for the progress bar), from its index when it has one."""
    from odis.shards import read_index

    try:
        return math.ceil(int(read_index(spec)["num_samples"]) / batch_size)
    except (OSError, ValueError, KeyError, TypeError):  # a pattern, a URL, an index without the count
        return None


def _classes(train: str, val: str) -> list[str] | None:
    """The train set's class list; refused when the val set's differs (a label is an index into the list)."""
    tr, va = read_classes(train), read_classes(val)
    if tr is not None and va is not None and tr != va:
        i = next((i for i, (a, b) in enumerate(zip(tr, va)) if a != b), min(len(tr), len(va)))
        first = f"{tr[i] if i < len(tr) else '(none)'!r} vs {va[i] if i < len(va) else '(none)'!r}"
        raise ValueError(f"--train {train} ({len(tr)} classes) and --val {val} ({len(va)} classes) have different "
                         f"class lists (first difference at index {i}: {first}); a label is an index into the list, "
                         "so both must be sharded with the same classes")
    return tr


def _labelled(f: Features, split: str, spec: str) -> Features:
    missing = int((f.labels < 0).sum())
    if missing:
        first = f.image_ids[int((f.labels < 0).nonzero()[0])]
        raise ValueError(f"{spec}: {missing} {split} sample(s) have no label (e.g. {first!r}); "
                         "k-NN and linear probes need a class label per image")
    return f


def open_backbone(backbone, arch=None):
    """The backbone at its own training size (another input size interpolates the position embeddings, timm's
    dynamic_img_size); a checkpoint whose tensors do not fit the architecture is a ValueError naming the file."""
    from odis.model import load_backbone

    try:
        return load_backbone(backbone, arch=arch)
    except RuntimeError as e:  # torch's size-mismatch report: one line per tensor, the first says enough
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()] or [str(e)]
        more = f" (and {len(lines) - 1} more tensors)" if len(lines) > 1 else ""
        raise ValueError(f"{backbone}: does not fit {arch or 'its recorded architecture'}: {lines[0]}{more}") from None


def _setup(backbone, arch, size, mode, box_select, boxes, device):
    model = open_backbone(backbone, arch)
    size = input_size(model, size)
    cfg = ViewConfig(mode=mode, size=size, patch=model.patch_size, box_select=box_select)
    manifest = BoxTable.from_manifest(boxes) if boxes else None
    return model, cfg, manifest, pick_device(device)


def _common(backbone, train, val, cfg, boxes, tr: Features, va: Features) -> dict:
    return {"backbone": str(backbone), "train": str(train), "val": str(val), "box_mode": cfg.mode,
            "box_select": cfg.box_select, "boxes": str(boxes) if boxes else "shards", "size": cfg.size,
            "resize": cfg.resize or round(cfg.size * 256 / 224), "n_train": len(tr.image_ids),
            "n_val": len(va.image_ids), "counts": {"train": tr.counts, "val": va.counts},
            "errors": (tr.errors + va.errors)[:20]}


def _train_val(backbone, train, val, mode, boxes, box_select, size, arch, n_last_blocks, batch_size, workers,
               device, cache, progress):
    """(view config, device, number of classes, train features, val features): the part k-NN and linear share."""
    classes = _classes(train, val)
    model, cfg, manifest, device = _setup(backbone, arch, size, mode, box_select, boxes, device)
    if n_last_blocks > model.depth:
        raise ValueError(f"--n-last-blocks {n_last_blocks}: the backbone has {model.depth} blocks")

    def features(spec: str, split: str) -> Features:
        f = features_for(model, str(backbone), spec, cfg, boxes, manifest, n_last_blocks, batch_size, workers,
                         device, cache, split, progress)
        return _labelled(f, split, spec)

    tr, va = features(train, "train"), features(val, "val")
    num_classes = len(classes) if classes else int(max(tr.labels.max(), va.labels.max())) + 1
    return cfg, device, num_classes, tr, va


def run_knn(backbone, train, val, mode="none", boxes=None, box_select="largest", size=None, ks=(10, 20, 100, 200),
            T=0.07, arch=None, batch_size=64, workers=2, device="auto", cache=None, progress=True) -> dict:
    """DINO's weighted k-NN on the teacher's last-block OBJ/CLS token, with the given box mode."""
    from odis.eval.knn import knn_classify, results_to_dict

    cfg, device, num_classes, tr, va = _train_val(backbone, train, val, mode, boxes, box_select, size, arch, 1,
                                                  batch_size, workers, device, cache, progress)
    res = knn_classify(tr.feats.to(device), tr.labels, va.feats.to(device), va.labels, ks, T, num_classes)
    return {"protocol": "knn", **_common(backbone, train, val, cfg, boxes, tr, va), "T": T,
            "num_classes": num_classes, "results": results_to_dict(res)}


def run_linear(backbone, train, val, mode="none", boxes=None, box_select="largest", size=None, n_last_blocks=4,
               lrs=None, epochs=100, probe_batch=256, shots=(), fractions=(), seeds=(0, 1, 2), full=True, arch=None,
               batch_size=64, workers=2, device="auto", cache=None, progress=True) -> dict:
    """Linear probes (lr sweep, few-shot settings averaged over seeds) on cached frozen features."""
    from odis.eval.linear import DEFAULT_LRS, probe_settings

    lrs = tuple(lrs or DEFAULT_LRS)
    cfg, device, num_classes, tr, va = _train_val(backbone, train, val, mode, boxes, box_select, size, arch,
                                                  n_last_blocks, batch_size, workers, device, cache, progress)
    res = probe_settings(tr.feats, tr.labels, va.feats, va.labels, num_classes, shots=shots, fractions=fractions,
                         seeds=tuple(seeds), full=full, lrs=lrs, epochs=epochs, batch_size=probe_batch,
                         device=device)
    return {"protocol": "linear", **_common(backbone, train, val, cfg, boxes, tr, va),
            "n_last_blocks": n_last_blocks, "feature_dim": int(tr.feats.shape[1]), "lrs": list(lrs),
            "epochs": epochs, "num_classes": num_classes, "results": res}


def run_dense(backbone, dataset, root, train_split, val_split, size=512, factors=(1, 8, 64, 128), k=30, beta=0.02,
              max_train=None, max_val=None, arch=None, batch_size=16, device="auto", seed=0) -> dict:
    """Hummingbird dense NN retrieval mIoU for each memory subsampling factor."""
    from odis.eval.dense import dense_nn_eval
    from odis.eval.segdata import open_dataset

    model = open_backbone(backbone, arch)
    size = input_size(model, size)
    tr = open_dataset(dataset, root, train_split).subset(max_train)
    va = open_dataset(dataset, root, val_split).subset(max_val)
    res = dense_nn_eval(model, tr, va, size, factors, k, beta, batch_size, pick_device(device), seed)
    return {"protocol": "dense-nn", "backbone": str(backbone), "dataset": dataset, "root": str(root),
            "train_split": train_split, "val_split": val_split, "n_train": len(tr), "n_val": len(va), "size": size,
            "k": k, "beta": beta, "num_classes": tr.num_classes, "class_names": tr.class_names, "results": res}


# ---- tables and comparison ----------------------------------------------------------------------------------

def metrics(result: dict) -> dict[str, float]:
    """The headline numbers of a result, by a name shared across runs of the same protocol."""
    p = result.get("protocol")
    if p == "knn":
        out = {}
        for r in result["results"]:
            k = f"k={r['k']}" + (f" (eff. {r['k_effective']})" if r["k_effective"] != r["k"] else "")
            out[f"{k} top-1"] = r["top1"]
            out[f"{k} top-5"] = r["top5"]
        return out
    if p == "linear":
        return {f"{r['setting']} top-1": r["top1"] for r in result["results"]}
    if p == "dense-nn":
        return {f"mIoU memory 1/{r['factor']} ({r['memory_size']} patches)": r["mIoU"] for r in result["results"]}
    raise ValueError(f"not an odis eval result (protocol {p!r})")


def spreads(result: dict) -> dict[str, float]:
    """The standard deviation over seeds of the metrics that have one (linear probe settings drawn more than once)."""
    if result.get("protocol") != "linear":
        return {}
    return {f"{r['setting']} top-1": r["top1_std"] for r in result["results"] if len(r.get("seeds", [])) > 1}


def _cell(result: dict, name: str) -> str:
    v, sd = metrics(result).get(name), spreads(result).get(name)
    return "" if v is None else f"{v:.2f}" + ("" if sd is None else f" ± {sd:.2f}")


def _label(result: dict) -> str:
    extra = f" [{result['box_mode']}]" if "box_mode" in result else ""
    return Path(result.get("backbone", "?")).name + extra


def table(result: dict, other: dict | None = None, other_name: str = "other") -> str:
    """A fixed-width text table of a result; with `other`, the two side by side and the difference."""
    mine = metrics(result)
    header = ["metric", _label(result)]
    rows = []
    if other is None:
        rows = [[name, _cell(result, name)] for name in mine]
    else:
        if other.get("protocol") != result.get("protocol"):
            raise ValueError(f"cannot compare a {result.get('protocol')} result with a {other.get('protocol')} one")
        theirs = metrics(other)
        header += [f"{other_name}: {_label(other)}", "diff"]
        for name in list(mine) + [n for n in theirs if n not in mine]:
            a, b = mine.get(name), theirs.get(name)
            diff = f"{a - b:+.2f}" if a is not None and b is not None else ""
            rows.append([name, _cell(result, name), _cell(other, name), diff])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def load_result(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable odis eval JSON ({e})") from None


def write_result(result: dict, path: str | Path) -> None:
    """The result as JSON (a non-finite number becomes null, so the file stays valid JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(result), indent=2, allow_nan=False))
