"""Batched photometric augmentation equals torchvision's per-image functional ops where exact comparison makes sense."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from odis import augment as A


def images(n=6, h=40, w=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def as_float(x):
    return x.float() / 255


@pytest.mark.parametrize("name,fn,tv,lo,hi", [
    ("brightness", A.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    ("contrast", A.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    ("saturation", A.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    ("hue", A.adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_jitter_ops_equal_torchvision_per_image(name, fn, tv, lo, hi):
    x = as_float(images())
    f = torch.linspace(lo, hi, len(x))
    ours = fn(x.clone(), f)
    for i in range(len(x)):
        ref = tv(x[i], float(f[i]))
        torch.testing.assert_close(ours[i], ref, atol=2e-6, rtol=0, msg=f"{name} image {i}")


def test_hue_extremes_and_grey_pixels():
    x = torch.tensor([[[[0.0, 1, 0.5, 0.2]], [[0.0, 1, 0.5, 0.9]], [[0.0, 1, 0.5, 0.4]]]])  # black, white, grey, colour
    for f in (-0.5, -0.1, 0.0, 0.33, 0.5):
        torch.testing.assert_close(A.adjust_hue(x.clone(), torch.tensor([f])), TF.adjust_hue(x, f), atol=2e-6,
                                   rtol=0)


def test_grayscale_and_solarize_equal_torchvision():
    x = as_float(images())
    torch.testing.assert_close(A.to_grayscale3(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    torch.testing.assert_close(A.solarize(x), TF.solarize(x, 128 / 255))
    # on uint8 values, solarize is PIL's: v >= 128 -> 255 - v
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    back = (A.solarize(as_float(u)) * 255).round().to(torch.uint8)
    assert (back == TF.solarize(u, 128)).all()


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_blur_equals_torchvision_gaussian_blur(sigma):
    x = as_float(images(4, 32, 36))
    ours = A.gaussian_blur(x, torch.full((4,), sigma))
    ref = TF.gaussian_blur(x, kernel_size=[A.BLUR_KERNEL, A.BLUR_KERNEL], sigma=[sigma, sigma])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_blur_uses_each_images_own_sigma():
    x = as_float(images(3, 32, 32))
    sig = torch.tensor([0.2, 1.0, 2.0])
    ours = A.gaussian_blur(x, sig)
    for i, s in enumerate(sig.tolist()):
        ref = TF.gaussian_blur(x[i:i + 1], [A.BLUR_KERNEL] * 2, [s, s])
        torch.testing.assert_close(ours[i:i + 1], ref, atol=1e-5, rtol=0)
    # stronger blur, less high-frequency energy
    energy = [ours[i].diff(dim=-1).abs().mean().item() for i in range(3)]
    assert energy[0] > energy[1] > energy[2]


def test_jitter_random_order_matches_a_sequential_per_image_replay():
    """apply_params == applying, per image, torchvision's ops in that image's drawn order."""
    x = as_float(images(16))
    g = torch.Generator().manual_seed(3)
    aug = A.ViewAug(blur_p=0.5, solarize_p=0.5)
    p = A.draw_params(len(x), aug, g)
    ours = A.apply_params(x.clone(), p)
    tv_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    for i in range(len(x)):
        y = x[i]
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                y = tv_ops[op](y, float(p[names[op]][i]))
        if p["gray"][i]:
            y = TF.rgb_to_grayscale(y, 3)
        if p["blur"][i]:
            s = float(p["sigma"][i])
            y = TF.gaussian_blur(y[None], [A.BLUR_KERNEL] * 2, [s, s])[0]
        if p["solarize"][i]:
            y = TF.solarize(y, 128 / 255)
        torch.testing.assert_close(ours[i], y, atol=1e-5, rtol=0, msg=f"image {i}")


def test_probabilities_and_determinism():
    n = 4000
    g = torch.Generator().manual_seed(0)
    for aug in (A.GLOBAL1, A.GLOBAL2, A.LOCAL):
        p = A.draw_params(n, aug, g)
        assert abs(p["jitter"].float().mean() - 0.8) < 0.03
        assert abs(p["gray"].float().mean() - 0.2) < 0.03
        assert abs(p["blur"].float().mean() - aug.blur_p) < 0.03
        assert abs(p["solarize"].float().mean() - aug.solarize_p) < 0.03
        assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0
        assert 0.6 <= p["brightness"].min() and p["brightness"].max() <= 1.4
        assert -0.1 <= p["hue"].min() and p["hue"].max() <= 0.1
        # every order is a permutation of the four ops
        assert (p["order"].sort(dim=1).values == torch.arange(4)).all()
    x = images(8)
    a = A.photometric(x, A.GLOBAL2, torch.Generator().manual_seed(5))
    b = A.photometric(x, A.GLOBAL2, torch.Generator().manual_seed(5))
    c = A.photometric(x, A.GLOBAL2, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == x.shape


def test_normalisation_and_identity_when_nothing_applies():
    x = images(5)
    none = A.ViewAug(blur_p=0.0, solarize_p=0.0, jitter_p=0.0, gray_p=0.0)
    out = A.photometric(x, none, torch.Generator().manual_seed(0))
    ref = TF.normalize(as_float(x), A.IMAGENET_MEAN, A.IMAGENET_STD)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="uint8"):
        A.photometric(x.float(), none, torch.Generator())


def test_statistics_close_to_torchvision_colorjitter():
    """Batch statistics after jitter+grayscale match torchvision's transforms applied per image."""
    import torchvision.transforms as T

    x = as_float(images(3000, 8, 8, seed=1))
    aug = A.ViewAug(blur_p=0.0)
    ours = A.apply_params(x.clone(), A.draw_params(len(x), aug, torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    tv = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
    ref = torch.stack([tv(im) for im in x])
    for stat in (lambda t: t.mean(), lambda t: t.std(), lambda t: (t.std(dim=1).mean())):
        assert abs(stat(ours) - stat(ref)) < 0.01, (stat(ours), stat(ref))


def test_chunked_call_equals_one_call_per_view():
    """Both global views in one call (per-chunk probabilities) == one call per view, draw for draw."""
    x = images(10)
    a = A.photometric(x, [(4, A.GLOBAL1), (6, A.GLOBAL2)], torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    b = torch.cat([A.photometric(x[:4], A.GLOBAL1, g), A.photometric(x[4:], A.GLOBAL2, g)])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="add up"):
        A.photometric(x, [(3, A.LOCAL)], torch.Generator())
