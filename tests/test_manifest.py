"""Box manifest: ids, schema, write/read (file and parts), validation messages, merge, statistics."""
from __future__ import annotations

import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odis.image_ids import image_id_for, image_id_list
from odis.manifest import (SCHEMA, ManifestError, add_row, empty_columns, image_ids_in, make_metadata, manifest_files,
                           manifest_metadata, merge_manifests, read_manifest, table_from_columns, write_manifest)
from odis.manifest_stats import plot_stats, summary_stats
from odis.manifest_validate import validate_manifest

path_part = st.text(alphabet=st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)),
                    min_size=1, max_size=12).filter(lambda s: s.strip(".") != "")
relpaths = st.lists(path_part, min_size=1, max_size=4).map("/".join)


@given(relpaths)
def test_image_id_is_dot_free_and_stable(rel):
    iid = image_id_for(rel)
    assert "." not in iid and "/" not in iid and "\\" not in iid and iid
    assert image_id_for(rel) == iid


@settings(max_examples=300)
@given(relpaths, relpaths)
def test_image_id_distinguishes_paths_that_sanitise_alike(a, b):
    if unicodedata.normalize("NFC", a) != unicodedata.normalize("NFC", b):  # NFC-equal names are one file name
        assert image_id_for(a) != image_id_for(b)


@settings(max_examples=500)
@given(st.text(max_size=40) | st.text(st.characters(max_codepoint=127), max_size=40))
def test_id_sanitiser_equals_the_regex_rule(text):
    """The ASCII byte-table shortcut keeps exactly what the documented rule keeps: ids are the manifest/shard
    contract, a shortcut that changed one character would orphan every box of that image."""
    import re

    from odis.image_ids import _sanitise

    assert _sanitise(text) == re.sub(r"[^\w\-]", "_", text)


@settings(max_examples=500)
@given(st.text(max_size=30) | st.text(st.characters(max_codepoint=127), max_size=30))
def test_path_ids_follow_the_documented_rule(path):
    """image_id_for takes a shortcut for plain ASCII paths: every id must still be the documented rule's (NFC,
    backslashes to '/', leading '/' dropped, unsafe characters to '_', '-' and SHA-1[:10]), recomputed here."""
    import hashlib
    import re

    rel = unicodedata.normalize("NFC", path.replace("\\", "/")).lstrip("/")
    if not rel:
        with pytest.raises(ValueError, match="empty path"):
            image_id_for(path)
        return
    safe = re.sub(r"[^\w\-]", "_", rel)
    assert image_id_for(path) == f"{safe}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:10]}"


@settings(max_examples=300)
@given(st.lists(st.text(st.characters(max_codepoint=127), max_size=8) | st.text(max_size=8) |
                st.sampled_from(["a/b.jpg", "/a/b.jpg", "a\\b.jpg", "a\x00b", ""]), max_size=8))
def test_id_list_equals_the_ids_one_by_one(paths):
    """image_id_list sanitises plain lists in one pass: it must give image_id_for's ids, or its errors (an empty
    path, two paths with one id) naming the file, whatever the list holds."""
    expected, error = [], None
    for p in paths:  # the first problem in list order is the one reported
        try:
            expected.append(image_id_for(p))
        except ValueError:
            error = "empty path"
            break
        if expected[-1] in expected[:-1]:
            error = "is shared by"
            break
    if error:
        with pytest.raises(ValueError, match=error):
            image_id_list(paths, "path")
        return
    assert image_id_list(paths, "path") == expected


def test_image_id_schemes_and_collision_cases():
    # the classic collisions of plain replacement get different ids
    assert len({image_id_for(p) for p in ["a/b.jpg", "a_b.jpg", "a/b_jpg", "a.b/jpg", "a/b.png"]}) == 5
    assert image_id_for("train2017/000000000139.jpg", "coco") == "000000000139"
    assert image_id_for("train/n01440764/n01440764_10026.JPEG", "stem") == "n01440764_10026"
    assert image_id_for("val/ILSVRC2012_val_00000001.JPEG", "stem") == "ILSVRC2012_val_00000001"
    assert image_id_for("dir/photo 1.jpg").startswith("dir_photo_1_jpg-")
    with pytest.raises(ValueError, match="unknown scheme"):
        image_id_for("a.jpg", "nope")


