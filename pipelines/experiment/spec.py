"""An experiment spec: a grid of runs (method x box source) x seeds, trained at one budget, evaluated alike.

    load_spec(path, preset=None) -> Spec     (YAML, safe loader; a preset is merged over the spec's top level)

A spec (experiments/*.yaml):

    name: text
    recipe: mini_cpu                 # odis train -c ...
    data: {synth: {...},             # scenes made by `odis synth` (and their GT boxes), with optional
           extract: {NAME: {detector: selective-search|yolo|mavl, max_boxes: N, ...}}}  # box sources that
                                     # `odis extract-boxes` makes from the train scenes (its options), or
    data: {train: SHARDS, val: SHARDS, boxes: {gt: MANIFEST, yolo: MANIFEST, ...}}
    train: {epochs: 12, batch_size: 64, overrides: [key=value, ...], processes: 1,   # the same for every run
            jobs: 1}                 # (processes > 1: each training under torchrun, batch_size per process;
                                     # jobs > 1: that many runs train at once on the device, `--jobs`)
    seeds: [0, 1, 2]
    eval: {k: 20, modes: [none, mask],
           sets: {NAME: {synth: {...}} | {train: SHARDS, val: SHARDS}, [modes: [...]]}}
                                     # more k-NN sets (their own bank and queries), metrics NAME:MODE
    min_gain: 2.0                    # k-NN points a trained run must gain over the untrained one
    runs: [{name, method: untrained|dino|ibot|odis,
            boxes: none|gt|jitter:S|random|<a name in data.boxes or data.extract>,
            overrides: [...]}]       # a list inside is spliced in: rows that share a teacher share one YAML
                                     # anchor, `overrides: &teacher [...]`, then `[*teacher, key=value]`
    compare: [[run a, run b], ...]   # paired differences a - b
    presets: {smoke: {...}, cpu: {...}, gpu: {...}}
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("untrained", "dino", "ibot", "odis")
MODES = ("none", "mask")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # run and eval-set names: folder and metric names
BUILT_IN_BOXES = {"none", "gt", "random"}  # and jitter:S


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the key."""


@dataclass
class Run:
    name: str
    method: str
    boxes: str = "none"      # none | gt | jitter:S | random | a name in data.boxes or data.extract
    overrides: list[str] = field(default_factory=list)


@dataclass
class Spec:
    name: str
    recipe: str
    data: dict
    train: dict
    seeds: list[int]
    runs: list[Run]
    compare: list[tuple[str, str]]
    k: int = 20
    modes: tuple[str, ...] = MODES
    min_gain: float = 2.0
    preset: str | None = None
    source: str = ""
    eval_sets: dict = field(default_factory=dict)  # name -> {"synth": {...}} or {"train", "val"}, ["modes"]

    def run(self, name: str) -> Run:
        return next(r for r in self.runs if r.name == name)

    @property
    def metrics(self) -> list[str]:
        """The k-NN figures of every run: the modes on the val split, then NAME:MODE on each eval set."""
        return list(self.modes) + [f"{n}:{m}" for n, v in self.eval_sets.items() for m in v.get("modes", self.modes)]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_spec(path: str | Path, preset: str | None = None) -> Spec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the spec ({e})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping at the top level")
    presets = raw.pop("presets", {}) or {}
    if preset is not None:
        if preset not in presets:
            raise SpecError(f"{path}: no preset {preset!r} (has: {', '.join(presets) or 'none'})")
        raw = _merge(raw, presets[preset])
    return _validate(raw, path, preset)


def _validate(raw: dict, path: Path, preset: str | None) -> Spec:
    def need(key, typ):
        if not isinstance(raw.get(key), typ):
            raise SpecError(f"{path}: `{key}` must be a {typ.__name__}, got {raw.get(key)!r}")
        return raw[key]

    data, train, ev = need("data", dict), need("train", dict), raw.get("eval", {}) or {}
    _check_extract(data, path)
    _check_synth(data.get("synth"), path, "data.synth")
    runs = []
    for i, r in enumerate(need("runs", list)):
        if not isinstance(r, dict) or "name" not in r:
            raise SpecError(f"{path}: runs[{i}] needs a name")
        overrides = [str(o) for item in r.get("overrides", []) for o in (item if isinstance(item, list) else [item])]
        run = Run(str(r["name"]), str(r.get("method", "odis")), str(r.get("boxes", "none")), overrides)
        _check_run(run, data, path, i)
        runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names) or not all(PLAIN_NAME.fullmatch(n) for n in names):
        raise SpecError(f"{path}: run names must be unique plain names, got {names}")
    only = raw.get("runs_only")
    if only:
        runs = [r for r in runs if r.name in only]
    kept = {r.name for r in runs}
    compare = [tuple(c) for c in raw.get("compare", []) if len(c) == 2 and set(c) <= kept]
    for key in ("processes", "jobs"):
        if not (isinstance(train.get(key, 1), int) and train.get(key, 1) >= 1):
            raise SpecError(f"{path}: train.{key} must be an integer >= 1, got {train.get(key)!r}")
    seeds = [int(s) for s in need("seeds", list)]
    modes = tuple(ev.get("modes", MODES))
    if not seeds or len(set(seeds)) != len(seeds) or not set(modes) <= set(MODES):
        raise SpecError(f"{path}: seeds must be distinct integers and eval.modes a subset of {MODES}")
    if not ("synth" in data or ("train" in data and "val" in data)):
        raise SpecError(f"{path}: data needs `synth` or both `train` and `val` shard sets")
    sets = ev.get("sets", {}) or {}
    if not isinstance(sets, dict) or not all(_eval_set_ok(n, v) for n, v in sets.items()):
        raise SpecError(f"{path}: eval.sets maps plain names to {{synth: {{...}}}} or {{train: SHARDS, val: SHARDS}}"
                        f" (and optional modes, a subset of {MODES}), got {sets!r}")
    for name, v in sets.items():
        _check_synth(v.get("synth"), path, f"eval.sets.{name}.synth")
    return Spec(str(raw.get("name", path.stem)), str(need("recipe", str)), data, train, seeds, runs, compare,
                int(ev.get("k", 20)), modes, float(raw.get("min_gain", 2.0)), preset, str(path),
                {str(n): v for n, v in sets.items()})


