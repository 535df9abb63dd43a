"""iBOT block masking: half the images unmasked, the rest covered at a ratio in (0.1, 0.5) with blocks."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from odis.masking import BlockMasker


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), h=st.integers(4, 20), w=st.integers(4, 20))
def test_masked_ratio_never_exceeds_target(seed, h, w):
    m = BlockMasker(h, w, mask_prob=1.0)
    mask = m(np.random.default_rng(seed))
    assert mask.shape == (h, w) and mask.dtype == bool
    assert mask.sum() <= int(h * w * 0.5)


def test_statistics_match_the_ibot_recipe():
    m = BlockMasker(14, 14)
    masks = m.batch(2000, np.random.default_rng(0)).reshape(2000, -1)
    frac = masks.mean(1)
    assert 0.45 < (frac == 0).mean() < 0.55  # 50% unmasked
    masked = frac[frac > 0]
    assert masked.min() >= 0.05 and masked.max() <= 0.5
    assert 0.22 < masked.mean() < 0.34  # ~U(0.1, 0.5) rounded down to whole blocks


def test_masks_are_made_of_blocks():
    from scipy import ndimage

    m = BlockMasker(14, 14, mask_prob=1.0, ratio=(0.1, 0.1))
    for seed in range(20):
        mask = m(np.random.default_rng(seed))
        labels, n = ndimage.label(mask)
        # a few rectangles (the first near BEiT's 16-patch minimum block), never scattered patches
        assert n <= 4 and np.bincount(labels.ravel())[1:].max() >= m.min_block // 2


def test_deterministic_given_rng():
    m = BlockMasker(8, 8)
    assert np.array_equal(m.batch(10, np.random.default_rng(5)), m.batch(10, np.random.default_rng(5)))