def test_coco_scheme_is_the_number_ending_a_coco_file_name_and_nothing_else():
    """COCO-2014 names kept every digit (`COCO_train2014_000000000139` -> '2014000000000139', not the JSON's id
    139), and names that are no COCO ids (Tiny-ImageNet's) got made-up ids instead of an error."""
    for rel in ["000000000139.jpg", "train2017/000000000139.jpg", "COCO_train2014_000000000139.jpg",
                "val2014/COCO_val2014_000000000139.jpg", "139.jpg"]:
        assert image_id_for(rel, "coco") == "000000000139", rel
    assert image_id_for("COCO_test2015_000000581929.jpg", "coco") == "000000581929"
    for rel in ["train/n01443537/images/n01443537_23.JPEG", "a.jpg", "img_7.png", "COCO_train2014_.jpg",
                "1234567890123.jpg", "COCO_train2014_000000000139_mask.png"]:
        with pytest.raises(ValueError) as e:
            image_id_list([rel], "coco")
        msg = str(e.value)
        assert msg.startswith(f"{rel}: ") and msg.count(rel) == 1 and "--id-scheme stem" in msg and "path" in msg


def test_an_unknown_scheme_is_an_error_about_the_option_not_a_file():
    for paths in (["000000008193.jpg"], ["a/b.jpg", "c.jpg"], []):
        with pytest.raises(ValueError) as e:
            image_id_list(paths, "stemm")
        assert str(e.value) == "--id-scheme 'stemm': expected one of path, stem, coco"


def _table(n_images=3):
    cols = empty_columns()
    for i in range(n_images):
        add_row(cols, f"img{i}", f"d/img{i}.jpg", 100, 50, "yolo", (10, 5, 60, 45), 0.9)
        add_row(cols, f"img{i}", f"d/img{i}.jpg", 100, 50, "yolo", (0, 0, 100, 50), 0.4)
    add_row(cols, "nobox", "d/nobox.jpg", 80, 80, "yolo")
    add_row(cols, "bad", "d/bad.jpg", 0, 0, "yolo", error="d/bad.jpg: empty file (0 bytes)")
    return table_from_columns(cols)


def test_write_read_roundtrip_file_and_parts(tmp_path):
    t = _table()
    meta = make_metadata("yolo", tmp_path, "path", conf=0.25, weights_sha256="ab")
    f = write_manifest(t, tmp_path / "m.parquet", meta)
    back = read_manifest(f)
    assert back.schema.equals(SCHEMA, check_metadata=False) and back.num_rows == t.num_rows
    assert back.column("x0").null_count == 2 and back.column("category").null_count == t.num_rows
    m = manifest_metadata(f)
    assert m["conf"] == 0.25 and m["source"] == "yolo" and m["manifest_version"] == 1 and m["id_scheme"] == "path"
    # a directory of parts (plus a hidden temporary file, which readers must ignore)
    d = tmp_path / "parts.parquet"
    write_manifest(t.slice(0, 4), d / "part-0.parquet", meta)
    write_manifest(t.slice(4), d / "part-1.parquet", meta)
    (d / ".part-2.parquet.tmp-1").write_bytes(b"half written")
    assert [p.name for p in manifest_files(d)] == ["part-0.parquet", "part-1.parquet"]
    assert read_manifest(d).to_pylist() == back.to_pylist()
    assert image_ids_in(d) == {"img0", "img1", "img2", "nobox", "bad"}
    assert validate_manifest(d) == []
    assert summary_stats(back)["images"] == 5


def test_validation_names_file_row_and_column(tmp_path):
    cols = _table().to_pydict()
    cols["x1"][2] = 140.0  # beyond width 100
    cols["y0"][3] = None  # partly null box
    cols["image_id"][4] = "img.2"  # dotted id
    cols["score"][0] = 1.5
    f = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols, schema=SCHEMA), f)
    problems = validate_manifest(f)
    assert any(p.startswith(f"{f}: row 2: column x1:") and "width=100" in p for p in problems), problems
    assert any(p.startswith(f"{f}: row 3: column x0:") and "partly null" in p for p in problems)
    assert any(p.startswith(f"{f}: row 4: column image_id:") for p in problems)
    assert any(p.startswith(f"{f}: row 0: column score:") for p in problems)