def _check_synth(synth, path: Path, key: str) -> None:
    """Scenes to make: SynthConfig's fields (objects and scale as ranges "2-3", "0.25-0.35") and the train and val
    counts, nothing else (a mistyped key would be silently left at its default)."""
    from dataclasses import fields

    from odis.synth import SynthConfig

    if synth is None:
        return
    if not isinstance(synth, dict):
        raise SpecError(f"{path}: {key} must be a mapping of `odis synth` options, got {synth!r}")
    known = {f.name for f in fields(SynthConfig)} | {"train", "val"}
    unknown = sorted(set(synth) - known)
    missing = sorted({"train", "val"} - set(synth))
    if unknown or missing:
        raise SpecError(f"{path}: {key}: " + "; ".join(
            ([f"unknown keys {unknown} (known: {sorted(known)})"] if unknown else [])
            + ([f"needs {missing}"] if missing else [])))


def _eval_set_ok(name, v) -> bool:
    if not (PLAIN_NAME.fullmatch(str(name)) and isinstance(v, dict)):
        return False
    shards = isinstance(v.get("train"), str) and isinstance(v.get("val"), str)
    modes = v.get("modes", list(MODES))
    made = isinstance(v.get("synth"), dict)  # scenes to make win over shard sets (as in `data`: a preset's synth)
    return (made or shards) and isinstance(modes, list) and set(modes) <= set(MODES)


def _check_extract(data: dict, path: Path) -> None:
    """data.extract: named detector settings, run over synthetic train scenes (given shards come with manifests)."""
    from dataclasses import fields

    from odis.pipelines.detectors import DETECTORS, DetectorConfig

    options = {f.name for f in fields(DetectorConfig)} - {"name"} | {"detector"}  # extract-boxes' options
    extract = data.get("extract") or {}
    if not isinstance(extract, dict):
        raise SpecError(f"{path}: data.extract maps names to detector settings, got {extract!r}")
    if extract and "synth" not in data:
        raise SpecError(f"{path}: data.extract runs a detector over the synthetic scenes (data.synth); for given "
                        "shards, run `odis extract-boxes` and name the manifest in data.boxes")
    taken = BUILT_IN_BOXES | set(data.get("boxes", {}) or {})
    for name, opts in extract.items():
        if name in taken:
            raise SpecError(f"{path}: data.extract.{name}: the name of another box source")
        if not (PLAIN_NAME.fullmatch(str(name)) and isinstance(opts, dict) and opts.get("detector") in DETECTORS
                and set(opts) <= options):
            raise SpecError(f"{path}: data.extract.{name} needs a detector ({', '.join(DETECTORS)}) and only "
                            f"extract-boxes options ({', '.join(sorted(options - {'detector'}))}), "
                            f"got {opts!r}")


def _check_run(run: Run, data: dict, path: Path, i: int) -> None:
    if run.method not in METHODS:
        raise SpecError(f"{path}: runs[{i}] {run.name}: method must be one of {METHODS}, got {run.method!r}")
    known = BUILT_IN_BOXES | set(data.get("boxes", {}) or {}) | set(data.get("extract", {}) or {})
    jitter = re.fullmatch(r"jitter:(\d*\.?\d+)", run.boxes)
    if run.boxes not in known and not jitter:
        raise SpecError(f"{path}: runs[{i}] {run.name}: boxes must be none, gt, jitter:S, random or one of "
                        f"data.boxes or data.extract, got {run.boxes!r}")
    if run.method == "odis" and run.boxes == "none" and "synth" not in data:
        raise SpecError(f"{path}: runs[{i}] {run.name}: odis needs a box source")
