"""What the [OBJ] token sees, view by view (issue: ODIS without a box at inference trails iBOT): the globals masked
to the sampled box, the locals unmasked, an image without a box or with the whole-image box unmasked everywhere,
and evaluation without a box on the locals' attention path. And the knob that puts whole-image boxes into
training (`data.whole_image_box_prob`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from odis.distill import Distiller, Views
from odis.model import OdisViT
from odis.views import ViewMaker

torch.set_num_threads(2)
IMAGE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
BOXES = np.array([[4.0, 4.0, 28.0, 30.0], [36.0, 30.0, 60.0, 60.0]])


def _vm(**kw):
    return ViewMaker(global_size=32, local_size=16, n_local=2, patch_size=8, **kw)


def test_globals_are_masked_to_a_box_and_an_image_without_one_is_unmasked():
    v = _vm()(IMAGE, BOXES, np.random.default_rng(0))
    assert v["obj_valid"].all() and not v["obj_mask"].all(axis=(1, 2)).any()  # a box, not the whole view
    none = _vm()(IMAGE, np.zeros((0, 4)), np.random.default_rng(0))
    assert none["obj_mask"].all()  # no box: the whole image, every patch in the OBJ row


def test_whole_image_boxes_enter_training_at_the_asked_share_and_only_then():
    base, zero = _vm(), _vm(whole_image_box_prob=0.0)
    for seed in range(3):  # 0: the stream of a run without the knob, draw for draw
        a, b = base(IMAGE, BOXES, np.random.default_rng(seed)), zero(IMAGE, BOXES, np.random.default_rng(seed))
        assert all(np.array_equal(a[k], b[k]) for k in ("global", "local", "obj_mask", "mim_mask"))
    always = _vm(whole_image_box_prob=1.0)(IMAGE, BOXES, np.random.default_rng(0))
    assert always["obj_mask"].all() and always["obj_valid"].all()
    half = _vm(whole_image_box_prob=0.5)
    share = np.mean([half(IMAGE, BOXES, np.random.default_rng(s))["obj_mask"].all() for s in range(200)])
    assert 0.35 < share < 0.65
    with pytest.raises(ValueError, match="whole_image_box_prob"):
        _vm(whole_image_box_prob=1.5)


def test_evaluation_without_a_box_runs_the_local_views_attention_path(monkeypatch):
    """The student's local views and the evaluators' `none` mode call the backbone alike (no OBJ mask), so the
    token k-NN reads without a box is the one trained on the local views; with the whole-image mask it is the same
    token (the masked row then attends everywhere)."""
    from odis.eval.features import extract_features

    calls, forward = [], OdisViT.forward

    def spy(self, x, obj_mask=None, patch_mask=None, **kw):
        calls.append((x.shape[-1], obj_mask is None, patch_mask is None))
        return forward(self, x, obj_mask=obj_mask, patch_mask=patch_mask, **kw)

    monkeypatch.setattr(OdisViT, "forward", spy)
    torch.manual_seed(0)
    d = Distiller("odis", "vit_tiny_patch16_224", 32, patch_size=8, out_dim=32, hidden_dim=32, bottleneck_dim=16,
                  drop_path_rate=0.0)
    g = torch.Generator().manual_seed(0)
    d(Views(torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 16, 16, generator=g),
            torch.rand(2, 4, 4, 4, generator=g) > 0.5, torch.ones(2, 4, dtype=torch.bool),
            torch.zeros(2, 4, 4, 4, dtype=torch.bool)), 0.04)
    local_call = calls[2]
    assert local_call == (16, True, True)
    x = torch.randn(3, 3, 16, 16, generator=g)
    batch = {"errors": [], "lost": 0, "n": 3, "image": x, "obj_mask": None, "label": torch.zeros(3, dtype=torch.long),
             "image_id": ["a", "b", "c"], "fallback": [None] * 3}
    calls.clear()
    f = extract_features(d.student.backbone, [batch], progress=False)
    assert calls == [(16, True, True)]
    d.student.backbone.eval()
    with torch.no_grad():
        whole = d.student.backbone(x, obj_mask=torch.ones(3, 2, 2, dtype=torch.bool))[0]
    torch.testing.assert_close(f.feats, whole, rtol=1e-5, atol=1e-5)
