"""The output folder between runs: what a previous (maybe killed) run left, and the index written last
(atomically, odis.files)."""
from __future__ import annotations

import datetime as _dt
import glob
import json
import shutil
from pathlib import Path

from odis import __version__
from odis.files import write_json
from odis.shards import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION
from odis.pipelines.shard.plan import Plan
from odis.pipelines.shard.settings import ShardError
from odis.pipelines.shard.write import STATE_DIR


def prepare_out(plan: Plan, overwrite: bool) -> dict[int, dict]:
    """Check the output folder against the plan; return {shard index: record} of the shards already complete.

    A folder may hold: nothing; a finished set (index.json); a killed run (plan.json and per-shard records in
    STATE_DIR, complete shards under their final names, `.partial` files). Completed shards are trusted only
    with their record, written after the rename: a shard without its record is redone."""
    s, out = plan.settings, Path(plan.settings.out)
    state, index_path = out / STATE_DIR, out / INDEX_NAME
    pattern = glob.escape(s.prefix) + "-[0-9][0-9][0-9][0-9][0-9][0-9]"
    if overwrite and out.exists():
        for p in _ours(out, pattern) + [index_path]:
            p.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_plan(plan, out, pattern)
    for p in out.glob(f".{pattern}.tar.partial"):
        p.unlink()  # left by a killed run
    state.mkdir(exist_ok=True)
    write_json(state / "plan.json", {"fingerprint": plan.fingerprint, "settings": plan.settings.output_settings(),
                                     "inputs": plan.inputs}, indent=None)
    if index_path.is_file():
        # A finished set being completed again (a shard was deleted): its records go back to STATE_DIR first, so
        # that a kill during this run loses nothing, then the index goes (it is rewritten last).
        for rec in _records_from_index(json.loads(index_path.read_text())).values():
            (state / f"{rec['name']}.json").write_text(json.dumps(rec, sort_keys=True))
        index_path.unlink()
    done = {}
    for rec_path in state.glob(f"{pattern}.tar.json"):
        rec = json.loads(rec_path.read_text())
        done[int(rec["name"][len(s.prefix) + 1:-4])] = rec
    return {i: r for i, r in done.items() if (out / r["name"]).is_file()}


def _ours(out: Path, pattern: str) -> list[Path]:
    """The shards and partial shards of this prefix (other files in the folder are never touched)."""
    return list(out.glob(pattern + ".tar")) + list(out.glob(f".{pattern}.tar.partial"))


def _check_same_plan(plan: Plan, out: Path, pattern: str) -> None:
    """Refuse to add shards to a set planned from other inputs or settings: the result would mix two plans."""
    s, state, index_path = plan.settings, out / STATE_DIR, out / INDEX_NAME
    old = None
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        old["inputs"] = {k: v for k, v in old.get("source", {}).items() if k.endswith("sha256")}
    elif (state / "plan.json").is_file():
        old = json.loads((state / "plan.json").read_text())
    elif any(p.suffix == ".tar" for p in _ours(out, pattern)):
        raise ShardError(f"{out} holds {s.prefix}-*.tar shards that no odis index or plan describes; "
                         "use --overwrite to start over")
    if old is not None and old.get("fingerprint") != plan.fingerprint:
        raise ShardError(f"{out} holds a shard set made {_what_changed(old, plan)}; use --overwrite to start "
                         "over, or another --out")


def _what_changed(old: dict, plan: Plan) -> str:
    """'with --seed 0 (now 1)', 'from another manifest', or 'from other image files'; for the refusal above."""
    before, now = old.get("settings") or {}, plan.settings.output_settings()
    changed = [f"--{k.replace('_', '-')} {before[k]} (now {now[k]})" for k in sorted(now)
               if k in before and before[k] != now[k]]
    if changed:
        return "with " + ", ".join(changed)
    if (old.get("inputs") or {}) != plan.inputs:
        return "from another version of the manifest or annotation file"
    return "from other image files (added, removed or resized since)"


def make_index(plan: Plan, records: list[dict], seconds: float, written: int) -> dict:
    """index.json: every shard with count, bytes and sha256; what was left out and why; how it was made."""
    s = plan.settings
    skipped = sorted(({**x, "shard": r["name"]} for r in records for x in r["skipped"]), key=lambda x: x["path"])
    warnings = plan.warnings + [{**x, "shard": r["name"]} for r in records for x in r["warnings"]]
    n = sum(r["count"] for r in records)
    return {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "odis_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "prefix": s.prefix, "num_samples": n, "num_shards": len(records),
        "shards": [{k: r[k] for k in ("name", "count", "sha256", "bytes")} for r in records],
        "labels": s.labels, "classes": plan.classes, "id_scheme": plan.id_scheme,
        "source": {"images_root": s.images, "manifest": s.manifest, "coco_json": s.coco_json, **plan.inputs},
        "settings": s.output_settings(),
        "boxes": plan.box_counts,
        "skipped": skipped, "warnings": sorted(warnings, key=lambda x: x["path"]),
        "ignored_files": {"count": len(plan.ignored), "examples": plan.ignored[:10]},
        "fingerprint": plan.fingerprint,
        "last_run": {"shards_written": written, "seconds": round(seconds, 3)},
    }


def _records_from_index(index: dict) -> dict[int, dict]:
    """The per-shard records of a finished run, rebuilt from its index (to redo only shards deleted since)."""
    recs = {}
    for i, sh in enumerate(index["shards"]):
        per = lambda key: [{k: v for k, v in x.items() if k != "shard"} for x in index[key]  # noqa: E731
                           if x.get("shard") == sh["name"]]
        recs[i] = {**sh, "skipped": per("skipped"), "warnings": per("warnings")}
    return recs
