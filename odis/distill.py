"""The meta-architecture: student and EMA teacher (backbone + shared DINO head), centers, and the loss for
`method = odis | ibot | dino`.

Which network sees what (as in iBOT's training loop; ODIS §3):
- teacher: the 2 global views, unmasked; odis: its OBJ row masked to the box of each view.
- student: the 2 global views with iBOT's block masks (ibot/odis) + the local views; odis: OBJ masked on the
  globals, unmasked on the locals (a local crop's OBJ is the crop itself), unless MALC masks them too.
- PMLC (Table 5): block masks on the student's locals as well; the teacher then also sees the locals, unmasked,
  for their patch targets.
- loss: odis = L_OBJ + L_PATCH, ibot = L_CLS + L_PATCH, dino = L_CLS; odis with `lambda_img` > 0 (L_i, Table 5)
  adds an image token beside [OBJ] that attends everywhere, distilled across views as iBOT's [CLS] with its own
  center.

Compute goes only where the loss reads (as DINOv2, unlike iBOT's head on every token of every view): the student
head runs on the OBJ/CLS tokens and on the masked global patches; the teacher head on its OBJ/CLS tokens and on all
of its global patches (the patch center averages over all of them, as the reference's does).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from odis.choices import CENTERINGS, DEFAULT_ATTN_IMPL, METHODS, check_choice
from odis.heads import DINOHead
from odis.losses import Centers, koleo, loss_obj, loss_patch, sinkhorn_probs, teacher_probs
from odis.model import OdisViT


@dataclass
class Views:
    """One batch of views, view-major: tensors [V, B, ...] flattened as [V*B, ...] where noted."""

    globals_: torch.Tensor  # float [2*B, 3, Hg, Wg], normalised
    locals_: torch.Tensor | None  # float [L*B, 3, Hl, Wl] or None
    obj_mask: torch.Tensor | None  # bool [2, B, gh, gw] (odis) or None
    obj_valid: torch.Tensor | None  # bool [2, B] (odis) or None
    mim_mask: torch.Tensor | None  # bool [2, B, gh, gw] (ibot/odis) or None
    # Table 5's switches, None when off: MALC, each local view's OBJ mask (all True where the crop misses the box);
    # PMLC, block masks on the student's local views (L_PATCH against the teacher's unmasked local views)
    local_obj_mask: torch.Tensor | None = None  # bool [L, B, lg, lg]
    local_mim_mask: torch.Tensor | None = None  # bool [L, B, lg, lg]


class Network(nn.Module):
    """A backbone and its projection head: the student's, or the EMA teacher's (the same architecture)."""

    def __init__(self, backbone: OdisViT, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head


class Distiller(nn.Module):
    def __init__(self, method: str, arch: str, img_size: int, patch_size: int | None = None,
                 drop_path_rate: float = 0.1, out_dim: int = 8192, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = False, student_temp: float = 0.1,
                 center_momentum: float = 0.9, lambda_obj: float = 1.0, lambda_patch: float = 1.0,
                 attn_impl: str = DEFAULT_ATTN_IMPL, depth: int | None = None, centering: str = "center",
                 lambda_koleo: float = 0.0, lambda_img: float = 0.0):
        super().__init__()
        self.method = check_choice("method", method, METHODS)
        self.centering = check_choice("centering", centering, CENTERINGS)
        if lambda_img and method != "odis":
            raise ValueError(f"lambda_img adds an image token beside [OBJ]: method odis only, got {method}")
        img_token = bool(lambda_img)
        backbone = OdisViT(arch, img_size, patch_size, drop_path_rate=drop_path_rate, attn_impl=attn_impl,
                           depth=depth, img_token=img_token)
        head = DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        self.student = Network(backbone, head)
        # The teacher has no drop-path; it starts as a copy of the student and only follows it by EMA.
        t_backbone = OdisViT(arch, img_size, patch_size, drop_path_rate=0.0, attn_impl=attn_impl, depth=depth,
                             img_token=img_token)
        t_backbone.load_state_dict(backbone.state_dict())
        self.teacher = Network(t_backbone, copy.deepcopy(head))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if method == "dino":  # no masked image modelling: the mask token would be an unused parameter under DDP
            backbone.mask_token.requires_grad_(False)
        self.centers = Centers(out_dim, center_momentum)
        self.img_centers = Centers(out_dim, center_momentum, names=("obj",)) if img_token else None
        self.student_temp = student_temp
        self.lambda_obj, self.lambda_patch, self.lambda_koleo = lambda_obj, lambda_patch, lambda_koleo
        self.lambda_img = lambda_img

    def compile_backbones(self, mode: str | None = None) -> None:
        """torch.compile the student's and the teacher's backbone in place: parameter names, state dicts,
        checkpoints and the EMA update are unchanged. Static shapes: a graph for each crop size and set of masks
        (a training step has three: teacher globals, student globals, student locals), none with symbolic sizes.
        `mode`: torch.compile's (None: its default; benchmarks/step.py --compile-mode tries the others)."""
        for net in (self.student, self.teacher):
            net.backbone.compile(dynamic=False, mode=mode)

    @property
    def uses_patch_loss(self) -> bool:
        return self.method in ("odis", "ibot")

    def forward(self, views: Views, teacher_temp: float,
                teacher_patch_temp: float | None = None) -> dict[str, torch.Tensor]:
        """Loss and its parts. The teacher temperatures come from the schedules: `teacher_temp` for the OBJ/CLS
        targets, `teacher_patch_temp` for the patch targets (None: the same)."""
        b = views.globals_.shape[0] // 2
        patch_temp = teacher_temp if teacher_patch_temp is None else teacher_patch_temp
        obj_mask = views.obj_mask.flatten(0, 1) if self.method == "odis" else None
        mim = views.mim_mask.flatten(0, 1) if self.uses_patch_loss else None
        t = self._teacher_globals(views.globals_, obj_mask)
        s = self._student(views, obj_mask, mim)

        tp = self._teacher_probs(t.obj_logits, self.centers.obj, teacher_temp).reshape(2, b, -1)
        valid_t = valid_s = None
        if self.method == "odis":
            valid_t = views.obj_valid
            n_local = s.obj_logits.shape[0] - 2  # locals always see "their object": the whole crop
            valid_s = torch.cat([views.obj_valid, views.obj_valid.new_ones(n_local, b)])
        l_obj = loss_obj(s.obj_logits, tp, self.student_temp, valid_s, valid_t)
        out = {"loss_obj": l_obj, **collapse_stats(tp)}
        loss = self.lambda_obj * l_obj
        if self.uses_patch_loss:
            out["loss_patch"] = self._patch_loss(t, s, views, mim, b, patch_temp)
            loss = loss + self.lambda_patch * out["loss_patch"]
        if self.lambda_koleo:  # DINOv2: on the student's global OBJ/CLS tokens, one global view at a time
            views_obj = s.obj.chunk(2)
            if valid_t is not None:  # an OBJ token without its object (empty box) carries nothing to spread
                views_obj = [x[v] for x, v in zip(views_obj, valid_t)]
            out["loss_koleo"] = sum(koleo(x) for x in views_obj)
            loss = loss + self.lambda_koleo * out["loss_koleo"]
        if s.img is not None:
            out["loss_img"] = self._image_loss(t.img, s.img, b, teacher_temp)
            loss = loss + self.lambda_img * out["loss_img"]
        self.centers.update(t.obj_logits, t.patch_logits)
        out["loss"] = loss
        return out

    @torch.no_grad()
    def _teacher_globals(self, globals_: torch.Tensor, obj_mask: torch.Tensor | None) -> "_TeacherOut":
        """The teacher on the 2 global views: its OBJ/CLS logits and, for L_PATCH, those of all its patches."""
        img = {"with_img": True} if self.img_centers is not None else {}
        t_obj, t_patch, *t_img = self.teacher.backbone(globals_, obj_mask=obj_mask, **img)
        if not self.uses_patch_loss:
            return _TeacherOut(self.teacher.head(t_obj), None, t_img[0] if t_img else None)
        two_b, n = t_patch.shape[:2]
        t_logits = self.teacher.head(torch.cat([t_obj, t_patch.flatten(0, 1)]))
        return _TeacherOut(t_logits[:two_b], t_logits[two_b:].reshape(two_b, n, -1), t_img[0] if t_img else None)

    def _student(self, views: Views, obj_mask: torch.Tensor | None, mim: torch.Tensor | None) -> "_StudentOut":
        """The student on the masked global views and the local views; one head call for the OBJ/CLS tokens of
        every view and the masked patches only."""
        b = views.globals_.shape[0] // 2
        img = {"with_img": True} if self.img_centers is not None else {}
        s_obj, s_patch, *s_img = self.student.backbone(views.globals_, obj_mask=obj_mask, patch_mask=mim, **img)
        tokens, local, l_patch = [s_obj], _LocalViews.of(views, self.uses_patch_loss), None
        if local is not None:
            l_obj, l_patch, *l_img = self.student.backbone(views.locals_, obj_mask=local.obj_mask,
                                                           patch_mask=local.mim, **img)
            tokens.append(l_obj)
            s_img += l_img
        n_obj = sum(x.shape[0] for x in tokens)
        n_masked = 0
        if self.uses_patch_loss:
            tokens.append(s_patch[mim.flatten(1)])
            n_masked = tokens[-1].shape[0]
            if local is not None and local.mim is not None:
                tokens.append(l_patch[local.mim.flatten(1)])
        logits = self.student.head(torch.cat(tokens))
        patch_logits = logits[n_obj:n_obj + n_masked] if self.uses_patch_loss else None
        local_patch_logits = logits[n_obj + n_masked:] if local is not None and local.mim is not None else None
        return _StudentOut(s_obj, logits[:n_obj].reshape(-1, b, logits.shape[-1]), patch_logits,
                           local_patch_logits, torch.cat(s_img) if s_img else None, local)

    def _patch_loss(self, t: "_TeacherOut", s: "_StudentOut", views: Views, mim: torch.Tensor, b: int,
                    temp: float) -> torch.Tensor:
        """L_PATCH on the masked global patches (PMLC: and on the masked local ones)."""
        masked = mim.flatten(1)  # [2B, N]
        tpp = self._teacher_probs(t.patch_logits[masked], self.centers.patch, temp)
        l_patch = loss_patch(s.patch_logits, tpp, masked.reshape(2, b, -1), self.student_temp)
        if s.local_patch_logits is None:
            return l_patch
        return self._with_local_patch_loss(l_patch, views, s.local, s.local_patch_logits, b, temp)

    def _image_loss(self, t_img: torch.Tensor, s_img: torch.Tensor, b: int, temp: float) -> torch.Tensor:
        """L_i: the image tokens distilled as iBOT's [CLS] (teacher's 2 global views -> the student's other views),
        centered by their own EMA center."""
        with torch.no_grad():
            t_logits = self.teacher.head(t_img)
            tp = self._teacher_probs(t_logits, self.img_centers.obj, temp).reshape(2, b, -1)
        s_logits = self.student.head(s_img).reshape(-1, b, t_logits.shape[-1])
        self.img_centers.update(t_logits, None)
        return loss_obj(s_logits, tp, self.student_temp)

    def _with_local_patch_loss(self, l_global: torch.Tensor, views: Views, local: "_LocalViews",
                               s_local_logits: torch.Tensor, b: int, temp: float) -> torch.Tensor:
        """PMLC: L_PATCH over the 2 global and the L local views, each view's term weighted alike (as iBOT
        averages its global views). The teacher's targets are its patches of the unmasked local views."""
        lmasked = local.mim.flatten(1)  # [L*B, n]
        with torch.no_grad():
            t_lpatch = self.teacher.backbone(views.locals_, obj_mask=local.obj_mask)[1]
            tpp = self._teacher_probs(self.teacher.head(t_lpatch[lmasked]), self.centers.patch, temp)
        n_local = lmasked.shape[0] // b
        l_local = loss_patch(s_local_logits, tpp, lmasked.reshape(n_local, b, -1), self.student_temp)
        return (2 * l_global + n_local * l_local) / (2 + n_local)

    def _teacher_probs(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.centering == "sinkhorn":
            return sinkhorn_probs(logits, temp)
        return teacher_probs(logits, center, temp)

    # ---- optimisation helpers ------------------------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_t ← m θ_t + (1 − m) θ_s, parameter by parameter."""
        s = [p.detach() for p in self.student.parameters()]
        t = list(self.teacher.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)

    def param_groups(self) -> list[dict]:
        """iBOT's rule: no weight decay on biases and 1-D parameters (norms)."""
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]

    def cancel_last_layer_grads(self) -> None:
        """Epoch-1 freezing of the head's last layer (iBOT `cancel_gradients_last_layer`)."""
        for name, p in self.student.head.named_parameters():
            if name.startswith("last_layer"):
                p.grad = None


