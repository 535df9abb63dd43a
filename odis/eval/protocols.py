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


from odis.eval.features import (Features, ViewConfig, extract_features, input_size, list_shard_urls, load_features,
                                read_classes, save_features, shard_loader)
from odis.devices import pick_device
from odis.eval.segments import MASK_COUNTS, SegmentTable
from odis.eval.settings import DenseSettings, FeatureSettings, KnnSettings, LinearSettings
from odis.eval.settings import LinearSegSettings
from odis.eval.settings import RetrievalSettings
from odis.samples import BoxTable


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
                 split: str, progress: bool = True, segments: SegmentTable | None = None) -> Features:
    """Extract (or reuse from `cache`) the features of one shard set; `segments`: OBJ masks from the
    segmentations of a COCO JSON (`--masks`, mode `mask`)."""
    path = None
    if cache:
        masks = [segments.path] if segments is not None else []  # (no entry without: older caches stay valid)
        key = _fingerprint(str(Path(backbone).resolve()), spec, manifest_path, asdict(cfg), n_last_blocks, *masks)
        path = Path(cache) / f"{split}-{cfg.mode}-{key}.safetensors"
        if path.is_file():
            return load_features(path)
    if table is not None or segments is not None:  # refused before extracting when no shard image is in the
        from odis.shards import shard_keys          # manifest / the annotation file (tar headers)

        keys = shard_keys(list_shard_urls(spec))
        if table is not None:
            table.check_match(spec, keys or [])
        if segments is not None and keys is not None:
            segments.check_match(spec, keys)
            segments = segments.subset(keys)
    loader = shard_loader(spec, cfg, table, batch_size, workers, segments)
    f = extract_features(model, loader, device, n_last_blocks, desc=f"{split} features ({cfg.mode})",
                         progress=progress, total=_batches(spec, batch_size))
    if segments is not None:  # every mask count, in MASK_COUNTS' order, zeros included
        f.counts = {**{k: v for k, v in f.counts.items() if k not in MASK_COUNTS},
                    **{k: f.counts.get(k, 0) for k in MASK_COUNTS}}
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


def _common(s: FeatureSettings, cfg: ViewConfig, tr: Features, va: Features) -> dict:
    return {"backbone": str(s.backbone), "train": str(s.train), "val": str(s.val), "box_mode": cfg.mode,
            "box_select": cfg.box_select, "boxes": str(s.boxes) if s.boxes else "shards",
            "masks": str(s.masks) if s.masks else None, "size": cfg.size,
            "resize": cfg.resize or round(cfg.size * 256 / 224), "n_train": len(tr.image_ids),
            "n_val": len(va.image_ids), "counts": {"train": tr.counts, "val": va.counts},
            "errors": (tr.errors + va.errors)[:20]}


def _train_val(s: FeatureSettings, n_last_blocks: int):
    """(view config, device, number of classes, train features, val features): the part k-NN and linear share."""
    classes = _classes(s.train, s.val)
    model = open_backbone(s.backbone, s.arch)
    cfg = ViewConfig(mode=s.mode, size=input_size(model, s.size), patch=model.patch_size, box_select=s.box_select)
    table = BoxTable.from_manifest(s.boxes) if s.boxes else None
    segments = SegmentTable.from_coco(s.masks) if s.masks else None
    device = pick_device(s.device)
    if n_last_blocks > model.depth:
        raise ValueError(f"--n-last-blocks {n_last_blocks}: the backbone has {model.depth} blocks")

    def features(spec: str, split: str) -> Features:
        f = features_for(model, str(s.backbone), spec, cfg, s.boxes, table, n_last_blocks, s.batch_size, s.workers,
                         device, s.cache, split, s.progress, segments)
        return _labelled(f, split, spec)

    tr, va = features(s.train, "train"), features(s.val, "val")
    num_classes = len(classes) if classes else int(max(tr.labels.max(), va.labels.max())) + 1
    return cfg, device, num_classes, tr, va


def run_knn(s: KnnSettings) -> dict:
    """DINO's weighted k-NN on the teacher's last-block OBJ/CLS token, with the given box mode."""
    from odis.eval.knn import knn_classify, results_to_dict

    cfg, device, num_classes, tr, va = _train_val(s.validate(), 1)
    res = knn_classify(tr.feats.to(device), tr.labels, va.feats.to(device), va.labels, s.ks, s.T, num_classes)
    return {"protocol": "knn", **_common(s, cfg, tr, va), "T": s.T, "num_classes": num_classes,
            "results": results_to_dict(res)}


def run_linear(s: LinearSettings) -> dict:
    """Linear probes (lr sweep, few-shot settings averaged over seeds) on cached frozen features."""
    from odis.eval.linear import probe_settings

    cfg, device, num_classes, tr, va = _train_val(s.validate(), s.n_last_blocks)
    res = probe_settings(tr.feats, tr.labels, va.feats, va.labels, num_classes, shots=s.shots,
                         fractions=s.fractions, seeds=tuple(s.seeds), full=s.full, lrs=tuple(s.lrs),
                         epochs=s.epochs, batch_size=s.probe_batch, device=device)
    return {"protocol": "linear", **_common(s, cfg, tr, va), "n_last_blocks": s.n_last_blocks,
            "feature_dim": int(tr.feats.shape[1]), "lrs": list(s.lrs), "epochs": s.epochs,
            "num_classes": num_classes, "results": res}


