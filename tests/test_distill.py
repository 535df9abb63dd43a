"""The meta-architecture: what each network sees, where gradients go, EMA, freezing, schedules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from odis.distill import Distiller, Views, clip_gradients
from odis import schedules

torch.set_num_threads(2)
B = 4


def _views(seed=0, n_local=2, valid=None):
    g = torch.Generator().manual_seed(seed)
    obj = torch.rand(2, B, 4, 4, generator=g) > 0.3
    return Views(torch.randn(2 * B, 3, 32, 32, generator=g), torch.randn(n_local * B, 3, 16, 16, generator=g),
                 obj, torch.ones(2, B, dtype=torch.bool) if valid is None else valid,
                 torch.rand(2, B, 4, 4, generator=g) > 0.5)


def _distiller(method, **kw):
    torch.manual_seed(0)
    return Distiller(method, "vit_tiny_patch16_224", 32, patch_size=8, out_dim=64, hidden_dim=32,
                     bottleneck_dim=16, **kw)


def test_the_patch_targets_take_their_own_teacher_temperature():
    """iBOT's separate patch temperature (--teacher_patch_temp): it sets the patch targets only."""
    v = _views()
    base, own, both = (_distiller("ibot", drop_path_rate=0.0)(v, *temps)
                       for temps in ((0.04,), (0.04, 0.07), (0.07,)))
    torch.testing.assert_close(own["loss_obj"], base["loss_obj"])
    torch.testing.assert_close(own["loss_patch"], both["loss_patch"])
    assert not torch.allclose(own["loss_patch"], base["loss_patch"])


@pytest.mark.parametrize("method", ["odis", "ibot", "dino"])
def test_gradients_reach_only_the_student(method):
    d = _distiller(method)
    out = d(_views(), teacher_temp=0.04)
    stats = {"t_entropy", "t_batch_entropy"}
    assert set(out) == stats | ({"loss", "loss_obj", "loss_patch"} if method != "dino" else {"loss", "loss_obj"})
    out["loss"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in d.student.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["odis", "ibot", "dino"])
def test_each_network_sees_its_masks(method, monkeypatch):
    """Which backbone call gets which mask (ODIS §3, iBOT main_ibot.py): the teacher sees the globals unmasked
    (odis: OBJ masked to the box); the student sees the globals with the MIM masks (odis: and the box) and the
    locals plain. And the EMA centers move to 0.1 x the batch mean of the teacher's OBJ logits."""
    from odis.model import OdisViT

    d, v = _distiller(method), _views()
    calls, forward = [], OdisViT.forward

    def spy(self, x, obj_mask=None, patch_mask=None):
        out = forward(self, x, obj_mask=obj_mask, patch_mask=patch_mask)
        who = "teacher" if self is d.teacher.backbone else "student"
        calls.append((who, x.shape[-1], obj_mask, patch_mask, out[0].detach()))
        return out

    monkeypatch.setattr(OdisViT, "forward", spy)
    d(v, teacher_temp=0.04)
    seen = [(who, size) for who, size, *_ in calls]
    assert seen == [("teacher", 32), ("student", 32), ("student", 16)]
    (_, _, t_obj, t_mim, t_tok), (_, _, s_obj, s_mim, _), (_, _, l_obj, l_mim, _) = calls
    box, mim = v.obj_mask.flatten(0, 1), v.mim_mask.flatten(0, 1)
    assert t_mim is None and l_obj is None and l_mim is None
    if method == "odis":
        assert torch.equal(t_obj, box) and torch.equal(s_obj, box)
    else:
        assert t_obj is None and s_obj is None
    if method == "dino":
        assert s_mim is None
    else:
        assert torch.equal(s_mim, mim)
    with torch.no_grad():
        t_logits = d.teacher.head(t_tok)
    torch.testing.assert_close(d.centers.obj, 0.1 * t_logits.mean(0, keepdim=True))


def test_methods_differ_only_where_they_should():
    v = _views()
    o, i = _distiller("odis"), _distiller("ibot")
    lo, li = o(v, 0.04), i(v, 0.04)
    assert not torch.isclose(lo["loss_obj"], li["loss_obj"])  # the OBJ row is masked
    torch.testing.assert_close(lo["loss_patch"], li["loss_patch"], rtol=0.2, atol=0.5)  # same MIM task, shifted tokens
    v.obj_mask[:] = True  # whole-view boxes: ODIS == iBOT exactly
    torch.testing.assert_close(_distiller("odis")(v, 0.04)["loss"], _distiller("ibot")(v, 0.04)["loss"])


def test_empty_box_sample_is_excluded_and_finite():
    valid = torch.ones(2, B, dtype=torch.bool)
    valid[:, 1] = False
    v = _views(valid=valid)
    v.obj_mask[:, 1] = False  # the fallback view: no box
    d = _distiller("odis")
    out = d(v, 0.04)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in d.student.parameters() if p.grad is not None)


def test_ema_update_is_exact():
    d = _distiller("odis")
    with torch.no_grad():
        for p in d.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = [p.clone() for p in d.teacher.parameters()]
    s = [p.clone() for p in d.student.parameters()]
    d.update_teacher(0.9)
    for t0, s0, t1 in zip(before_t, s, d.teacher.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + (1 - 0.9) * s0, rtol=1e-6, atol=1e-7)  # float32 rounding only


