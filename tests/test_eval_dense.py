"""Hummingbird dense NN retrieval on real COCO masks: an oracle feature scores mIoU ~ 1, random features low."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from odis.eval.dense import (confusion, dense_nn_from_features, memory_ranking, miou, patch_histograms,
                             subsample)
from odis.eval.segdata import IGNORE, coco_semantic

S = 24  # masks resized to S x S; the oracle's "patches" are pixels so the oracle can be exact


def small_masks(ds, n=None):
    out = []
    for i in range(len(ds) if n is None else n):
        m = torch.from_numpy(ds[i][2])[None, None].float()
        out.append(F.interpolate(m, size=(S, S), mode="nearest")[0, 0].long())
    return torch.stack(out)


def test_coco_semantic_masks(coco_tiny):
    ds = coco_semantic(coco_tiny / "annotations" / "instances_val2017.json", coco_tiny / "val2017")
    assert len(ds) == 80 and ds.num_classes == 81 and ds.class_names[1] == "person"
    image_id, img, mask = ds[0]
    assert mask.shape == (img.height, img.width) and image_id.isdigit() and len(image_id) == 12
    labels = set(np.unique(mask).tolist())
    assert 0 in labels and len(labels - {0, IGNORE}) >= 1 and max(labels - {IGNORE}) <= 80


def test_dense_nn_oracle_and_random(coco_tiny):
    train = coco_semantic(coco_tiny / "annotations" / "instances_train2017.json", coco_tiny / "train2017")
    val = coco_semantic(coco_tiny / "annotations" / "instances_val2017.json", coco_tiny / "val2017")
    c = train.num_classes
    tm, vm = small_masks(train), small_masks(val, 6)
    th = patch_histograms(tm, (S, S), c)
    vh = patch_histograms(vm, (S, S), c)
    # oracle: each patch's feature is the one-hot of its true label
    res = dense_nn_from_features(th, th, vh, vm, (S, S), c, factors=(1, 8))
    assert res[0]["mIoU"] > 99.0, res[0]["mIoU"]
    assert res[1]["memory_size"] < res[0]["memory_size"] / 7
    assert res[1]["mIoU"] > 90.0
    g = torch.Generator().manual_seed(0)
    rand = dense_nn_from_features(torch.randn(*th.shape[:2], 16, generator=g), th,
                                  torch.randn(*vh.shape[:2], 16, generator=g), vm, (S, S), c, factors=(1,))
    assert rand[0]["mIoU"] < 20.0, rand[0]["mIoU"]


def test_patch_histograms_and_sampling():
    m = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, IGNORE], [3, 3, IGNORE, IGNORE], [3, 3, IGNORE, IGNORE]]])
    h = patch_histograms(m, (2, 2), 4)
    assert torch.allclose(h[0, 0], torch.tensor([0.75, 0, 0.25, 0]))
    assert torch.allclose(h[0, 1], torch.tensor([0, 1.0, 0, 0]))
    assert torch.allclose(h[0, 3], torch.zeros(4))  # all ignored: no label
    order = memory_ranking(h, torch.Generator().manual_seed(0))
    assert order[0, -1] == 3  # unlabelled patch ranks last
    mem = subsample(torch.randn(1, 4, 5), h, order, 1)
    assert mem.feats.shape == (3, 5) and torch.allclose(mem.feats.norm(dim=1), torch.ones(3))


def test_miou_counts():
    t = torch.tensor([0, 0, 1, 1, IGNORE])
    p = torch.tensor([0, 1, 1, 1, 0])
    m, ious = miou(confusion(p, t, 3))
    assert ious[0] == 0.5 and abs(ious[1] - 2 / 3) < 1e-9 and ious[2] is None
    assert abs(m - (0.5 + 2 / 3) / 2) < 1e-9
