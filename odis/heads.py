"""The DINO/iBOT projection head, shared between the OBJ (or CLS) token and the patch tokens.

3-layer MLP (GELU, no BN) -> bottleneck -> L2-normalise -> weight-normalised linear to K prototypes (no bias).
The weight norm is written out (weight = g * v / ||v||) instead of torch's parametrization so that parameter
names are plain and `last_layer` freezing is by name, as in iBOT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # iBOT/DINO create the last layer after their trunc-normal init pass: it keeps nn.Linear's default init,
        # U(+-1/sqrt(bottleneck)). Its scale matters under weight norm: the prototypes move by lr / ||v||.
        self.last_layer_v = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())
        # weight_g = 1; norm_last_layer=True freezes it (DINO's default), the ViT-S iBOT recipe trains it.
        self.last_layer_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in float32, also under bf16 autocast: the teacher divides them by 0.04, which turns bf16's
        8-bit mantissa into ~10x larger errors in its probabilities than the fp16 of iBOT and DINOv2 (on a GPU the
        trainer allows TF32 for this matmul, about fp16's precision)."""
        x = F.normalize(self.mlp(x).float(), dim=-1)
        w = self.last_layer_g * F.normalize(self.last_layer_v, dim=1)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, w.float())
