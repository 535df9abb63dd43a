"""Revisited Oxford/Paris retrieval: revisitop's mAP / mP@k on a toy ground truth worked out by hand, the safe
ground-truth loader (a pickle that would run a command is refused and never runs), and the real command on a
small revisited-format dataset built from COCO images (copies, rescaled, brightened and flipped ones)."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from odis.cli import app
from odis.eval.retrieval import (KS, _fit, compute_ap, compute_map, evaluate, gnd_to_json, image_features,
                                 load_ground_truth, rank)
from odis.eval.safe_pickle import UnsafePickle
from odis.names import UnsafeName


def _gnd(easy, hard, junk, bbx=(0, 0, 10, 10)):
    return {"easy": np.array(easy, np.int64), "hard": np.array(hard, np.int64), "junk": np.array(junk, np.int64),
            "bbx": np.array(bbx, np.float64)}


# ---- the evaluation, by hand ----------------------------------------------------------------------------------

def test_compute_map_by_hand():
    """Database 0..4. Query 0 ranks them [0, 1, 2, 3, 4] with easy {0}, hard {3}, junk {2}; query 1 ranks
    [4, 0, 1, 2, 3] with easy {4} and no hard positive.

    Medium, query 0: positives {0, 3}, junk {2} leaves the ranking [p, n, p, n]: positives at 0-based ranks 0
    and 2. AP = 1/2 * [(1 + 1/1)/2 + (1/2 + 2/3)/2] = 1/2 + 7/24 = 19/24 (17/24 if the junk stayed in).
    P@1 = 1; P@5 = P@10 = 2/3 (k' = the rank of the last positive, 3). Query 1: AP 1, P@k 1.
    Hard, query 0: positive {3}, junk {2, 0} leaves [n, p, n]: AP = (0/1 + 1/2)/2 = 1/4; P@1 = 0, P@5 = P@10 = 1/2.
    Query 1 has no hard positive: left out of the Hard means."""
    ranks = np.array([[0, 4], [1, 0], [2, 1], [3, 2], [4, 3]])
    gnd = [_gnd([0], [3], [2]), _gnd([4], [], [])]
    results, per_query = evaluate(ranks, gnd)
    m, h = results["medium"], results["hard"]
    assert m["mAP"] == pytest.approx(100 * (19 / 24 + 1) / 2)
    assert [m[f"mP@{k}"] for k in KS] == pytest.approx([100, 100 * (2 / 3 + 1) / 2, 100 * (2 / 3 + 1) / 2])
    assert m["queries"] == 2 and per_query["medium"] == pytest.approx([100 * 19 / 24, 100])
    assert h["mAP"] == pytest.approx(25) and [h[f"mP@{k}"] for k in KS] == pytest.approx([0, 50, 50])
    assert h["queries"] == 1 and per_query["hard"][0] == pytest.approx(25) and np.isnan(per_query["hard"][1])

    # the junk really is taken out: the same ranking with no junk gives 17/24
    mAP, aps, _, _ = compute_map(ranks[:, :1], [{"ok": np.array([0, 3]), "junk": np.array([], np.int64)}])
    assert mAP == pytest.approx(17 / 24) and aps[0] == pytest.approx(17 / 24)


def test_compute_ap_edges():
    assert compute_ap(np.array([0, 1, 2]), 3) == pytest.approx(1.0)  # every positive first
    # a positive the ranking never returns still counts in the number of positives
    assert compute_ap(np.array([0]), 2) == pytest.approx(0.5)
    assert compute_ap(np.array([4]), 1) == pytest.approx((1 / 5) / 2)  # (0/4 + 1/5) / 2
    mAP, aps, mpr, _ = compute_map(np.arange(3)[:, None], [{"ok": np.array([], np.int64), "junk": []}])
    assert np.isnan(mAP) and np.isnan(aps[0]) and np.isnan(mpr).all()


def test_rank_is_by_cosine_best_first():
    db = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8]]), dim=1)
    q = torch.tensor([[0.0, 1], [1, 0]])
    assert rank(db, q).T.tolist() == [[1, 2, 0], [0, 2, 1]]


def test_fit_drops_what_the_patch_convolution_drops():
    """DINO's stride-p patch convolution ignores the rows and columns past the last whole patch; the scales are
    bilinear with scale_factor (so floor(h * s)); a side under one patch is resized up to one patch."""
    x = torch.randn(1, 3, 70, 53)
    assert _fit(x, 1.0, 16).shape[-2:] == (64, 48) and torch.equal(_fit(x, 1.0, 16), x[..., :64, :48])
    assert _fit(x, 1 / 2 ** 0.5, 16).shape[-2:] == (48, 32)  # floor(49.5), floor(37.5) -> whole patches
    assert _fit(x, 0.5, 16).shape[-2:] == (32, 16)          # 35 x 26
    assert _fit(torch.randn(1, 3, 20, 12), 0.5, 16).shape[-2:] == (16, 16)


def test_features_do_not_depend_on_the_batch():
    from odis.model import OdisViT

    torch.manual_seed(0)
    model = OdisViT("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    x = torch.randn(3, 3, 48, 64)
    for ms in (False, True):
        together = image_features(model, x, ms)
        alone = torch.cat([image_features(model, x[i:i + 1], ms) for i in range(3)])
        assert torch.allclose(together, alone, atol=1e-5) and torch.allclose(together.norm(dim=1), torch.ones(3))


# ---- the ground truth: a pickle read safely, JSON, names ----------------------------------------------------

def _toy_gt(**changes):
    data = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [_gnd([0], [1], [2])]}
    data.update(changes)
    return data


class _RunsACommand:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call, code", [(os.system, "touch {marker}"),
                                        (eval, "__import__('os').system('touch {marker}')")],
                         ids=["os.system", "builtins.eval"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, call, code):
    marker = tmp_path / "ran"
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(_toy_gt(imlist=["a", _RunsACommand(call, code.format(marker=marker)), "c"])))
    with pytest.raises(UnsafePickle) as e:
        load_ground_truth(path)
    assert str(e.value).startswith(f"{path}: refused to unpickle the global ")
    assert ("system" if call is os.system else "builtins.eval") in str(e.value), str(e.value)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the check itself: an ordinary unpickler would have run it
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_arrays_load_at_every_protocol_and_convert_to_json(tmp_path, protocol):
    data = _toy_gt()
    data["gnd"][0]["bbx"] = np.array([1.5, 2, 30, 40.25])
    data["gnd"][0]["junk"] = np.array([2.0])  # a float index array, as converted from the .mat files
    data["extra"] = {"n": np.float64(3.0), "b": b"bytes", "t": (1, 2)}  # scalars, bytes and tuples are fine
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    gt = load_ground_truth(path)
    assert gt.imlist == ["a", "b", "c"] and gt.qimlist == ["q"]
    g = gt.gnd[0]
    assert g["easy"].tolist() == [0] and g["hard"].tolist() == [1] and g["junk"].tolist() == [2]
    assert g["bbx"].tolist() == [1.5, 2, 30, 40.25]
    gnd_to_json(path, tmp_path / "gnd.json")
    back = load_ground_truth(tmp_path / "gnd.json")
    assert back.imlist == gt.imlist and all(np.array_equal(back.gnd[0][k], g[k]) for k in g)


@pytest.mark.parametrize("bad", ["../secret", "/etc/passwd", "sub/dir", "pipe:ls", ""])
def test_image_names_from_the_ground_truth_must_be_plain(tmp_path, bad):
    path = tmp_path / "gnd.json"
    path.write_text(json.dumps({"imlist": ["a", bad], "qimlist": ["q"],
                                "gnd": [{"easy": [0], "hard": [], "junk": []}]}))
    with pytest.raises(UnsafeName, match=rf"^{path}: imlist\[1\]: .* is not a plain file name"):
        load_ground_truth(path)


@pytest.mark.parametrize("gnd, problem", [
    ([{"easy": [0], "hard": [3], "junk": []}], r"gnd\[0\].hard: index 3 is not in the database \(0..2\)"),
    ([{"easy": [0.5], "hard": [], "junk": []}], r"gnd\[0\].easy: expected a list of database indices"),
    ([{"easy": [0], "hard": []}], r"gnd\[0\]: expected a dict with easy, hard and junk"),
    ([{"easy": [0], "hard": [], "junk": [], "bbx": [5, 5, 1, 9]}], r"gnd\[0\].bbx: the box .* is empty"),
    ([], r"gnd must be a list with one entry per query \(1\)"),
])
def test_a_broken_ground_truth_is_refused_naming_the_entry(tmp_path, gnd, problem):
    path = tmp_path / "gnd.json"
    path.write_text(json.dumps({"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": gnd}))
    with pytest.raises(ValueError, match=rf"^{path}: {problem}"):
        load_ground_truth(path)


# ---- the command on real images --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def revisited(coco_tiny, tmp_path_factory):
    """ROOT/roxford5k in revisitop's layout from real COCO images. Queries 0-2 (bbx: the whole image) have an
    exact copy (easy), a copy at 3/4 size (hard) and a mirrored copy (junk) in the database; query 3 is cropped
    to its centre, with a copy (easy), a brightened and a 3/4-size copy (hard), a mirrored one (junk); 16 other
    COCO images are the negatives. Plus a random ViT-Ti/16 of 2 blocks at 64 px."""
    from odis.model import OdisViT, export_backbone

    root = tmp_path_factory.mktemp("revisitop")
    jpg = root / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    src = sorted((coco_tiny / "val2017").glob("*.jpg"))
    imlist, qimlist, gnd = [], [], []

    def add(name, img=None, copy_of=None):
        if copy_of is not None:
            shutil.copy(copy_of, jpg / f"{name}.jpg")
        else:
            img.save(jpg / f"{name}.jpg", quality=90)
        imlist.append(name)
        return len(imlist) - 1

    for i, path in enumerate(src[:4]):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        qimlist.append(f"query_{i}")
        shutil.copy(path, jpg / f"query_{i}.jpg")
        easy = [add(f"copy_{i}", copy_of=path)]
        hard = [add(f"small_{i}", img.resize((w * 3 // 4, h * 3 // 4), Image.BICUBIC))]
        junk = [add(f"flip_{i}", img.transpose(Image.FLIP_LEFT_RIGHT))]
        bbx = [0, 0, w, h]
        if i == 3:
            hard.append(add(f"bright_{i}", ImageEnhance.Brightness(img).enhance(1.3)))
            bbx = [w / 4, h / 4, 3 * w / 4, 3 * h / 4]
        gnd.append({"easy": np.array(easy), "hard": np.array(hard), "junk": np.array(junk),
                    "bbx": np.array(bbx, np.float64)})
    for path in src[4:20]:
        add(f"other_{path.stem}", copy_of=path)
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=3)
    torch.manual_seed(0)
    backbone = root / "vit-ti-2blocks-64.safetensors"
    export_backbone(OdisViT("vit_tiny_patch16_224", img_size=64, depth=2), backbone)
    return root, backbone


def _invoke(args):
    return CliRunner().invoke(app, ["eval", "retrieval", *map(str, args)])


def test_cli_retrieval_on_real_images(revisited, tmp_path):
    root, backbone = revisited
    base = ["--backbone", backbone, "--dataset", "roxford5k", "--root", root, "--imsize", 64, "--workers", 0]
    r = _invoke([*base, "--out", tmp_path / "crop.json"])
    assert r.exit_code == 0, r.output
    assert "Medium mAP" in r.output and "Hard mP@10" in r.output and f"wrote {tmp_path / 'crop.json'}" in r.output
    res = json.loads((tmp_path / "crop.json").read_text())
    assert res["protocol"] == "retrieval" and res["n_db"] == 29 and res["n_queries"] == 4 and res["query_crop"]
    for p in ("medium", "hard"):
        assert set(res["results"][p]) == {"mAP", "mP@1", "mP@5", "mP@10", "queries"}
        assert all(0 <= v <= 100 for k, v in res["results"][p].items() if k != "queries")
        # the exact and the rescaled copy of a whole-image query rank before every other image (the mirrored
        # copy, junk, is taken out): even a random backbone gives them cosine ~ 1
        assert res["per_query_ap"][p][:3] == pytest.approx([100, 100, 100]), res["per_query_ap"]

    r = _invoke([*base, "--no-query-crop", "--multiscale", "--out", tmp_path / "ms.json",
                 "--compare", tmp_path / "crop.json"])
    assert r.exit_code == 0, r.output
    assert "crop.json: vit-ti-2blocks-64.safetensors" in r.output and "diff" in r.output
    ms = json.loads((tmp_path / "ms.json").read_text())
    assert ms["multiscale"] and not ms["query_crop"]
    # whole, query 3 is its own copy: copy and 3/4-size copy first, the brightened one anywhere after
    assert ms["per_query_ap"]["medium"][3] >= 100 * 2 / 3

    # a converted JSON ground truth gives the same numbers; --max-db / --max-queries take the first N
    gnd_to_json(root / "roxford5k" / "gnd_roxford5k.pkl", tmp_path / "gnd.json")
    r = _invoke([*base, "--gnd", tmp_path / "gnd.json", "--max-db", 9, "--max-queries", 3,
                 "--out", tmp_path / "small.json"])
    assert r.exit_code == 0, r.output
    small = json.loads((tmp_path / "small.json").read_text())
    assert small["n_db"] == 9 and small["n_queries"] == 3 and small["results"]["medium"]["mAP"] == 100


def test_cli_retrieval_refuses_bad_inputs(revisited, tmp_path):
    root, backbone = revisited
    base = ["--backbone", backbone, "--dataset", "roxford5k", "--imsize", 64, "--workers", 0]
    r = _invoke([*base, "--root", tmp_path])
    assert r.exit_code == 2 and "ground truth not found" in r.output and "gnd_roxford5k.pkl" in r.output

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"imlist": _RunsACommand(os.system, f"touch {marker}")}))
    r = _invoke([*base, "--root", root, "--gnd", evil])
    assert r.exit_code == 2 and "refused to unpickle the global" in r.output and not marker.exists()

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"imlist": ["copy_0", "nowhere"], "qimlist": ["query_0"],
                                   "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [0, 0, 5, 5]}]}))
    r = _invoke([*base, "--root", root, "--gnd", missing])
    assert r.exit_code == 2 and "1 of the 2 database images listed by" in r.output and "nowhere.jpg" in r.output

    r = _invoke([*base, "--root", root, "--dataset", "oxford5k"])
    assert r.exit_code == 2 and "--dataset must be one of roxford5k, rparis6k" in r.output