def test_frozen_last_layer_gets_no_update_and_others_do():
    d = _distiller("odis")
    opt = torch.optim.AdamW(d.param_groups(), lr=1e-2)
    last = d.student.head.last_layer_v.clone()
    first = d.student.head.mlp[0].weight.clone()
    d(_views(), 0.04)["loss"].backward()
    d.cancel_last_layer_grads()
    opt.step()
    assert torch.equal(d.student.head.last_layer_v, last)
    assert not torch.equal(d.student.head.mlp[0].weight, first)


def test_param_groups_no_decay_on_bias_and_norm():
    d = _distiller("ibot")
    decay, no_decay = d.param_groups()
    names = {id(p): n for n, p in d.student.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])


def test_clip_gradients_per_tensor():
    lin = torch.nn.Linear(3, 3)
    lin.weight.grad = torch.full((3, 3), 10.0)
    lin.bias.grad = torch.full((3,), 0.01)
    clip_gradients(lin, 3.0)
    assert abs(lin.weight.grad.norm().item() - 3.0) < 1e-4
    torch.testing.assert_close(lin.bias.grad, torch.full((3,), 0.01))


def test_schedules_endpoints():
    assert schedules.teacher_temp(0, 10, 0.04, 0.07, 30) == 0.04
    assert schedules.teacher_temp(29 * 10, 10, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert schedules.teacher_temp(500, 10, 0.04, 0.07, 30) == 0.07
    assert schedules.lr(0, 10, 100, 5e-4, 1e-6, 10, 512) == 0.0
    assert schedules.lr(100, 10, 100, 5e-4, 1e-6, 10, 512) == pytest.approx(1e-3)
    assert schedules.lr(999, 10, 100, 5e-4, 1e-6, 10, 512) == pytest.approx(1e-6, abs=1e-8)
    assert schedules.teacher_momentum(0, 100, 0.996) == 0.996
    assert schedules.teacher_momentum(100, 100, 0.996) == 1.0


def _ibot_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """iBOT's utils.cosine_scheduler, transcribed."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else []
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@settings(max_examples=60, deadline=None)
@given(epochs=st.integers(2, 12), spe=st.integers(1, 9), warmup=st.integers(0, 2), batch=st.sampled_from([64, 1024]))
def test_schedules_equal_ibots_cosine_scheduler_at_every_step(epochs, spe, warmup, batch):
    peak = 5e-4 * batch / 256
    lrs = _ibot_cosine_scheduler(peak, 1e-6, epochs, spe, warmup_epochs=warmup)
    wds = _ibot_cosine_scheduler(0.04, 0.4, epochs, spe)
    moms = _ibot_cosine_scheduler(0.996, 1, epochs, spe)
    total = epochs * spe
    for it in range(total):
        assert schedules.lr(it, spe, epochs, 5e-4, 1e-6, warmup, batch) == pytest.approx(lrs[it], rel=1e-12)
        assert schedules.weight_decay(it, total, 0.04, 0.4) == pytest.approx(wds[it], rel=1e-12)
        assert schedules.teacher_momentum(it, total, 0.996) == pytest.approx(moms[it], rel=1e-12)


@pytest.mark.parametrize("method", ["odis", "ibot", "dino"])
def test_sinkhorn_and_koleo_options(method):
    """The small-data options: the loss is the sum of its parts with KoLeo weighted in; the Sinkhorn teacher
    changes L_OBJ (not the student side) and everything stays finite with gradients only in the student."""
    v = _views()
    base = _distiller(method)(v, 0.04)
    d = _distiller(method, centering="sinkhorn", lambda_koleo=0.3)
    out = d(v, 0.04)
    parts = out["loss_obj"] + out.get("loss_patch", 0.0) + 0.3 * out["loss_koleo"]
    torch.testing.assert_close(out["loss"], parts)
    assert not torch.isclose(out["loss_obj"], base["loss_obj"])
    out["loss"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(torch.isfinite(p.grad).all() for p in d.student.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="centering"):
        _distiller(method, centering="mean")


def test_koleo_leaves_out_objects_missing_from_a_view(monkeypatch):
    """An OBJ token whose box is empty sees only itself: KoLeo spreads only the valid samples of each view."""
    import odis.distill as distill

    rows = []
    real = distill.koleo
    monkeypatch.setattr(distill, "koleo", lambda x: rows.append(x.shape[0]) or real(x))
    valid = torch.ones(2, B, dtype=torch.bool)
    valid[0, 1] = valid[1, 2] = valid[1, 3] = False
    v = _views(valid=valid)
    v.obj_mask[~valid] = False
    out = _distiller("odis", lambda_koleo=0.1)(v, 0.04)
    assert rows == [B - 1, B - 2] and torch.isfinite(out["loss_koleo"])


@pytest.mark.parametrize("attn_impl", ["split", "mask"])  # the eager default; the GPU recipes' compiled choice
def test_compiled_backbones_give_the_eager_loss_and_gradients(compiled_graphs, attn_impl):
    """compile_backbones (the trainer's model.compile=true) changes the speed, not the numbers: the same loss and
    the same gradient in every student parameter, so the compiled backward is checked, not only the forward."""
    eager, compiled = (_distiller("odis", depth=2, drop_path_rate=0.0, attn_impl=attn_impl) for _ in range(2))
    compiled.compile_backbones()
    views = _views()
    losses = [d(views, teacher_temp=0.04)["loss"] for d in (eager, compiled)]
    assert compiled_graphs() >= 3  # compiled for real: teacher globals, student globals and locals
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [{n: p.grad for n, p in d.student.named_parameters() if p.requires_grad} for d in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():  # per tensor: float32 sums in another order differ by ~1e-6 of the largest
        err = (grads[1][name] - g).abs().max()
        assert err <= 1e-4 * g.abs().max() + 1e-7, (name, float(err))
