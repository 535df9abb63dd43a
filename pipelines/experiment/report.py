"""An experiment's results as a reviewer reads them: OUT/results.json, results.md and results.png.

Per run and k-NN mode: mean ± std over seeds. Per compared pair: the paired difference over the seeds both have,
with its 95% t-interval (odis.stats). Before methods are compared, each trained run must beat the untrained
network of the same seeds by the spec's `min_gain` points; the report says so when one does not. Why a comparison
says what it says (diagnostics.py): the target's [OBJ] mask coverage on synthetic scenes, how close each box
source is to the ground truth, and per run the teacher's end entropy (collapse), crop fallbacks and invalid [OBJ]
views.
"""
from __future__ import annotations

import json
from pathlib import Path

from odis.files import write_json
from odis.pipelines.experiment.data import made_manifest, val_manifest
from odis.pipelines.experiment.diagnostics import COLLAPSED, box_quality, mask_coverage, run_diagnostics
from odis.stats import mean_std, paired_difference

DIAGNOSTICS = ("teacher_entropy", "crop_fallbacks", "obj_invalid")


def summarise(spec, results: list[dict]) -> dict:
    by_run = {r.name: [x for x in results if x["name"] == r.name] for r in spec.runs}
    top1 = {name: {m: {x["seed"]: x["knn"][m]["top1"] for x in rows if m in x["knn"]} for m in spec.metrics}
            for name, rows in by_run.items()}
    summary = {name: {m: mean_std(list(top1[name][m].values())) for m in spec.metrics} for name in by_run}
    paired = [{"a": a, "b": b, "metric": f"knn.{m}.top1", **paired_difference(top1[a][m], top1[b][m])}
              for a, b in spec.compare for m in spec.metrics]
    checks = []
    base = next((r.name for r in spec.runs if r.method == "untrained"), None)
    for r in spec.runs:
        if base is None or r.name == base:
            continue
        for m in spec.metrics:
            d = paired_difference(top1[r.name][m], top1[base][m])
            checks.append({"run": r.name, "metric": f"knn.{m}.top1", "gain": d["mean_diff"], "ci95": d["ci95"],
                           "min_gain": spec.min_gain,
                           "learned": d["mean_diff"] is not None and d["mean_diff"] >= spec.min_gain})
    return {"name": spec.name, "preset": spec.preset, "spec": spec.source, "k": spec.k, "runs": results,
            "summary": summary, "paired": paired, "untrained_check": checks, "diagnostics": _diagnostics(by_run)}


def _diagnostics(by_run: dict[str, list[dict]]) -> dict:
    """Per run, the mean over its seeds of each of run_diagnostics' shares (None where no seed has it)."""
    out = {}
    for name, rows in by_run.items():
        diags = [x.get("diagnostics") or (run_diagnostics(x["folder"]) if "folder" in x else {}) for x in rows]
        values = {k: [d[k] for d in diags if d.get(k) is not None] for k in DIAGNOSTICS}
        out[name] = {k: (round(sum(v) / len(v), 4) if v else None) for k, v in values.items()}
    return out


def obj_mask_coverage(spec, out: Path) -> dict | None:
    """The target mask's coverage (diagnostics.mask_coverage) on the val scenes, at the image and patch size the
    spec's runs train and are evaluated at (known before any run has trained)."""
    from odis.trainer.config import backbone_patch_size

    manifest, cfg = val_manifest(out), spec_config(spec)
    patch = backbone_patch_size(cfg)
    if manifest is None or patch is None:  # given shards; an arch whose patch size only the real build knows
        return None
    return mask_coverage(manifest, cfg.data.global_size, patch)


def box_sources(spec, out: Path) -> dict:
    """box_quality of each box source the runs train with, other than the ground truth, against it."""
    given = spec.data.get("boxes", {}) or {}
    where = lambda s: Path(given[s]) if s in given else made_manifest(s, out)  # noqa: E731
    used = dict.fromkeys(r.boxes for r in spec.runs if r.method == "odis" and r.boxes not in ("none", "gt"))
    if not where("gt").exists() or not used:
        return {}
    sampling = spec_config(spec).data.box_sampling
    return {s: box_quality(where(s), where("gt"), sampling) for s in used if where(s).exists()}


