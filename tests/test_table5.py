"""Table 5's switches of the recipe: masked attention for local crops (MALC, `model.local_obj_attention`), patch
masking for local crops (PMLC, `data.local_block_masking`) and the auxiliary image-level term (L_i,
`loss.lambda_img`). Each changes what it names and nothing else; off (the final recipe) the views and the step are
today's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from odis.boxes import box_to_patch_mask
from odis.distill import Distiller, Views
from odis.trainer.checkpoint import config_changes
from odis.trainer.config import ConfigError, to_dict
from odis.trainer.recipes import load_config
from odis.views import ViewMaker

torch.set_num_threads(2)
B, L = 4, 3
IMAGE = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
SMALL_BOX = np.array([[8.0, 8.0, 40.0, 36.0]])


def _views_of(vm: ViewMaker, seed: int = 0, boxes=SMALL_BOX) -> dict:
    return vm(IMAGE, boxes, np.random.default_rng(seed))


@pytest.mark.parametrize("switch", [dict(local_block_masking=True), dict(local_obj_masks=True),
                                    dict(local_block_masking=True, local_obj_masks=True)])
def test_a_switch_adds_its_masks_and_leaves_every_other_view_as_it_was(switch):
    base = ViewMaker(global_size=64, local_size=32, n_local=L, patch_size=8)
    on = ViewMaker(global_size=64, local_size=32, n_local=L, patch_size=8, **switch)
    for seed in range(5):
        a, b = _views_of(base, seed), _views_of(on, seed)
        for name in ("global", "local", "obj_mask", "obj_valid", "mim_mask", "obj_box"):
            assert np.array_equal(a[name], b[name]), name
        assert ("local_mim_mask" in b) == bool(switch.get("local_block_masking"))
        assert ("local_obj_mask" in b) == bool(switch.get("local_obj_masks"))
        assert not {"local_mim_mask", "local_obj_mask", "local_obj_hit"} & set(a)


def test_malc_masks_each_local_view_to_the_box_carried_into_it():
    vm = ViewMaker(global_size=64, local_size=32, n_local=8, patch_size=8, local_obj_masks=True)
    hits = misses = 0
    for seed in range(20):
        v = _views_of(vm, seed)
        assert v["local_obj_mask"].shape == (8, 4, 4) and v["local_obj_hit"].shape == (8,)
        for crop, mask, hit in zip(v["local_crops"], v["local_obj_mask"], v["local_obj_hit"]):
            carried = box_to_patch_mask(crop.apply(SMALL_BOX[0]), 32, 32, 8)
            assert hit == carried.any()
            assert np.array_equal(mask, carried if hit else np.ones_like(mask))  # a miss: an unmasked row
            hits, misses = hits + hit, misses + (not hit)
    assert hits and misses  # the small box is inside some local crops and outside others
    whole = _views_of(vm, 0, boxes=np.zeros((0, 4)))  # no box: the whole image is the object
    assert whole["local_obj_hit"].all() and whole["local_obj_mask"].all()


def test_the_switches_belong_to_their_methods():
    assert "local_obj_mask" not in _views_of(ViewMaker(n_local=2, patch_size=16, method="ibot",
                                                       local_obj_masks=True))
    assert "local_mim_mask" not in _views_of(ViewMaker(n_local=2, patch_size=16, method="dino",
                                                       local_block_masking=True))
    with pytest.raises(ConfigError, match="model.local_obj_attention"):
        load_config(None, ["method=ibot", "model.local_obj_attention=true"])
    with pytest.raises(ConfigError, match="data.local_block_masking"):
        load_config(None, ["method=dino", "data.local_block_masking=true"])


def test_the_switches_are_recorded_and_a_resume_may_not_change_them():
    off, on = load_config(None, []), load_config(None, ["model.local_obj_attention=true",
                                                        "data.local_block_masking=true", "loss.lambda_img=0.5"])
    assert off.model.local_obj_attention is False and off.data.local_block_masking is False
    assert off.loss.lambda_img == 0.0
    assert config_changes(to_dict(off), to_dict(on)) == ["data.local_block_masking: False -> True",
                                                          "loss.lambda_img: 0.0 -> 0.5",
                                                          "model.local_obj_attention: False -> True"]


# ---- the step ---------------------------------------------------------------------------------------------------

def _distiller(method="odis"):
    torch.manual_seed(0)
    return Distiller(method, "vit_tiny_patch16_224", 32, patch_size=8, out_dim=64, hidden_dim=32,
                     bottleneck_dim=16, drop_path_rate=0.0)


def _views(seed=0, **local):
    g = torch.Generator().manual_seed(seed)
    return Views(torch.randn(2 * B, 3, 32, 32, generator=g), torch.randn(L * B, 3, 16, 16, generator=g),
                 torch.rand(2, B, 4, 4, generator=g) > 0.3, torch.ones(2, B, dtype=torch.bool),
                 torch.rand(2, B, 4, 4, generator=g) > 0.5, **local)


def _local_masks(p=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, B, 2, 2, generator=g) < p


def test_malc_masks_the_students_local_obj_rows_only():
    base = _distiller()(_views(), 0.04)  # a fresh distiller per step: a step moves the centers
    ones = _distiller()(_views(local_obj_mask=torch.ones(L, B, 2, 2, dtype=torch.bool)), 0.04)
    torch.testing.assert_close(ones["loss"], base["loss"], rtol=1e-5, atol=1e-6)  # all True: an unmasked row
    part = _local_masks(0.4)
    part[..., 0, 0] = True  # never an empty mask
    masked = _distiller()(_views(local_obj_mask=part), 0.04)
    assert not torch.isclose(masked["loss_obj"], base["loss_obj"])
    torch.testing.assert_close(masked["loss_patch"], base["loss_patch"])  # the patch task is untouched


def test_pmlc_adds_the_local_views_patch_loss_against_the_teachers_unmasked_locals(monkeypatch):
    from odis.model import OdisViT

    base = _distiller("ibot")(_views(), 0.04)  # a fresh distiller per step: a step moves the centers
    none = _distiller("ibot")(_views(local_mim_mask=torch.zeros(L, B, 2, 2, dtype=torch.bool)), 0.04)
    # no local patch masked: every local view's term is 0, weighted as one of the 2 + L views
    torch.testing.assert_close(none["loss_patch"], base["loss_patch"] * 2 / (2 + L))
    torch.testing.assert_close(none["loss_obj"], base["loss_obj"])
    calls, forward = [], OdisViT.forward

    def spy(self, x, obj_mask=None, patch_mask=None, **kw):
        calls.append(("teacher" if self is d.teacher.backbone else "student", x.shape[-1], patch_mask))
        return forward(self, x, obj_mask=obj_mask, patch_mask=patch_mask, **kw)

    d = _distiller("ibot")
    monkeypatch.setattr(OdisViT, "forward", spy)
    mim = _local_masks(0.5)
    out = d(_views(local_mim_mask=mim), 0.04)
    seen = [(who, size, m is not None) for who, size, m in calls]
    assert seen == [("teacher", 32, False), ("student", 32, True), ("student", 16, True), ("teacher", 16, False)]
    assert torch.equal(calls[2][2], mim.flatten(0, 1))
    assert not torch.isclose(out["loss_patch"], base["loss_patch"])
    out["loss"].backward()
    assert d.student.backbone.mask_token.grad.abs().sum() > 0


def _img_distiller(attn_impl="split", lambda_img=0.5):
    torch.manual_seed(0)
    return Distiller("odis", "vit_tiny_patch16_224", 32, patch_size=8, out_dim=64, hidden_dim=32,
                     bottleneck_dim=16, drop_path_rate=0.0, attn_impl=attn_impl, lambda_img=lambda_img)


def test_l_i_adds_an_image_token_the_obj_row_never_sees():
    from odis.model import obj_attn_mask

    off, on = _distiller(), _img_distiller()
    assert set(off.state_dict()) == set(on.state_dict()) - {"student.backbone.img_token", "teacher.backbone.img_token",
                                                            "img_centers.obj"}
    mask = obj_attn_mask(torch.ones(1, 2, 2, dtype=torch.bool), num_prefix=1, hidden=1)[0, 0]
    assert mask[0].tolist() == [True, False, True, True, True, True] and mask[1:].all()  # OBJ row: not the image
    out = on(_views(), 0.04)
    assert torch.isfinite(out["loss_img"]) and "loss_img" not in off(_views(), 0.04)
    out["loss"].backward()
    assert on.student.backbone.img_token.grad.abs().sum() > 0 and on.teacher.backbone.img_token.grad is None
    assert on.img_centers.obj.abs().sum() > 0  # its own center moved
    # both attention implementations give the same step with the image token
    torch.testing.assert_close(_img_distiller("mask")(_views(), 0.04)["loss"],
                               _img_distiller("split")(_views(), 0.04)["loss"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="loss.lambda_img"):
        load_config(None, ["method=ibot", "loss.lambda_img=0.5"])


def test_the_switches_train_from_the_cli(tiny_imagenet, tmp_path):
    """A tiny CPU recipe with MALC, PMLC and L_i on: it trains, exports a plain timm backbone, records the
    switches, logs L_i, and counts the local crops whose OBJ row stayed unmasked (they missed the box)."""
    from test_train import SMALL, run

    shards = _shards(tiny_imagenet, tmp_path)
    run(["train", "--shards", str(shards), "--out", str(tmp_path / "r"), "--quiet", *SMALL, "max_steps=2",
         "model.local_obj_attention=true", "data.local_block_masking=true", "loss.lambda_img=0.5"])
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "local_obj_attention: true" in saved and "local_block_masking: true" in saved
    assert "lambda_img: 0.5" in saved
    header, *rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("loss_img")
    assert rows and all(float(r.split(",")[col]) > 0 for r in rows)
    from odis.model import load_backbone

    assert load_backbone(tmp_path / "r" / "backbone.safetensors").img_token is None  # a training aid
    data = json.loads((tmp_path / "r" / "data.json").read_text())
    assert "local_obj_unmasked" in json.dumps(data)


def _shards(tiny_imagenet, tmp_path):
    import os
    import shutil

    from test_train import run

    root = tmp_path / "tin"
    wnid = sorted(os.listdir(tiny_imagenet / "train"))[0]
    shutil.copytree(tiny_imagenet / "train" / wnid, root / "train" / wnid)
    (root / "wnids.txt").write_text(wnid + "\n")
    run(["import-boxes", "--format", "tiny-imagenet", "--images", str(root), "--out", str(root / "gt.parquet")])
    run(["shard", "--images", str(root / "train"), "--out", str(tmp_path / "sh"), "--labels", "folder",
         "--manifest", str(root / "gt.parquet"), "--max-samples", "40"])
    return tmp_path / "sh"