def run_dense(s: DenseSettings) -> dict:
    """Hummingbird dense NN retrieval mIoU for each memory subsampling factor."""
    from odis.eval.dense import dense_nn_eval
    from odis.eval.segdata import open_dataset

    s.validate()
    model = open_backbone(s.backbone, s.arch)
    size = input_size(model, s.size)
    tr = open_dataset(s.dataset, s.root, s.train_split).subset(s.max_train)
    va = open_dataset(s.dataset, s.root, s.val_split).subset(s.max_val)
    res = dense_nn_eval(model, tr, va, size, s.factors, s.k, s.beta, s.batch_size, pick_device(s.device), s.seed)
    return {"protocol": "dense-nn", "backbone": str(s.backbone), "dataset": s.dataset, "root": str(s.root),
            "train_split": s.train_split, "val_split": s.val_split, "n_train": len(tr), "n_val": len(va),
            "size": size, "k": s.k, "beta": s.beta, "num_classes": tr.num_classes, "class_names": tr.class_names,
            "results": res}


def run_linear_seg(s: LinearSegSettings) -> dict:
    """Linear segmentation: a 1x1 head trained on the frozen teacher's patch tokens, mIoU on the validation split."""
    from odis.eval.linear_seg import linear_seg_eval
    from odis.eval.segdata import open_dataset

    s.validate()
    model = open_backbone(s.backbone, s.arch)
    size = input_size(model, s.size)
    device = pick_device(s.device)
    tr = open_dataset(s.dataset, s.root, s.train_split).subset(s.max_train)
    va = open_dataset(s.dataset, s.root, s.val_split).subset(s.max_val)
    _, res = linear_seg_eval(model, tr, va, size, s.epochs, s.lr, s.momentum, s.weight_decay, s.drop_at,
                             s.batch_size, s.mask_size, s.augment, s.workers, device, s.seed, s.progress)
    return {"protocol": "linear-seg", "backbone": str(s.backbone), "dataset": s.dataset, "root": str(s.root),
            "train_split": s.train_split, "val_split": s.val_split, "n_train": len(tr), "n_val": len(va),
            "size": size, "mask_size": res["mask_size"], "epochs": s.epochs, "lr": s.lr, "momentum": s.momentum,
            "weight_decay": s.weight_decay, "drop_at": s.drop_at, "batch_size": s.batch_size, "augment": s.augment,
            "seed": s.seed, "feature_dim": int(model.embed_dim), "num_classes": tr.num_classes,
            "class_names": tr.class_names, "mIoU": res["mIoU"], "pixel_accuracy": res["pixel_accuracy"],
            "pixels": res["pixels"], "per_class_iou": res["per_class_iou"], "train_loss": res["train_loss"]}


def run_retrieval(s: RetrievalSettings) -> dict:
    """Revisited Oxford/Paris retrieval (DINO's eval_image_retrieval.py): mAP and mP@1/5/10, Medium and Hard."""
    from odis.eval.retrieval import (KS, RetrievalImages, evaluate, gnd_file, load_ground_truth, rank,
                                     retrieval_features)

    s.validate()
    gt = load_ground_truth(s.gnd or gnd_file(s.root, s.dataset)).subset(s.max_db, s.max_queries)
    images = Path(s.root) / s.dataset / "jpg"
    db_paths, q_paths = gt.paths(images), gt.paths(images, queries=True)
    model = open_backbone(s.backbone, s.arch)
    device = pick_device(s.device)

    def features(paths, boxes, split):
        return retrieval_features(model, RetrievalImages(paths, boxes, s.imsize), device, s.multiscale,
                                  s.batch_size, s.workers, f"{split} features", s.progress)

    if s.query_crop:
        missing = [name for name, g in zip(gt.qimlist, gt.gnd) if g["bbx"] is None]
        if missing:
            raise ValueError(f"{gt.path}: {len(missing)} queries have no bbx to crop to (first: {missing[0]}); "
                             "pass --no-query-crop to use the whole query images")
    db = features(db_paths, None, "database")
    q = features(q_paths, [g["bbx"] for g in gt.gnd] if s.query_crop else None, "query")
    results, per_query = evaluate(rank(db, q), gt.gnd, KS)
    if results["medium"]["queries"] == 0:
        raise ValueError(f"{gt.path}: no query has a positive among the {len(gt.imlist)} database images")
    return {"protocol": "retrieval", "backbone": str(s.backbone), "dataset": s.dataset, "root": str(s.root),
            "gnd": gt.path, "imsize": s.imsize, "multiscale": s.multiscale, "query_crop": s.query_crop,
            "patch_size": model.patch_size, "feature_dim": int(db.shape[1]), "n_db": len(gt.imlist),
            "n_queries": len(gt.qimlist), "ks": list(KS), "results": results,
            "per_query_ap": {"queries": gt.qimlist, **per_query}}


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
    if p == "linear-seg":
        return {"mIoU": result["mIoU"], "pixel accuracy": result["pixel_accuracy"]}
    if p == "retrieval":
        return {f"{proto.capitalize()} {m}": float("nan") if v is None else v  # null: no query had a positive
                for proto, r in result["results"].items() for m, v in r.items() if m == "mAP" or m.startswith("mP@")}
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
    extra = f" [{result['box_mode']}{'+segm' if result.get('masks') else ''}]" if "box_mode" in result else ""
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
