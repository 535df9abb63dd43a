"""Linear segmentation: the head on separable synthetic features reaches ~100 mIoU; the whole command on real
COCO images and masks trains a head that beats a head of zeros on the images it trained on."""
from __future__ import annotations

import json

import pytest
import torch

from odis.eval.linear_seg import (
    AugmentedSeg,
    crop_params,
    head_confusion,
    new_head,
    scores,
    train_head,
)
from odis.eval.segdata import IGNORE

C, D, G, M = 5, 16, 8, 16  # classes, feature dim, patch grid, label grid (2 pixels per patch)


def synthetic(n: int, seed: int):
    """Blocky label maps on a G x G patch grid (some patches ignored) and features = 3 * one-hot(label) + noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n, G // 2, G // 2), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    feats = torch.randn(n, D, G, G, generator=g) * 0.3
    feats[:, :C] += 3 * torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()
    masks = labels.repeat_interleave(M // G, 1).repeat_interleave(M // G, 2)
    masks[:, :2, :] = IGNORE  # an ignored band: its (learnable) features must not count
    return feats, masks


def batches_of(feats, masks, batch=8):
    return lambda epoch: [(feats[i:i + batch], masks[i:i + batch]) for i in range(0, len(feats), batch)]


def test_head_learns_separable_features_and_is_deterministic():
    tf, tm = synthetic(64, 0)
    vf, vm = synthetic(16, 1)
    heads, losses = [], []
    for _ in range(2):
        head = new_head(D, C, seed=3)
        losses.append(train_head(head, batches_of(tf, tm), epochs=10, lr=0.1, progress=False))
        heads.append(head)
    assert losses[0][-1] < 0.2 * losses[0][0], losses[0]
    assert torch.equal(heads[0].weight, heads[1].weight) and losses[0] == losses[1]  # CPU: bit for bit
    res = scores(head_confusion(heads[0], batches_of(vf, vm)(0), C))
    assert res["mIoU"] > 95.0 and res["pixels"] == int((vm != IGNORE).sum()), res
    untrained = scores(head_confusion(new_head(D, C, seed=3), batches_of(vf, vm)(0), C))
    assert untrained["mIoU"] < 50.0, untrained


def test_crop_params_and_views_are_seeded():
    for w, h in [(640, 480), (50, 300), (300, 50), (7, 7)]:
        top, left, ch, cw = crop_params(w, h, torch.Generator().manual_seed(0))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0

    class Tiny:  # an image whose mask is its left/right half: flips and crops must move image and mask together
        num_classes = 2

        def __len__(self):
            return 3

        def __getitem__(self, i):
            import numpy as np
            from PIL import Image

            mask = np.zeros((40, 60), np.int64)
            mask[:, 30:] = 1
            img = np.zeros((40, 60, 3), np.uint8)
            img[:, 30:] = 255
            return str(i), Image.fromarray(img), mask

    views = AugmentedSeg(Tiny(), size=32, mask_size=16, seed=5)
    for k in range(6):
        x, m = views[k]
        assert x.shape == (3, 32, 32) and m.shape == (16, 16) and m.dtype == torch.uint8
        bright = torch.nn.functional.interpolate(x[None, :1], size=(16, 16), mode="area")[0, 0] > 0
        assert (bright == (m == 1)).float().mean() > 0.9
        x2, m2 = views[k]
        assert torch.equal(x, x2) and torch.equal(m, m2)
    assert not torch.equal(views[0][0], views[3][0])  # image 0 in the next epoch: another crop


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from odis.model import OdisViT, export_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("linseg") / "b.safetensors"
    export_backbone(OdisViT("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2), path)
    return path


def test_cli_linear_seg_on_coco_tiny(coco_tiny, tiny_backbone, tmp_path):
    """The real command on real COCO masks with a small random ViT; scored on its own training images, the
    trained head must beat a head of zeros (every pixel background) there."""
    from odis.cli import app
    from typer.testing import CliRunner

    from odis.eval.linear_seg import evaluate_head
    from odis.eval.protocols import open_backbone
    from odis.eval.segdata import open_dataset

    common = ["eval", "linear-seg", "--backbone", str(tiny_backbone), "--dataset", "coco", "--root", str(coco_tiny),
              "--size", "64", "--mask-size", "32", "--batch-size", "4", "--lr", "0.1", "--max-train", "16",
              "--val-split", "train2017", "--max-val", "16"]
    r = CliRunner().invoke(app, [*common, "--epochs", "6", "--workers", "1", "--out", str(tmp_path / "aug.json")])
    assert r.exit_code == 0, r.output
    aug = json.loads((tmp_path / "aug.json").read_text())
    assert aug["protocol"] == "linear-seg" and aug["augment"] and aug["n_train"] == aug["n_val"] == 16
    assert aug["num_classes"] == 81 and len(aug["per_class_iou"]) == 81 and aug["mask_size"] == 32
    assert 0 <= aug["mIoU"] <= 100 and "mIoU" in r.output and "pixel accuracy" in r.output
    assert aug["train_loss"][-1] < aug["train_loss"][0], aug["train_loss"]

    r = CliRunner().invoke(app, [*common, "--epochs", "10", "--no-augment", "--workers", "0",
                                 "--out", str(tmp_path / "cached.json"), "--compare", str(tmp_path / "aug.json")])
    assert r.exit_code == 0, r.output
    cached = json.loads((tmp_path / "cached.json").read_text())
    assert not cached["augment"] and "aug.json" in r.output and "diff" in r.output

    model = open_backbone(tiny_backbone)
    zero = new_head(model.embed_dim, 81)
    torch.nn.init.zeros_(zero.weight), torch.nn.init.zeros_(zero.bias)
    base = evaluate_head(model, zero, open_dataset("coco", coco_tiny, "train2017").subset(16), 64, 32,
                         progress=False)
    assert base["pixels"] == cached["pixels"]  # the same pixels are scored
    assert cached["mIoU"] > base["mIoU"] + 2.0, (cached["mIoU"], base["mIoU"])  # 6.1 vs 2.0 when written

    r = CliRunner().invoke(app, [*common, "--size", "60"])
    assert r.exit_code == 2 and "not a multiple of the patch size" in r.output
    r = CliRunner().invoke(app, [*common[:4], "--dataset", "cityscapes", *common[6:]])
    assert r.exit_code == 2 and "--dataset must be one of coco, voc, ade20k" in r.output