def spec_config(spec):
    """The recipe with the spec's train overrides: what every run shares (a run's own overrides aside)."""
    from odis.trainer.recipes import find_recipe, load_config

    return load_config(find_recipe(spec.recipe), spec.train.get("overrides", []))


def write_report(spec, results: list[dict], out: Path) -> dict:
    report = {**summarise(spec, results), "obj_mask": obj_mask_coverage(spec, out),
              "box_sources": box_sources(spec, out)}
    write_json(out / "results.json", report)
    (out / "results.md").write_text(markdown(report, spec), encoding="utf-8")
    plot(report, spec, out / "results.png")
    return report


def _ms(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s["std"] is not None else "") + f" (n={s['n']})"


def _share(v: float | None, percent: bool) -> str:
    return "-" if v is None else (f"{100 * v:.1f}%" if percent else f"{v:.2f}")


def coverage_lines(c: dict | None) -> list[str]:
    if not c or c["grid_share"] is None:
        return []
    dis = "no distractors" if c["distractor_share"] is None else \
        f"{100 * c['distractor_share']:.1f}% of a distractor's patches ({c['distractors']} distractors)"
    return [f"The target's [OBJ] mask in the k-NN view ({c['size']} px, {c['patch']}-px patches, a {c['grid']} "
            f"grid), over the {c['images']} val scenes: {100 * c['grid_share']:.1f}% of the grid, {dis}"
            + (f"; {c['fallbacks']} targets cut away by the centre crop count whole" if c.get("fallbacks") else "")
            + ".", ""]


def _box_source_lines(sources: dict) -> list[str]:
    if not sources:
        return []
    rows = [f"| {s} | {q['boxes_per_image']:.1f} | {_share(q['precision'], True)} | {_share(q['mean_best_iou'], False)}"
            f" | {_share(q['recall'], True)} | {_share(q['drawn_area_share'], True)} | "
            f"{_share(q['drawn_matches_object'], True)} |" for s, q in sources.items()]
    sampling = next(iter(sources.values()))["sampling"]
    return [f"The box sources against the ground truth of the train images (a box matches a GT object at IoU >= 0.5;"
            f" the drawn box: the one a step samples, data.box_sampling={sampling}):", "",
            "| boxes | per image | boxes matching an object | mean best IoU | objects found | drawn box: share of "
            "the image | drawn box matches an object |", "|---|---|---|---|---|---|---|", *rows, ""]


def _ci(p: dict) -> str:
    return "-" if p["ci95"] is None else f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}]"