def test_validation_of_types_and_missing_columns(tmp_path):
    f = tmp_path / "types.parquet"
    t = _table()
    pq.write_table(t.set_column(2, "width", t.column("width").cast(pa.float64())), f)
    assert any("column width: type double, expected int32" in p for p in validate_manifest(f))
    g = tmp_path / "missing.parquet"
    pq.write_table(t.drop(["error"]), g)
    assert f"{g}: column error: missing" in validate_manifest(g)
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(g)
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "absent.parquet")


def test_validation_across_parts_finds_conflicting_paths(tmp_path):
    meta = make_metadata("yolo", tmp_path, "path")
    cols = empty_columns()
    add_row(cols, "x", "a/x.jpg", 10, 10, "yolo", (0, 0, 5, 5), 0.5)
    write_manifest(table_from_columns(cols), tmp_path / "d" / "part-0.parquet", meta)
    cols = empty_columns()
    add_row(cols, "x", "b/x.jpg", 10, 10, "yolo", (0, 0, 5, 5), 0.5)
    write_manifest(table_from_columns(cols), tmp_path / "d" / "part-1.parquet", meta)
    problems = validate_manifest(tmp_path / "d")
    assert len(problems) == 1 and "part-1.parquet: column image_id: 'x'" in problems[0] and "part-0" in problems[0]


def test_merge_keeps_rows_and_provenance_and_refuses_conflicts(tmp_path):
    a = write_manifest(_table(2), tmp_path / "a.parquet", make_metadata("yolo", tmp_path, "path"))
    cols = empty_columns()
    add_row(cols, "other", "d/other.jpg", 10, 10, "coco-gt", (1, 1, 4, 4), 1.0, 3)
    b = write_manifest(table_from_columns(cols), tmp_path / "b.parquet", make_metadata("coco-gt", tmp_path, "coco"))
    m = merge_manifests([a, b], tmp_path / "m.parquet")
    assert read_manifest(m).num_rows == read_manifest(a).num_rows + 1
    meta = manifest_metadata(m)
    assert meta["source"] == "merged" and [x["source"] for x in meta["inputs"]] == ["yolo", "coco-gt"]
    assert validate_manifest(m) == []
    cols = empty_columns()
    add_row(cols, "img0", "elsewhere/img0.jpg", 100, 50, "yolo", (1, 1, 4, 4), 0.5)
    c = write_manifest(table_from_columns(cols), tmp_path / "c.parquet", make_metadata("yolo", tmp_path, "path"))
    with pytest.raises(ManifestError, match="img0"):
        merge_manifests([a, c], tmp_path / "bad.parquet")


