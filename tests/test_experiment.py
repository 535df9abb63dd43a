"""`odis experiment`: the paired statistics against a hand computation, the spec's checks, the box controls, and
the smoke preset of the miniature reproduction through the real command (results.json/.md/.png, resumable)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from typer.testing import CliRunner

from odis.cli import app
from odis.pipelines.experiment import SpecError, load_spec, summarise
from odis.stats import paired_difference

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "mini_repro.yaml"


def test_paired_difference_is_the_hand_computation():
    d = paired_difference({0: 30.0, 1: 32.0, 2: 31.0, 7: 50.0}, {0: 28.0, 1: 29.0, 2: 30.0})
    # diffs 2, 3, 1 (seed 7 has no pair): mean 2, sd 1, t(0.975, df=2) = 4.302653 -> half-width 4.302653 / sqrt(3)
    assert d["n"] == 3 and d["mean_diff"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert [x["seed"] for x in d["per_seed"]] == [0, 1, 2]
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one["mean_diff"] == 0.5 and one["ci95"] is None  # one seed: no interval


def _fake(name, method, seed, none, mask):
    return {"name": name, "method": method, "boxes": "none", "seed": seed, "overrides": [], "steps": 1,
            "train_s": 0.0, "knn": {"none": {"top1": none}, "mask": {"top1": mask}}}


def test_the_report_compares_only_what_learned():
    spec = load_spec(SPEC, "smoke")
    results = [_fake("untrained", "untrained", s, 10.0, 10.0) for s in (0, 1)]
    results += [_fake("ibot", "ibot", 0, 20.0, 21.0), _fake("ibot", "ibot", 1, 22.0, 23.0),
                _fake("odis-gt", "odis", 0, 11.0, 30.0), _fake("odis-gt", "odis", 1, 10.5, 33.0)]
    r = summarise(spec, results)
    assert r["summary"]["ibot"]["none"]["mean"] == 21.0 and r["summary"]["ibot"]["none"]["std"] == pytest.approx(
        math.sqrt(2))
    pair = next(p for p in r["paired"] if p["a"] == "odis-gt" and p["metric"] == "knn.mask.top1")
    assert pair["b"] == "ibot" and pair["mean_diff"] == pytest.approx(9.5)
    failed = [(c["run"], c["metric"]) for c in r["untrained_check"] if not c["learned"]]
    assert failed == [("odis-gt", "knn.none.top1")]  # +0.75 < min_gain 2.0


@pytest.mark.parametrize("edit, match", [
    ({"runs": [{"name": "a", "method": "mae"}]}, "method must be one of"),
    ({"runs": [{"name": "a", "method": "odis", "boxes": "jitter"}]}, "boxes must be"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "unique plain names"),
    ({"runs": [{"name": "../a"}]}, "unique plain names"),
    ({"seeds": []}, "seeds"),
    ({"data": {"synth": {"train": 8, "val": 4, "backround": "photos"}}}, r"data.synth: unknown keys \['backround'\]"),
    ({"data": {"synth": {"train": 8, "size": 32}}}, r"data.synth: needs \['val'\]"),
])
def test_bad_specs_are_refused_naming_the_key(tmp_path, edit, match):
    import yaml

    raw = yaml.safe_load(SPEC.read_text())
    raw.update(edit)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=match):
        load_spec(path)
    with pytest.raises(SpecError, match="no preset"):
        load_spec(SPEC, "huge")


def test_a_shared_override_list_is_spliced_into_a_run(tmp_path):
    """Rows that share a teacher share one YAML anchor; `[*teacher, key=value]` is that list and one more."""
    text = SPEC.read_text()
    spec = load_spec(SPEC)
    teacher = spec.run("ibot-minicpu").overrides
    assert len(teacher) == 4 and all(isinstance(o, str) and "=" in o for o in teacher)
    assert spec.run("odis-gt-minicpu").overrides == teacher
    assert spec.run("odis-gt-whole30-minicpu").overrides == [*teacher, "data.whole_image_box_prob=0.3"]
    assert "&minicpu" in text and "[*minicpu, data.whole_image_box_prob=0.3]" in text


def test_jitter_and_random_boxes_are_made_from_the_ground_truth(tmp_path):
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest
    from odis.manifest_boxes import read_box_rows
    from odis.pipelines.experiment.data import box_manifest

    cols = empty_columns()
    rng = np.random.default_rng(1)
    for i in range(50):
        add_row(cols, f"im{i}", f"im{i}.jpg", 100, 80, "coco-gt", box=(20, 20, 60, 50))
        add_row(cols, f"im{i}", f"im{i}.jpg", 100, 80, "coco-gt", box=tuple(rng.uniform(0, 1, 2) * 30) + (90, 70))
    gt = write_manifest(table_from_columns(cols), tmp_path / "gt.parquet", make_metadata("coco-gt", None, "stem"))
    paths = {"boxes": {"gt": gt}}
    jit = read_box_rows(box_manifest("jitter:0.3", paths, tmp_path))
    assert len(jit.image_id) == 100 and jit.used.all()
    first = jit.boxes[::2]  # the (20, 20, 60, 50) boxes: moved by <= 30% of 40x30, sides scaled by 0.7-1.3
    centre = (first[:, :2] + first[:, 2:]) / 2
    assert (np.abs(centre - [40, 35]) <= [0.3 * 40 + 1e-6, 0.3 * 30 + 1e-6]).all() and not (first == [20, 20, 60, 50]).all()
    rnd = read_box_rows(box_manifest("random", paths, tmp_path))
    assert sorted(rnd.image_id) == sorted(f"im{i}" for i in range(50))  # one box per image
    assert (rnd.boxes[:, :2] >= 0).all() and (rnd.boxes[:, 2] <= 100).all() and (rnd.boxes[:, 3] <= 80).all()


@pytest.mark.parametrize("extract, match", [
    ({"ss": {"detector": "edgeboxes"}}, "needs a detector"),
    ({"ss": {"detector": "selective-search", "threads": 4}}, "only extract-boxes options"),
    ({"gt": {"detector": "selective-search"}}, "the name of another box source"),
    (["selective-search"], "maps names to detector settings"),
])
def test_extracted_box_sources_are_checked(tmp_path, extract, match):
    import yaml

    raw = yaml.safe_load(SPEC.read_text())
    raw["data"]["extract"] = extract
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=match):
        load_spec(path)
    raw["data"] = {"train": "shards/a", "val": "shards/b", "extract": {"ss": {"detector": "selective-search"}}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="data.extract runs a detector over the synthetic scenes"):
        load_spec(path)


def test_a_detector_box_source_is_extracted_from_the_train_scenes_once(tmp_path):
    """data.extract runs the real extract-boxes over the train scenes at `prepare`, keyed like the shards (the GT
    manifest's ids), every scene accounted for; a rerun finds it made. Every run's box source is made there, before
    runs start in parallel."""
    import yaml

    from odis.manifest import manifest_metadata, read_manifest

    raw = yaml.safe_load(SPEC.read_text())
    raw["data"]["extract"] = {"ss": {"detector": "selective-search", "max_boxes": 5, "min_area": 0.04}}
    raw["runs"] = [{"name": "odis-ss", "method": "odis", "boxes": "ss"},
                   {"name": "odis-jitter", "method": "odis", "boxes": "jitter:0.3"}]
    del raw["presets"]["smoke"]["runs_only"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "exp"
    args = ["experiment", "prepare", str(path), "--preset", "smoke", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "boxes ss by selective-search" in r.output, r.output
    made = out / "data" / "manifests" / "train-ss.parquet"
    assert made.with_name("train-jitter-0.3.parquet").exists()  # every run's boxes, before any run starts
    ss, gt = (read_manifest(p).to_pandas() for p in (made, made.with_name("train-gt.parquet")))
    assert set(ss.image_id) == set(gt.image_id) and len(set(ss.image_id)) == 48  # every train scene, GT's keys
    boxes = ss.dropna(subset=["x0"])
    assert len(boxes) and ss.error.isna().all() and ss.groupby("image_id").size().max() <= 5
    area = (boxes.x1 - boxes.x0) * (boxes.y1 - boxes.y0) / (boxes.width * boxes.height)
    assert (area >= 0.04 - 1e-6).all() and manifest_metadata(made)["detector"] == "selective-search"
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "boxes ss" not in r.output
    from odis.pipelines.experiment.report import box_sources

    quality = box_sources(load_spec(path, "smoke"), out)["ss"]
    assert set(box_sources(load_spec(path, "smoke"), out)) == {"ss", "jitter:0.3"}
    assert quality["images"] == 48 and 0 < quality["recall"] <= 1 and quality["boxes_per_image"] <= 5


def test_box_quality_is_the_hand_computation(tmp_path):
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest
    from odis.pipelines.experiment.diagnostics import box_quality

    def manifest(name, rows):
        cols = empty_columns()
        for image, box in rows:
            add_row(cols, image, f"{image}.jpg", 40, 40, name, box=box)
        return write_manifest(table_from_columns(cols), tmp_path / f"{name}.parquet", make_metadata(name, None, "stem"))

    gt = manifest("gt", [("a", (0, 0, 10, 10)), ("b", (0, 0, 20, 20)), ("b", (20, 20, 40, 40))])
    # a: the object itself (IoU 1), its top half (0.5), a box beside it (0); b: nothing; c: not a GT image
    found = manifest("det", [("a", (0, 0, 10, 10)), ("a", (0, 0, 10, 5)), ("a", (20, 20, 30, 30)),
                             ("c", (0, 0, 5, 5))])
    q = box_quality(found, gt, "uniform")
    # drawn: a, each of its 3 boxes at 1/3 (areas 100, 50, 100 of 1600; 2 match); b has none: the whole image
    # (area 1, IoU 1/4 and 1/4: no match)
    assert q == {"images": 2, "boxes_per_image": 1.5, "precision": round(2 / 3, 4), "mean_best_iou": 0.5,
                 "recall": round(1 / 3, 4), "sampling": "uniform",
                 "drawn_area_share": round((250 / 3 / 1600 + 1) / 2, 4), "drawn_matches_object": round(2 / 3 / 2, 4)}
    by_area = box_quality(found, gt, "area")  # a's boxes at 100/250, 50/250, 100/250
    assert by_area["drawn_area_share"] == round((100 * 0.4 + 50 * 0.2 + 100 * 0.4) / 1600 / 2 + 0.5, 4)
    assert by_area["drawn_matches_object"] == round(0.6 / 2, 4)


@pytest.mark.slow
def test_smoke_preset_writes_the_results_and_resumes(tmp_path):
    out = tmp_path / "exp"
    args = ["experiment", "run", str(SPEC), "--preset", "smoke", "--out", str(out), "--device", "cpu"]
    r = CliRunner().invoke(app, ["experiment", "prepare", str(SPEC), "--preset", "smoke", "--out", str(out)])
    assert r.exit_code == 0 and (out / "data" / "shards" / "val" / "index.json").is_file(), r.output
    prepared = r.output
    r = CliRunner().invoke(app, args + ["--jobs", "2"])  # two runs at a time; the rerun below one at a time
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "data: synth scenes" not in r.output  # the prepared data is used as it is
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 1000
    assert {(x["name"], x["seed"]) for x in results["runs"]} == {(n, s) for n in ("untrained", "ibot", "odis-gt")
                                                                  for s in (0, 1)}
    for x in results["runs"]:
        assert {"name", "method", "boxes", "seed", "overrides", "steps", "train_s", "knn"} <= set(x)
        assert x["steps"] > 0 or x["method"] == "untrained"
        assert 0 <= x["knn"]["mask"]["top1"] <= 100
        assert x["method"] == "untrained" or 0 < x["diagnostics"]["teacher_entropy"] <= 1.0001
    assert results["obj_mask"]["grid"] == "4x4" and results["obj_mask"]["images"] == 24
    assert 0 < results["obj_mask"]["grid_share"] <= 1 and "of the grid" in (out / "results.md").read_text()
    # measured before training too: `prepare` prints the report's figure
    assert f"a 4x4 grid), over the 24 val scenes: {100 * results['obj_mask']['grid_share']:.1f}% of the grid" \
        in prepared
    # the paired rows are the statistics of the runs' own numbers
    top1 = {(x["name"], x["seed"]): x["knn"]["none"]["top1"] for x in results["runs"]}
    pair = next(p for p in results["paired"] if p["a"] == "odis-gt" and p["metric"] == "knn.none.top1")
    expect = paired_difference({s: top1["odis-gt", s] for s in (0, 1)}, {s: top1[pair["b"], s] for s in (0, 1)})
    assert pair["mean_diff"] == pytest.approx(expect["mean_diff"]) and pair["n"] == 2
    # killed after the runs: the rerun trains only what has no result, the report is the same
    kept = out / "runs" / "ibot-s0" / "result.json"
    before = kept.stat().st_mtime_ns
    (out / "runs" / "odis-gt-s1" / "result.json").unlink()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert kept.stat().st_mtime_ns == before and (out / "runs" / "odis-gt-s1" / "result.json").is_file()
    r = CliRunner().invoke(app, ["experiment", "report", str(out)])
    assert r.exit_code == 0 and "odis-gt - ibot" in r.output


@pytest.mark.slow
def test_a_failed_run_is_named_and_no_other_starts(tmp_path):
    import yaml

    from odis.pipelines.experiment import ExperimentError, run_experiment

    raw = yaml.safe_load(SPEC.read_text())
    raw["runs"] = [{"name": "ibot", "method": "ibot"}, {"name": "broken", "method": "ibot",
                                                        "overrides": ["optim.no_such_key=1"]}]
    del raw["presets"]["smoke"]["runs_only"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "exp"
    with pytest.raises(ExperimentError, match=r"broken seed 0: `odis train` failed .*train.log"):
        run_experiment(load_spec(path, "smoke"), out, device="cpu", echo=lambda _: None)
    assert (out / "runs" / "ibot-s0" / "result.json").is_file()
    assert not (out / "runs" / "ibot-s1").exists()  # after the failure nothing else started


def test_eval_sets_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (REPO / "experiments" / "obj_without_box.yaml").read_text()
    bad.write_text(text.replace("  sets:\n    objects: {synth:", "  sets:\n    objects: {scenes:", 1))
    with pytest.raises(SpecError, match="eval.sets maps plain names"):
        load_spec(bad)
    bad.write_text(text.replace("  sets:\n    objects: {synth: {", "  sets:\n    objects: {synth: {palete: gray, ", 1))
    with pytest.raises(SpecError, match=r"eval.sets.objects.synth: unknown keys \['palete'\]"):
        load_spec(bad)
    spec = load_spec(REPO / "experiments" / "obj_without_box.yaml")
    assert spec.metrics == ["none", "mask", "objects:none", "objects:mask"]


TABLES = ("table1_coco", "table4_boxes", "table5_switches")


def test_the_paper_tables_ship_as_specs():
    """Tables 1, 4 and 5 on real data: COCO pretraining, ImageNet k-NN without a box as an eval set, the recipe's
    budget under torchrun; each also loads with its smoke preset (synthetic scenes)."""
    for name in TABLES:
        spec = load_spec(REPO / "experiments" / f"{name}.yaml")
        assert spec.recipe == "vit_small_coco" and spec.train["processes"] == 8 and len(spec.seeds) == 3
        assert "in1k:none" in spec.metrics and "in1k:mask" not in spec.metrics
        assert any(r.method == "untrained" for r in spec.runs) and spec.compare
        smoke = load_spec(REPO / "experiments" / f"{name}.yaml", "smoke")
        assert "synth" in smoke.data and "synth" in smoke.eval_sets["in1k"]
    t5 = load_spec(REPO / "experiments" / "table5_switches.yaml")
    switches = {o for r in t5.runs for o in r.overrides}
    assert switches == {"data.box_sampling=uniform", "data.local_object_aware=true", "model.local_obj_attention=true",
                        "data.local_block_masking=true", "loss.lambda_img=0.5"}
    t4 = load_spec(REPO / "experiments" / "table4_boxes.yaml")
    assert {r.boxes for r in t4.runs} == {"none", "gt", "yolo", "mavl"}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_run_of_every_spec_is_a_valid_training_config(path):
    """Each run's recipe and overrides (the spec's, then the run's) load as `odis train` would load them, for the
    spec and for each of its presets: a mistyped switch fails here, not hours into an experiment."""
    import yaml

    from odis.trainer.recipes import find_recipe, load_config

    for preset in [None, *(yaml.safe_load(path.read_text()).get("presets") or {})]:
        spec = load_spec(path, preset)
        for run in spec.runs:
            if run.method != "untrained":
                cfg = load_config(find_recipe(spec.recipe), [*spec.train.get("overrides", []), *run.overrides,
                                                             f"method={run.method}"])
                assert cfg.method == run.method


@pytest.mark.slow
def test_table1_smoke_trains_under_torchrun_and_evaluates_the_eval_set(tmp_path):
    """Table 1's smoke preset: every run trained by two processes (gloo), evaluated on its val split and on the
    eval set (its own bank and queries), and the eval set's figures paired like the others."""
    out = tmp_path / "table1"
    spec_path = REPO / "experiments" / "table1_coco.yaml"
    r = CliRunner().invoke(app, ["experiment", "run", str(spec_path), "--preset", "smoke", "--out", str(out),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    results = json.loads((out / "results.json").read_text())
    spec = load_spec(spec_path, "smoke")
    assert {x["name"] for x in results["runs"]} == {run.name for run in spec.runs}
    for x in results["runs"]:
        assert set(x["knn"]) == {"none", "mask", "in1k:none"}
        assert x["knn"]["in1k:none"]["n_val"] == 16 and x["knn"]["none"]["n_val"] == 24
        assert x["steps"] > 0 or x["method"] == "untrained"
    assert "knn.in1k:none.top1" in {p["metric"] for p in results["paired"]}
    assert "k-NN in1k:none" in (out / "results.md").read_text()
    import torch  # trained by two processes: the checkpoint holds both ranks' data positions

    ckpt = torch.load(out / "runs" / "odis-s0" / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert [d["world_size"] for d in ckpt["data"]] == [2, 2]


_box = st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1))


@settings(max_examples=30, deadline=None)
@given(w=st.integers(40, 120), h=st.integers(40, 120), rel=st.lists(_box, min_size=1, max_size=3),
       patch=st.sampled_from([4, 8]))
@example(w=40, h=40, rel=[(0.0, 0.0, 1.0, 1.0), (0.0, 2.2250738585e-313, 1.0, 1.0)], patch=4)  # one box in float32
def test_mask_coverage_is_the_share_of_the_knn_mask(w, h, rel, patch):
    """The coverage the report prints is measured on the very mask the k-NN's `mask` mode gives the [OBJ] token."""
    import tempfile

    import torch
    from PIL import Image

    from odis.eval.features import box_view
    from odis.manifest import add_row, empty_columns, make_metadata, table_from_columns, write_manifest
    from odis.pipelines.experiment.diagnostics import mask_coverage

    # as the manifest stores them (float32): boxes equal there are one box, not a target and its distractor
    boxes = [tuple(float(np.float32(v)) for v in (x * w, y * h, min(w, x * w + bw * w), min(h, y * h + bh * h)))
             for x, y, bw, bh in rel]
    cols = empty_columns()
    for b in boxes:
        add_row(cols, "im", "im.jpg", w, h, "coco-gt", box=b)
    with tempfile.TemporaryDirectory() as tmp:
        m = write_manifest(table_from_columns(cols), Path(tmp) / "gt.parquet", make_metadata("coco-gt", None, "stem"))
        c = mask_coverage(m, 32, patch)
    img = Image.new("RGB", (w, h))
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    target = int(np.argmax(areas))
    masks = [box_view(img, np.array(b), "mask", 32, patch=patch).obj_mask for b in boxes]
    t = masks[target]
    assert c["fallbacks"] == (t is None)
    if t is None:  # the target lies outside the centre crop: the k-NN's [OBJ] then sees the whole image
        t = torch.ones((32 // patch,) * 2, dtype=torch.bool)
    assert c["images"] == 1 and c["grid_share"] == pytest.approx(float(t.float().mean()), abs=1e-4)
    shares = [float((t & d).sum() / d.sum()) for i, d in enumerate(masks)
              if i != target and d is not None and d.any() and boxes[i] != boxes[target]]
    assert c["distractors"] == len(shares)
    if shares:
        assert c["distractor_share"] == pytest.approx(np.mean(shares), abs=1e-4)


def test_run_diagnostics_and_the_collapse_line(tmp_path):
    from odis.pipelines.experiment.diagnostics import run_diagnostics
    from odis.pipelines.experiment.report import markdown

    folder = tmp_path / "ibot-s0"
    folder.mkdir()
    (folder / "config.yaml").write_text("model: {out_dim: 64}\n")
    (folder / "metrics.csv").write_text(f"step,t_entropy\n10,{math.log(64) * 0.3}\n20,{math.log(64) * 0.99}\n")
    (folder / "data.json").write_text(json.dumps({"samples": 10, "crop_fallbacks": 4, "obj_invalid": 2}))
    d = run_diagnostics(folder)
    assert d == {"teacher_entropy": pytest.approx(0.99), "crop_fallbacks": 0.2, "obj_invalid": 0.1}
    assert run_diagnostics(tmp_path / "missing") == {"teacher_entropy": None, "crop_fallbacks": None,
                                                    "obj_invalid": None}
    spec = load_spec(SPEC, "smoke")
    results = [_fake("untrained", "untrained", 0, 10.0, 10.0), _fake("ibot", "ibot", 0, 11.0, 12.0),
               _fake("odis-gt", "odis", 0, 20.0, 30.0)]
    results[1]["diagnostics"] = d
    results[2]["diagnostics"] = {**d, "teacher_entropy": 0.5}
    text = markdown(summarise(spec, results), spec)
    assert "**Collapsed**: ibot (" in text and "| ibot | ibot | none | 11.0 (n=1) | 12.0 (n=1) | 0.99 | 20.0% |" in text