def markdown(report: dict, spec) -> str:
    modes = spec.metrics
    sets = "".join(f" `{n}:MODE`: the same on the eval set {n}." for n in spec.eval_sets)
    lines = [f"# {report['name']}" + (f" (preset {report['preset']})" if report["preset"] else ""), "",
             f"Spec `{report['spec']}`; k-NN top-1 % (k = {report['k']}), mean ± std over seeds {spec.seeds}; "
             "`none`: the whole image, `mask`: the [OBJ] token masked to the target's box." + sets, "",
             *coverage_lines(report.get("obj_mask")), *_box_source_lines(report.get("box_sources")),
             "| run | method | boxes | " + " | ".join(f"k-NN {m}" for m in modes)
             + " | teacher H / ln K | crop fallbacks | invalid [OBJ] |",
             "|---|---|---|" + "---|" * (len(modes) + 3)]
    diag = report.get("diagnostics", {})
    for r in spec.runs:
        d = diag.get(r.name, {})
        lines.append(f"| {r.name} | {r.method} | {r.boxes} | "
                     + " | ".join(_ms(report["summary"][r.name][m]) for m in modes) + " | "
                     + " | ".join(_share(d.get(k), k != "teacher_entropy") for k in DIAGNOSTICS) + " |")
    lines += ["", "teacher H / ln K: the teacher's mean entropy per image at the end of training over its "
              f"maximum (>= {COLLAPSED}: collapsed, nearly the same uniform target for every image); crop "
              "fallbacks and invalid [OBJ]: shares of the global views."]
    collapsed = [n for n, d in diag.items() if (d.get("teacher_entropy") or 0) >= COLLAPSED]
    if collapsed:
        lines += ["", f"**Collapsed**: {', '.join(collapsed)} (teacher entropy >= {COLLAPSED} ln K at the end): "
                  "their teachers' targets are nearly uniform for every image, so little was distilled; a gain over "
                  "the untrained network comes from elsewhere (e.g. KoLeo spreading the features), and comparing "
                  "these runs says little about their distillation objectives."]
    lines += ["", "Paired differences (a - b over the seeds both ran; 95% t-interval):", "",
              "| a - b | metric | n | mean diff | 95% CI | per seed |", "|---|---|---|---|---|---|"]
    for p in report["paired"]:
        per = ", ".join(f"{x['diff']:+.1f}" for x in p["per_seed"])
        mean = "-" if p["mean_diff"] is None else f"{p['mean_diff']:+.1f}"
        lines.append(f"| {p['a']} - {p['b']} | {p['metric']} | {p['n']} | {mean} | {_ci(p)} | {per} |")
    failed = [c for c in report["untrained_check"] if not c["learned"]]
    lines.append("")
    if not report["untrained_check"]:
        lines.append("No untrained baseline in this spec: nothing shows that the networks learned.")
    elif failed:
        lines.append(f"**Not every trained run beats the untrained network by {spec.min_gain} points**, so these "
                     "comparisons say little: " + ", ".join(f"{c['run']} {c['metric']} "
                                                           f"{(c['gain'] or 0):+.1f}" for c in failed) + ".")
    else:
        lines.append(f"Every trained run beats the untrained network by at least {spec.min_gain} points.")
    return "\n".join(lines) + "\n"


def plot(report: dict, spec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names, modes = [r.name for r in spec.runs], spec.metrics
    width = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        s = [report["summary"][n][m] for n in names]
        left.bar([i + j * width for i in range(len(names))], [x["mean"] or 0 for x in s], width,
                 yerr=[x["std"] or 0 for x in s], capsize=3, label=m)
    left.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    left.set_ylabel("k-NN top-1 %")
    left.set_title("mean ± std over seeds")
    left.legend()
    pairs = report["paired"]
    labels = [f"{p['a']} - {p['b']}\n{p['metric'][4:-5]}" for p in pairs]
    means = [p["mean_diff"] or 0 for p in pairs]
    err = [[m - p["ci95"][0] if p["ci95"] else 0 for m, p in zip(means, pairs)],
           [p["ci95"][1] - m if p["ci95"] else 0 for m, p in zip(means, pairs)]]
    right.bar(range(len(pairs)), means, yerr=err, capsize=3, color="tab:gray")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(range(len(pairs)), labels, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("paired difference, points")
    right.set_title("paired differences, 95% interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_results(out: str | Path) -> dict:
    path = Path(out) / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: no readable experiment results ({e})") from None


def report_experiment(out: str | Path) -> dict:
    """The report again from the runs' result.json files (e.g. of a killed or still running experiment)."""
    from odis.pipelines.experiment.spec import load_spec

    out = Path(out)
    try:
        meta = json.loads((out / "spec.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{out}: not an experiment folder (spec.json: {e})") from None
    spec = load_spec(meta["source"], meta.get("preset"))
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    order = {(s, r.name): i for i, (s, r) in enumerate((s, r) for s in spec.seeds for r in spec.runs)}
    results = sorted((r for r in results if (r["seed"], r["name"]) in order), key=lambda r: order[r["seed"], r["name"]])
    return write_report(spec, results, out)
