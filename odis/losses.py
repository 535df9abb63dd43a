"""ODIS / iBOT / DINO losses, with the normalisation of iBOT's reference loss code.

- `loss_obj`: cross-entropy between the teacher's centred, sharpened OBJ (or CLS) distribution on global view q and
  the student's on every view v != q (globals and locals), over all such pairs. With a validity mask (the object is
  missing from a view after a crop fallback) each valid (pair, sample) term weighs the same; with every sample valid
  this is exactly iBOT's "batch mean per pair, averaged over the 2*(2+L)-2 pairs".
- `loss_patch`: same-view masked-patch cross-entropy: per image, the sum over its masked patches divided by
  max(#masked, 1); mean over all images (unmasked images contribute 0); averaged over the global views.
- Centers: EMA (0.9) of the batch mean of the teacher's logits, all-reduced across processes. The OBJ center sees
  every teacher OBJ token (valid or not), the patch center every teacher patch token (not only masked ones), as
  the reference's centers do.
- `sinkhorn_probs`: DINOv2's alternative to centering (Sinkhorn-Knopp, 3 iterations): the teacher's assignments
  are balanced over the prototypes within the (global) batch, so neither collapse - uniform for every image, or
  one prototype for all - can happen. Not the ODIS/iBOT recipe; an option for small data and short runs.
- `koleo`: DINOv2's KoLeo regulariser (Kozachenko-Leonenko entropy estimate): -mean log distance of each
  L2-normalised feature to its nearest neighbour in the batch; it spreads the features apart. Off by default.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def _full(x: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 (or float64 in tests) even under bf16 autocast."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def teacher_probs(t: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return F.softmax((_full(t) - center) / temp, dim=-1)


def _logsumexp_all_rows(z: torch.Tensor) -> torch.Tensor:
    """log of the column sums of exp(z) [R, K] over every process's rows -> [1, K]."""
    lse = torch.logsumexp(z, 0, keepdim=True)
    if dist.is_available() and dist.is_initialized():
        top = lse.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        total = torch.exp(lse - top)
        dist.all_reduce(total)
        lse = top + torch.log(total)
    return lse


@torch.no_grad()
def sinkhorn_probs(t: torch.Tensor, temp: float, n_iter: int = 3) -> torch.Tensor:
    """Teacher probabilities [..., K] by Sinkhorn-Knopp over the rows of `t` (all processes' rows together), as
    DINOv2's `sinkhorn_knopp_teacher`: alternately make every prototype's total mass 1/K and every row's 1/R;
    rows sum to 1. Computed in the log domain: the same numbers, but exp() cannot overflow or underflow a whole
    row (DINOv2's exp(t / temp) does once |t| / temp passes ~88 in float32)."""
    shape = t.shape
    z = _full(t).reshape(-1, shape[-1]) / temp  # [R, K]
    rows = torch.tensor(float(z.shape[0]), device=z.device, dtype=z.dtype)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(rows)
    log_k, log_r = math.log(z.shape[1]), torch.log(rows)
    for _ in range(n_iter):
        z = z - _logsumexp_all_rows(z) - log_k  # every prototype carries 1/K of the mass
        z = z - torch.logsumexp(z, 1, keepdim=True) - log_r  # every row 1/R
    return torch.exp(z + log_r).reshape(shape)


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeoLoss on [B, D] features (one view's batch): -mean_i log ||x_i - x_nn(i)||, x L2-normalised."""
    x = F.normalize(_full(x), p=2, dim=-1, eps=eps)
    if x.shape[0] < 2:
        return x.sum() * 0.0  # no neighbour: nothing to spread (keeps the graph for DDP)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)  # never its own neighbour (cosines are >= -1)
        nn_index = dots.argmax(1)
    return -torch.log(F.pairwise_distance(x, x[nn_index], p=2, eps=eps) + eps).mean()


def loss_obj(student: torch.Tensor, teacher_p: torch.Tensor, student_temp: float,
             valid_student: torch.Tensor | None = None, valid_teacher: torch.Tensor | None = None) -> torch.Tensor:
    """student: logits [Vs, B, K] (the first views are the globals, in the teacher's order);
    teacher_p: probabilities [Vt, B, K]; valid_*: bool [V, B] (None: all valid)."""
    vs, b, _ = student.shape
    vt = teacher_p.shape[0]
    logp = F.log_softmax(_full(student) / student_temp, dim=-1)
    vsd = torch.ones(vs, b, dtype=torch.bool, device=student.device) if valid_student is None else valid_student
    vtd = torch.ones(vt, b, dtype=torch.bool, device=student.device) if valid_teacher is None else valid_teacher
    # ce[q, v, b] = -sum_k p_t[q,b,k] log p_s[v,b,k], in float32: autocast would run the einsum's matmul in bf16
    # and round the float32 probabilities the head keeps on purpose
    with torch.autocast(student.device.type, enabled=False):
        ce = -torch.einsum("qbk,vbk->qvb", _full(teacher_p), logp)
    weight = (vtd[:, None, :] & vsd[None, :, :]).to(ce.dtype)
    weight = weight * (1 - torch.eye(vt, vs, device=student.device, dtype=ce.dtype))[:, :, None]  # v != q
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


def loss_patch(student: torch.Tensor, teacher_p: torch.Tensor, mask: torch.Tensor, student_temp: float,
               ) -> torch.Tensor:
    """student: logits of the MASKED patches only [M, K]; teacher_p: probabilities of the same patches [M, K];
    mask: bool [V, B, N] (which patches those M rows are, in row-major order). Returns the mean over V and B of
    sum_masked CE / max(#masked, 1)."""
    v, b, n = mask.shape
    ce = -(teacher_p * F.log_softmax(_full(student) / student_temp, dim=-1)).sum(-1)  # [M]
    per_image = torch.zeros(v * b, device=ce.device, dtype=ce.dtype)
    image_of_row = mask.reshape(v * b, n).nonzero()[:, 0]
    per_image.index_add_(0, image_of_row, ce)
    count = mask.reshape(v * b, n).sum(-1).clamp(min=1)
    return (per_image / count).mean()


class Centers(nn.Module):
    """EMA centers of the teacher's OBJ/CLS and patch logits (momentum 0.9), all-reduced under DDP."""

    def __init__(self, out_dim: int, momentum: float = 0.9, names: tuple[str, ...] = ("obj", "patch")):
        super().__init__()
        self.momentum = momentum
        for name in names:
            self.register_buffer(name, torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, obj_logits: torch.Tensor | None, patch_logits: torch.Tensor | None) -> None:
        for name, logits in (("obj", obj_logits), ("patch", patch_logits)):
            if logits is None:
                continue
            batch = _all_reduce_mean(logits.float().reshape(-1, logits.shape[-1]).mean(0, keepdim=True))
            buf = getattr(self, name)
            # A non-finite batch (the step the trainer then skips) must not poison the center for good; the check
            # is on the all-reduced value, so every rank decides alike, and stays on the device (no sync).
            ema = buf * self.momentum + batch * (1 - self.momentum)
            buf.copy_(torch.where(torch.isfinite(batch).all(), ema, buf))
