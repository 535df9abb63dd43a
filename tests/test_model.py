"""Invariants of the [OBJ] masked attention on a real timm ViT (paper §3, issue 4)."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

from hypothesis import given, settings
from hypothesis import strategies as st

from odis.model import OdisViT, attn_bias, check_obj_mask, export_backbone, load_backbone, obj_attn_mask

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return OdisViT("vit_tiny_patch16_224", img_size=64, patch_size=8).eval()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g)


def test_obj_attn_mask_rows():
    om = torch.zeros(2, 2, 2, dtype=torch.bool)
    om[0, 0, 1] = True
    m = obj_attn_mask(om)
    assert m.shape == (2, 1, 5, 5)
    assert m[:, :, 1:].all()  # patch rows: full attention
    assert m[0, 0, 0].tolist() == [True, False, True, False, False]  # OBJ: itself + patch (0,1)
    assert m[1, 0, 0].tolist() == [True, False, False, False, False]  # empty box: OBJ sees only itself


@pytest.mark.parametrize("impl", ["mask", "split"])
def test_full_box_equals_unmasked_vit(vit, images, impl):
    vit.attn_impl = impl
    full = torch.ones(4, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        obj_full, patches_full = vit(images, obj_mask=full)
        cls, patches = vit(images)
        # the same ViT without any mask: plain timm, same weights
        plain = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=0).eval()
        plain.load_state_dict(vit.vit.state_dict())
        ref = plain.forward_features(images)
    torch.testing.assert_close(obj_full, cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(obj_full, ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patches_full, ref[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["mask", "split"])
def test_first_block_obj_ignores_pixels_outside_box(vit, images, impl):
    vit.attn_impl = impl
    box = torch.zeros(4, 8, 8, dtype=torch.bool)
    box[:, 2:5, 3:7] = True  # patches rows 2..4, cols 3..6 -> pixels [16,40) x [24,56)
    changed = images.clone()
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[16:40, 24:56] = False
    changed[:, :, outside] += 3.0
    with torch.no_grad():
        a = next(vit.blocks(vit.embed(images), box))
        b = next(vit.blocks(vit.embed(changed), box))
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-5)  # OBJ unchanged
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-2  # patch tokens changed
    # and without the mask the CLS token does see those pixels
    with torch.no_grad():
        c = next(vit.blocks(vit.embed(images), None))
        d = next(vit.blocks(vit.embed(changed), None))
    assert (c[:, 0] - d[:, 0]).abs().max() > 1e-3


def test_mask_and_split_agree_forward_and_backward(vit, images):
    om = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    om[1] = False
    mim = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.7
    outs, grads = {}, {}
    for impl in ("mask", "split"):
        vit.attn_impl = impl
        vit.zero_grad()
        x = images.clone().requires_grad_(True)
        obj, patches = vit(x, obj_mask=om, patch_mask=mim)
        (obj.square().sum() + patches[:, ::3].sum()).backward()
        outs[impl] = (obj.detach(), patches.detach())
        grads[impl] = [x.grad] + [p.grad.clone() for p in vit.parameters() if p.grad is not None]
    vit.zero_grad()
    for a, b in zip(outs["mask"], outs["split"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(grads["mask"]) == len(grads["split"]) > 100
    for a, b in zip(grads["mask"], grads["split"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_attn_bias_is_the_boolean_mask_in_sdpa(b, n, seed, dtype):
    """The additive bias made once per pass attends exactly where the boolean mask does (any length, any row with
    at least one True, as OBJ always attends itself), and its rows are 16-aligned (SDPA need not pad them)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 1, 1, n, generator=g) < 0.5
    mask[..., 0] = True
    bias = attn_bias(mask, dtype)
    assert bias.dtype == dtype and bias.shape == mask.shape and bias.stride(-2) % 16 == 0
    assert (bias == 0).equal(mask) and torch.isneginf(bias).equal(~mask)
    q, k, v = (torch.randn(b, 2, 1 if i == 0 else n, 8, generator=g).to(dtype) for i in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.allclose(got.float(), want, atol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("impl", ["mask", "split"])
def test_bias_follows_autocast(vit, images, impl, monkeypatch):
    """Under bf16 autocast the mask reaches SDPA as a bf16 bias (the attention's dtype: SDPA would convert it in
    every block otherwise), and the OBJ token still ignores every pixel outside its box, exactly."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **k: seen.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **k))
    vit.attn_impl = impl
    om = torch.zeros(4, 8, 8, dtype=torch.bool)
    om[:, :4, :4] = True  # pixels [0, 32) x [0, 32)
    changed = images.clone()
    changed[:, :, 32:] = torch.randn_like(changed[:, :, 32:])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = next(vit.blocks(vit.embed(images), om))[:, 0]
        b = next(vit.blocks(vit.embed(changed), om))[:, 0]
    assert torch.equal(a, b)
    masks = [m for m in seen if m is not None]
    assert masks and all(m.dtype == torch.bfloat16 for m in masks)


def test_obj_row_backends_restrict_the_obj_row_only(vit, images):
    """`obj_row_backends` picks the kernel of the OBJ row alone (same outputs and gradients on the math kernel);
    a backend this machine lacks fails loudly rather than falling back silently."""
    om = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.4
    vit.attn_impl = "split"
    x1, x2 = images.clone().requires_grad_(), images.clone().requires_grad_()
    a = vit(x1, obj_mask=om)[0]
    a.square().sum().backward()
    vit.obj_row_backends = ("MATH",)
    try:
        b = vit(x2, obj_mask=om)[0]
        b.square().sum().backward()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
        if not torch.cuda.is_available():
            vit.obj_row_backends = ("EFFICIENT_ATTENTION",)
            with pytest.raises(RuntimeError, match="No viable backend"):
                vit(images, obj_mask=om)
    finally:
        vit.obj_row_backends = ()


def test_check_obj_mask_passes_correct_kernels_and_names_wrong_ones(vit, monkeypatch):
    """The check the trainer runs before an odis run: silent on this machine's kernels (float32 and bf16), and it
    tells a kernel that drops the mask, or one that is wrong by itself, from the math backend's result."""
    import contextlib

    import odis.model as model_mod

    for impl in ("mask", "split"):
        vit.attn_impl = impl
        assert check_obj_mask(vit) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert check_obj_mask(vit) is None
    real, on_math = torch.nn.functional.scaled_dot_product_attention, []

    def drops_mask(q, k, v, attn_mask=None, **kw):
        return real(q, k, v, **kw)

    def off_but_on_math(*a, **kw):  # right under the math backend only: masks kept, values scaled
        return real(*a, **kw) * (1.0 if on_math else 1.5)

    @contextlib.contextmanager
    def math_only(backends):
        on_math.append(True)
        yield
        on_math.pop()

    def off_beyond_row_0(q, k, v, **kw):  # right for the OBJ row, wrong for the last patch rows
        out = real(q, k, v, **kw)
        return out if on_math or q.shape[-2] == 1 else torch.cat([out[..., :-3, :], 2 * out[..., -3:, :]], -2)

    monkeypatch.setattr(model_mod, "sdpa_kernel", math_only)
    vit.train()
    try:
        for impl in ("mask", "split"):
            vit.attn_impl = impl
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", drops_mask)
            assert check_obj_mask(vit) == "the OBJ token sees the patches outside its box"
            for wrong in (off_but_on_math, off_beyond_row_0):
                monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", wrong)
                assert check_obj_mask(vit).startswith("the attention differs from the math backend's by"), impl
        assert vit.training  # the caller's mode is kept (the check itself runs in eval: no drop-path)
    finally:
        vit.eval()


@pytest.mark.parametrize("impl", ["mask", "split"])
def test_empty_box_is_finite_forward_and_backward(impl):
    torch.manual_seed(0)
    m = OdisViT("vit_tiny_patch16_224", img_size=32, patch_size=8, attn_impl=impl)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    om = torch.zeros(2, 4, 4, dtype=torch.bool)
    obj, patches = m(x, obj_mask=om, patch_mask=torch.rand(2, 4, 4) > 0.5)
    (obj.sum() + patches.sum()).backward()
    assert torch.isfinite(obj).all() and torch.isfinite(patches).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all()


def _ibot_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """iBOT's VisionTransformer.interpolate_pos_encoding (models/vision_transformer.py), transcribed."""
    import math

    n = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("size", [32, 24, 96])
def test_position_embeddings_of_other_sizes_are_ibots(vit, size):
    """Local crops (and other input sizes) get iBOT's bicubic resize of the position embeddings, not timm's
    antialiased one; the training size gets timm's own embeddings unchanged."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        tokens = vit.vit.patch_embed(x).flatten(1, 2)
        ref = torch.cat([vit.vit.cls_token.expand(2, -1, -1), tokens], 1) + _ibot_interpolate_pos_encoding(
            vit.vit.pos_embed, size, size, 8)
        torch.testing.assert_close(vit.embed(x), ref, rtol=0, atol=1e-6)
        native = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(vit.embed(native), vit.vit._pos_embed(vit.vit.patch_embed(native)))


def test_mask_token_replaces_masked_patches(vit, images):
    mim = torch.zeros(4, 8, 8, dtype=torch.bool)
    mim[:, 0, 0] = True
    with torch.no_grad():
        vit.mask_token.fill_(0.5)
        t = vit.embed(images, mim)
        ref = vit.embed(images)
        vit.mask_token.zero_()
    pos = vit.vit.pos_embed[0, 1]
    torch.testing.assert_close(t[:, 1], (0.5 + pos).expand(4, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t[:, 2:], ref[:, 2:])


def test_obj_token_starts_as_ibots_cls_token():
    """iBOT/DINO draw [CLS] from trunc_normal(std .02); timm's default (std 1e-6) would start [OBJ] at ~zero."""
    torch.manual_seed(0)
    tok = OdisViT("vit_small_patch16_224", img_size=32, depth=1).vit.cls_token.detach()
    assert 0.015 < tok.std().item() < 0.025


def test_export_loads_into_timm_strict_with_identical_features(vit, images, tmp_path):
    path = tmp_path / "backbone.safetensors"
    export_backbone(vit, path)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=0).eval()
    plain.load_state_dict(load_file(str(path)), strict=True)
    again = load_backbone(path)
    assert again.patch_size == 8 and again.arch == "vit_tiny_patch16_224"
    vit.attn_impl = "mask"
    with torch.no_grad():
        ref = vit(images)[0]
        torch.testing.assert_close(plain.forward_features(images)[:, 0], ref)
        torch.testing.assert_close(again(images)[0], ref)


def test_load_backbone_errors_name_the_file(tmp_path):
    bad = tmp_path / "weights.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="weights.pth"):
        load_backbone(bad)
    with pytest.raises(ValueError, match="does not match"):
        load_backbone(bad, arch="vit_tiny_patch16_224")


@pytest.mark.parametrize("content, reason", [
    (bytes(range(256)) * 4, "UnpicklingError: "),  # not a pickle
    (b"", "EOFError: empty or truncated file"),
    (None, "UnpicklingError: Unsupported global.*argparse.Namespace.*state dict alone"),  # a training checkpoint
])
def test_unreadable_weights_are_one_line_errors(tmp_path, content, reason):
    """Junk, an empty file, or a pickle of other objects: a ValueError naming the file, in one line, without
    torch's advice to load with weights_only=False (which would run the file's code)."""
    import argparse

    path = tmp_path / "w.pth"
    if content is None:
        torch.save({"args": argparse.Namespace(lr=1.0), "model": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"w.pth: not a readable backbone.*{reason}") as e:
        load_backbone(path, arch="vit_tiny_patch16_224")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\xff" * 12)
    with pytest.raises(ValueError, match="cut.safetensors: not a readable backbone.*SafetensorError"):
        load_backbone(cut)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth: holds no state dict of tensors"):
        load_backbone(tmp_path / "list.pth", arch="vit_tiny_patch16_224")


def test_obj_attention_respects_box(vit, images):
    om = torch.zeros(4, 8, 8, dtype=torch.bool)
    om[:, :4, :4] = True
    att = vit.obj_attention(images, om)
    assert att.shape == (4, vit.num_heads, 8, 8)
    assert float(att[..., 4:, :].sum()) == 0.0 and float(att[..., :, 4:].sum()) == 0.0
    assert (att.sum((-1, -2)) <= 1.0 + 1e-5).all() and (att.sum((-1, -2)) > 0.5).all()


def test_intermediate_obj_ends_with_the_final_obj_token(vit, images):
    """The linear probe's features: the normed OBJ token of each of the last n blocks, the last one being the
    model's own output (with and without a box)."""
    vit.attn_impl = "mask"
    box = torch.zeros(4, 8, 8, dtype=torch.bool)
    box[:, 1:6, 2:7] = True
    with torch.no_grad():
        for om in (None, box):
            final = vit(images, obj_mask=om)[0]
            four = vit.intermediate_obj(images, 4, obj_mask=om)
            assert len(four) == 4 and all(t.shape == final.shape for t in four)
            torch.testing.assert_close(four[-1], final)
            torch.testing.assert_close(vit.intermediate_obj(images, 1, obj_mask=om)[0], final)
            # the earlier ones are the earlier blocks, each after the final norm
            x = vit.embed(images)
            outs = [t[:, 0] for t in vit.blocks(x, om)]
            torch.testing.assert_close(four[0], vit.vit.norm(outs[-4]))
            assert (four[0] - final).abs().max() > 1e-3


def test_trainer_default_attention_is_the_models():
    """The trainer's default attention is the model's (one default, odis/choices.py)."""
    from odis.model import DEFAULT_ATTN_IMPL
    from odis.trainer.config import ModelConfig

    assert ModelConfig().attn_impl == DEFAULT_ATTN_IMPL
