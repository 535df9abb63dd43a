"""iBOT / BEiT block masking for masked image modelling (the student's masked global views).

Per image: with probability `1 - mask_prob` nothing is masked; otherwise a ratio r ~ U(ratio) of the patch grid
is covered with random rectangular blocks (aspect ratio log-uniform in `aspect`), as iBOT's
`pred_ratio=[0, 0.3], pred_ratio_var=[0, 0.2]` recipe does: half the images unmasked, the others r ~ U(0.1, 0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockMasker:
    grid_h: int
    grid_w: int
    mask_prob: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)
    tries_per_block: int = 10

    @property
    def min_block(self) -> int:
        # iBOT: min_num_patches = (min(H, W) // 3) ** 2, i.e. 16 patches on a 14x14 grid.
        return max(1, (min(self.grid_h, self.grid_w) // 3) ** 2)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One bool [grid_h, grid_w] mask (True = masked patch)."""
        mask = np.zeros((self.grid_h, self.grid_w), dtype=bool)
        if rng.random() >= self.mask_prob:
            return mask
        target = int(self.grid_h * self.grid_w * rng.uniform(*self.ratio))
        count = 0
        while count < target:
            added = self._add_block(mask, target - count, rng)
            if added == 0:
                break
            count += added
        return mask

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.stack([self(rng) for _ in range(n)]) if n else np.zeros((0, self.grid_h, self.grid_w), bool)

    def _add_block(self, mask: np.ndarray, max_patches: int, rng: np.random.Generator) -> int:
        """BEiT's `_mask`: try a few random blocks; keep the first that adds 1..max_patches new patches."""
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        lo, hi = sorted((self.min_block, max_patches))
        for _ in range(self.tries_per_block):
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.grid_h and 0 < w < self.grid_w):
                continue
            top = int(rng.integers(0, self.grid_h - h + 1))
            left = int(rng.integers(0, self.grid_w - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= max_patches:
                block[...] = True
                return new
        return 0