def test_summary_stats_counts_and_plot(tmp_path):
    s = summary_stats(_table(3))
    assert (s["images"], s["boxes"], s["no_box_images"], s["error_images"]) == (5, 6, 1, 1)
    # boxes per image over readable images: 2, 2, 2, 0
    assert s["boxes_per_image"]["max"] == 2 and s["boxes_per_image"]["min"] == 0
    assert s["box_area_fraction"]["max"] == pytest.approx(1.0)
    assert s["box_area_fraction"]["min"] == pytest.approx(50 * 40 / (100 * 50))
    assert s["score"]["min"] == pytest.approx(0.4) and s["errors_by_reason"] == {"empty file": 1}
    png = plot_stats(_table(3), tmp_path / "s.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_table_from_columns_types():
    cols = empty_columns()
    add_row(cols, "a", "a.jpg", 4, 4, "imagenet-gt", np.array([0, 0, 2, 2]), 1.0, 7)
    t = table_from_columns(cols)
    assert t.schema.field("category").type == pa.int32() and t.column("category")[0].as_py() == 7
    with pytest.raises(ManifestError, match="missing columns"):
        table_from_columns({"image_id": ["a"]})


def test_stats_cli_prints_plots_and_fails_on_violations(tmp_path):
    import json

    from typer.testing import CliRunner

    from odis.cli import app

    good = write_manifest(_table(3), tmp_path / "good.parquet", make_metadata("yolo", tmp_path, "path"))
    res = CliRunner().invoke(app, ["stats", str(good), "--plot", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    assert "images 5  boxes 6  no-box images 1  error images 1" in res.output and (tmp_path / "s.png").is_file()
    js = json.loads(CliRunner().invoke(app, ["stats", str(good), "--json"]).output)
    assert js["boxes"] == 6 and js["metadata"]["source"] == "yolo"
    cols = _table(1).to_pydict()
    cols["y1"][0] = 999.0
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols, schema=SCHEMA), bad)
    res = CliRunner().invoke(app, ["stats", str(bad)])
    assert res.exit_code == 1 and f"{bad}: row 0: column y1: y1=999.0 > height=50" in res.output
    res = CliRunner().invoke(app, ["stats", str(tmp_path / "nothing.parquet")])
    assert res.exit_code == 2 and "no such manifest" in res.output


def test_stats_unwritable_plot_is_one_line_before_reading(tmp_path, unwritable_outs):
    """Tracebacks, or (a folder) a plot written as FOLDER.png while `plot: FOLDER` was printed."""
    from typer.testing import CliRunner

    from odis.cli import app

    good = write_manifest(_table(3), tmp_path / "good.parquet", make_metadata("yolo", tmp_path, "path"))
    for plot in [*unwritable_outs("s.png"), tmp_path / "s.xyz"]:
        res = CliRunner().invoke(app, ["stats", str(good), "--plot", str(plot)])
        assert res.exit_code == 2 and f"error: --plot {plot}: " in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "good.parquet"]


def _stats(path):
    from typer.testing import CliRunner

    from odis.cli import app

    return CliRunner().invoke(app, ["stats", str(path)])


def test_nan_coordinates_are_a_violation_not_a_no_box_row(tmp_path):
    """pandas reads NaN and null alike: an all-NaN row passed as a no-box row, a partly NaN one as partly null."""
    cols = _table(2).to_pydict()
    nan = float("nan")
    cols["x0"][0] = cols["y0"][0] = cols["x1"][0] = cols["y1"][0] = nan
    cols["y1"][2] = nan
    f = tmp_path / "nan.parquet"
    pq.write_table(pa.table(cols, schema=SCHEMA), f)  # from Python lists: NaN stays NaN, None stays null
    problems = validate_manifest(f)
    assert problems == [f"{f}: row 0: column x0: NaN is not a coordinate (a missing box is null in all four columns)",
                        f"{f}: row 2: column y1: NaN is not a coordinate (a missing box is null in all four columns)"]
    res = _stats(f)
    assert res.exit_code == 1 and problems[0] in res.output, res.output


def test_a_pandas_round_trip_is_read_and_validated_like_the_original(tmp_path):
    """pandas writes strings as large_string and adds its own schema metadata: `stats` exited 1 on a valid manifest
    (large_string), and crashed (TypeError: operation 'rsub') when x0 had been written as text."""
    cols = _table(3).to_pydict()
    cols["category"] = [3] * len(cols["category"])  # ground truth: no null, so pandas keeps it int32
    good = write_manifest(table_from_columns(cols), tmp_path / "good.parquet", make_metadata("yolo", tmp_path, "path"))
    df = read_manifest(good).to_pandas()
    df.to_parquet(tmp_path / "round.parquet")
    assert pq.read_schema(tmp_path / "round.parquet").field("path").type == pa.large_string()
    assert validate_manifest(tmp_path / "round.parquet") == []
    res = _stats(tmp_path / "round.parquet")
    assert res.exit_code == 0 and "images 5  boxes 6" in res.output, res.output
    df["x0"] = df["x0"].map(lambda v: None if v != v else str(v))  # numbers as text
    df.to_parquet(tmp_path / "text.parquet")
    back = read_manifest(tmp_path / "text.parquet")
    assert b"pandas" not in back.schema.metadata and back.to_pandas()["x0"].dtype == np.float32
    res = _stats(tmp_path / "text.parquet")
    assert res.exit_code == 1 and "images 5  boxes 6" in res.output, res.output
    last = res.output.strip().splitlines()[-1]
    assert last == f"{tmp_path / 'text.parquet'}: column x0: type large_string, expected float"
