"""The output folder between runs: what a previous (maybe killed) run left (which entries are ours: odis.outdir),
and the index written last (atomically, odis.files)."""
from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

from odis import __version__
from odis.files import write_json
from odis.outdir import OutputFolder, changed_settings
from odis.shards import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION
from odis.pipelines.shard.plan import Plan
from odis.pipelines.shard.settings import ShardError
from odis.pipelines.shard.write import STATE_DIR


def shard_folder(out: Path, prefix: str) -> OutputFolder:
    """What `odis shard --prefix PREFIX` writes into OUT: its shards and `.partial` shards, the index and the state
    folder (--overwrite removes these; other files, other prefixes' shards included, are never touched)."""
    name = _shard_name(prefix)
    return OutputFolder(out, files=rf"{name}|\.{name}\.partial|{re.escape(INDEX_NAME)}", dirs=[STATE_DIR])


def _shard_name(prefix: str) -> str:
    return re.escape(prefix) + r"-[0-9]{6}\.tar"


def prepare_out(plan: Plan, overwrite: bool) -> dict[int, dict]:
    """Check the output folder against the plan; return {shard index: record} of the shards already complete.

    A folder may hold: nothing; a finished set (index.json); a killed run (plan.json and per-shard records in
    STATE_DIR, complete shards under their final names, `.partial` files). Completed shards are trusted only
    with their record, written after the rename: a shard without its record is redone."""
    s, out = plan.settings, Path(plan.settings.out)
    state, index_path, folder = out / STATE_DIR, out / INDEX_NAME, shard_folder(out, s.prefix)
    if overwrite:
        folder.clear()
    out.mkdir(parents=True, exist_ok=True)
    _check_same_plan(plan, folder)
    for p in folder.ours():
        if p.name.endswith(".partial"):
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
    shard_record = re.compile(_shard_name(s.prefix) + r"\.json")
    for rec_path in state.iterdir():
        if shard_record.fullmatch(rec_path.name):
            rec = json.loads(rec_path.read_text())
            done[int(rec["name"][len(s.prefix) + 1:-4])] = rec
    return {i: r for i, r in done.items() if (out / r["name"]).is_file()}


def _check_same_plan(plan: Plan, folder: OutputFolder) -> None:
    """Refuse to add shards to a set planned from other inputs or settings: the result would mix two plans."""
    s, out = plan.settings, folder.path
    state, index_path = out / STATE_DIR, out / INDEX_NAME
    old = None
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        old["inputs"] = {k: v for k, v in old.get("source", {}).items() if k.endswith("sha256")}
    elif (state / "plan.json").is_file():
        old = json.loads((state / "plan.json").read_text())
    elif any(p.name.endswith(".tar") for p in folder.ours()):
        raise ShardError(f"{out} holds {s.prefix}-*.tar shards that no odis index or plan describes; "
                         "use --overwrite to start over")
    if old is not None and old.get("fingerprint") != plan.fingerprint:
        raise ShardError(f"{out} holds a shard set made {_what_changed(old, plan)}; use --overwrite to start "
                         "over, or another --out")


def _what_changed(old: dict, plan: Plan) -> str:
    """'with --seed 0 (now 1)', 'from another manifest', or 'from other image files'; for the refusal above (in
    the options' names: the user reruns a command, not a config)."""
    changed = changed_settings(old.get("settings") or {}, plan.settings.output_settings())
    if changed:
        return "with " + ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in changed.items())
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