@dataclass
class _TeacherOut:
    obj_logits: torch.Tensor            # [2B, K] OBJ/CLS of the global views
    patch_logits: torch.Tensor | None   # [2B, N, K] every patch of the global views (ibot/odis)
    img: torch.Tensor | None            # [2B, D] the image token (L_i)


@dataclass
class _StudentOut:
    obj: torch.Tensor                   # [2B, D] OBJ/CLS tokens of the global views (KoLeo)
    obj_logits: torch.Tensor            # [2+L, B, K] OBJ/CLS of every view
    patch_logits: torch.Tensor | None   # [M, K] the masked global patches
    local_patch_logits: torch.Tensor | None  # the masked local patches (PMLC)
    img: torch.Tensor | None            # [(2+L)B, D] the image tokens (L_i)
    local: "_LocalViews | None"


@dataclass
class _LocalViews:
    """The local views' masks as the student takes them: flattened, None when off."""

    obj_mask: torch.Tensor | None  # bool [L*B, lg, lg]
    mim: torch.Tensor | None       # bool [L*B, lg, lg]

    @classmethod
    def of(cls, views: Views, patch_loss: bool) -> "_LocalViews | None":
        if views.locals_ is None or not views.locals_.shape[0]:
            return None
        flat = lambda m: None if m is None else m.flatten(0, 1)  # noqa: E731
        return cls(flat(views.local_obj_mask), flat(views.local_mim_mask) if patch_loss else None)


@torch.no_grad()
def collapse_stats(teacher_p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two entropies (nats) of the teacher's OBJ/CLS distribution that tell the two ways DINO-style training fails:
    `t_entropy` (mean per-sample entropy) near ln K = the teacher is uniform for every image (nothing to learn);
    `t_batch_entropy` (entropy of the batch-mean distribution) near 0 = every image goes to the same prototype.
    Healthy training has a low first and a high second."""
    p = teacher_p.reshape(-1, teacher_p.shape[-1]).float()
    ent = lambda q: -(q * q.clamp(min=1e-12).log()).sum(-1)
    return {"t_entropy": ent(p).mean(), "t_batch_entropy": ent(p.mean(0))}


def clip_gradients(model: nn.Module, clip: float) -> None:
    """Per-parameter-tensor norm clipping, as iBOT/DINO's `clip_gradients` (not a global norm)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))
