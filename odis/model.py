"""The ODIS backbone: a timm VisionTransformer whose `[CLS]` slot serves as `[OBJ]`.

The OBJ token's attention is masked, in every block, to the patches inside one object box; patch tokens keep full
attention (paper §3). iBOT's learnable mask token replaces masked patch embeddings before the position embeddings
are added. The wrapped timm model keeps timm's own parameter names, so the exported backbone loads into
`timm.create_model(arch, num_classes=0)` with `strict=True`.

Two implementations of the masked attention give the same outputs (tested; `attn_impl`, odis/choices.py):
- `mask`:  one `attn_mask [B,1,N,N]` built once per batch and passed to every timm block (SDPA with a mask);
- `split` (the default): the patch rows run unmasked SDPA (so flash attention stays available) and the OBJ query
           row runs alone with its `[B,1,1,N]` mask. Under torch.compile `mask` is the faster (no second call, no
           join): the GPU recipes' choice (benchmarks/step.py compares them).
Either mask is made once per forward pass as an additive bias in the attention's dtype (`attn_bias`).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from odis.choices import ATTN_IMPLS, DEFAULT_ATTN_IMPL, check_choice


def obj_attn_mask(obj_mask: torch.Tensor, num_prefix: int = 1, hidden: int = 0) -> torch.Tensor:
    """Boolean attention mask [B,1,N,N]: True everywhere except the OBJ query row (row 0), which is True for the
    prefix tokens (OBJ itself, so an empty box never gives an all-False row) and for patches inside the box, and
    False for the `hidden` tokens after the prefix (the image token of L_i, which sees the whole image).

    obj_mask: bool [B, gh, gw] or [B, gh*gw], True for patches inside the box.
    """
    b = obj_mask.shape[0]
    row = _obj_row_mask(obj_mask, num_prefix, hidden)[:, 0, 0]
    mask = torch.ones(b, 1, row.shape[1], row.shape[1], dtype=torch.bool, device=obj_mask.device)
    mask[:, 0, 0] = row
    return mask


def _obj_row_mask(obj_mask: torch.Tensor, num_prefix: int = 1, hidden: int = 0) -> torch.Tensor:
    """The OBJ query row alone: bool [B,1,1,N]."""
    b = obj_mask.shape[0]
    prefix = torch.ones(b, num_prefix, dtype=torch.bool, device=obj_mask.device)
    unseen = torch.zeros(b, hidden, dtype=torch.bool, device=obj_mask.device)
    return torch.cat([prefix, unseen, obj_mask.reshape(b, -1).bool()], dim=1)[:, None, None, :]


def attn_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask [..., N] (True = attend) as SDPA's additive bias (0 / -inf) in the attention's
    dtype, made once per forward pass: given the boolean mask, SDPA would make this bias again in every block and
    pad its rows to 16 elements for the memory-efficient kernel. The padding is made here too: the bias is a view
    of a tensor with 16-aligned rows."""
    n = mask.shape[-1]
    bias = torch.full((*mask.shape[:-1], -(-n // 16) * 16), float("-inf"), dtype=dtype, device=mask.device)
    bias[..., :n].masked_fill_(mask, 0.0)
    return bias[..., :n]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the blocks' attention runs in: autocast's where it is on, else the tokens'."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class OdisViT(nn.Module):
    """timm ViT + iBOT mask token + [OBJ] masked attention. Outputs (OBJ [B,D], patches [B,N,D]) after the norm.

    `img_token` (L_i, paper Table 5): one more class token after the prefix that attends everywhere and that the
    OBJ row does not see; it takes the class slot's position embedding. A training aid: not exported."""

    def __init__(self, arch: str = "vit_small_patch16_224", img_size: int = 224, patch_size: int | None = None,
                 drop_path_rate: float = 0.0, attn_impl: str = DEFAULT_ATTN_IMPL, depth: int | None = None,
                 img_token: bool = False):
        super().__init__()
        kwargs = dict(img_size=img_size, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate)
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        if depth is not None:  # fewer blocks: smoke tests and tiny demos
            kwargs["depth"] = depth
        self.vit = timm.create_model(arch, pretrained=False, **kwargs)
        if getattr(self.vit, "cls_token", None) is None:
            raise ValueError(f"{arch}: ODIS needs a ViT with a [CLS] token (it becomes [OBJ])")
        self.arch, self.img_size, self.depth = arch, img_size, len(self.vit.blocks)
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.embed_dim = self.vit.embed_dim
        self.num_heads = self.vit.blocks[0].attn.num_heads
        self.num_prefix = self.vit.num_prefix_tokens
        self.attn_impl = attn_impl
        # SDPA backends the split attention's OBJ row may use, as SDPBackend names (empty: PyTorch's choice), for
        # benchmarks/step.py --obj-row: some kernels are slow on the length-1 masked call.
        self.obj_row_backends: tuple[str, ...] = ()
        # iBOT/DINO initialise [CLS] (here [OBJ]) as trunc_normal(std .02); timm uses normal(std 1e-6).
        nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        # iBOT initialises its masked embedding to zeros.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        self.img_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if img_token else None
        if img_token:
            nn.init.trunc_normal_(self.img_token, std=0.02)
        self.n_front = self.num_prefix + int(img_token)  # tokens before the patches

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        self._attn_impl = check_choice("attn_impl", value, ATTN_IMPLS)

    def config(self) -> dict:
        return {"arch": self.arch, "img_size": self.img_size, "patch_size": self.patch_size,
                "embed_dim": self.embed_dim, "depth": self.depth}

    # ---- the forward pass ------------------------------------------------------------------------------------

    def embed(self, x: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token on masked patches, then OBJ token and position embeddings."""
        t = self.vit.patch_embed(x)  # [B, gh, gw, D] (dynamic image size keeps the grid)
        if patch_mask is not None:
            t = torch.where(patch_mask[..., None].bool(), self.mask_token.to(t.dtype), t)
        t = self._pos_embed(t)
        if self.img_token is not None:
            img = (self.img_token + self.vit.pos_embed[:, :1]).expand(t.shape[0], -1, -1).to(t.dtype)
            t = torch.cat([t[:, :self.num_prefix], img, t[:, self.num_prefix:]], dim=1)
        return self.vit.norm_pre(self.vit.patch_drop(t))

    def _pos_embed(self, t: torch.Tensor) -> torch.Tensor:
        """timm's `_pos_embed`, except on a grid other than the training one (local crops, other eval sizes):
        there the position embeddings are resized as DINO/iBOT's `interpolate_pos_encoding` does (bicubic with
        scale factor (g + 0.1) / g0, no antialiasing); timm resizes to the size and antialiases when shrinking,
        which blurs the small grids of local crops."""
        v = self.vit
        b, gh, gw, d = t.shape
        gh0, gw0 = v.patch_embed.grid_size
        if (gh, gw) == (gh0, gw0) or v.reg_token is not None or v.no_embed_class or v.num_prefix_tokens != 1:
            return v._pos_embed(t)
        grid = v.pos_embed[:, 1:].reshape(1, gh0, gw0, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / gh0, (gw + 0.1) / gw0), mode="bicubic")
        pos = torch.cat([v.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)
        return v.pos_drop(torch.cat([v.cls_token.expand(b, -1, -1), t.reshape(b, -1, d)], dim=1) + pos)

    def blocks(self, x: torch.Tensor, obj_mask: torch.Tensor | None, upto: int | None = None):
        """Run the blocks (all, or the first `upto`), yielding the tokens after each one."""
        blocks = self.vit.blocks if upto is None else self.vit.blocks[:upto]
        if obj_mask is None:
            for blk in blocks:
                x = blk(x)
                yield x
        elif self.attn_impl == "mask":
            mask = self.obj_bias(obj_mask, x)  # once for all blocks
            for blk in blocks:
                x = blk(x, attn_mask=mask)
                yield x
        else:
            row = self.obj_bias(obj_mask, x)
            for blk in blocks:
                x = x + blk.drop_path1(blk.ls1(self.attention(blk, blk.norm1(x), row)))
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
                yield x

    def obj_bias(self, obj_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The OBJ mask as this implementation's attention bias: [B,1,N,N] (`mask`) or the OBJ row's [B,1,1,N]."""
        rows = obj_attn_mask if self.attn_impl == "mask" else _obj_row_mask
        return attn_bias(rows(obj_mask, self.num_prefix, self.n_front - self.num_prefix), _compute_dtype(x))

    def attention(self, blk: nn.Module, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One block's masked attention on its normed input `y`, as this implementation computes it."""
        if self.attn_impl == "mask":
            return blk.attn(y, attn_mask=bias)
        return _split_attention(blk.attn, y, bias, self.obj_row_backends)

    def forward(self, x: torch.Tensor, obj_mask: torch.Tensor | None = None,
                patch_mask: torch.Tensor | None = None, with_img: bool = False) -> tuple[torch.Tensor, ...]:
        """x: normalised images [B,3,H,W]; obj_mask: bool [B,gh,gw] (None: OBJ unmasked, i.e. a plain [CLS]);
        patch_mask: bool [B,gh,gw] masked-image-modelling mask. Returns (OBJ [B,D], patches [B,gh*gw,D]), and the
        image token [B,D] after them with `with_img`."""
        t = self.embed(x, patch_mask)
        for t in self.blocks(t, obj_mask):
            pass
        t = self.vit.norm(t)
        if with_img:
            return t[:, 0], t[:, self.n_front:], t[:, self.num_prefix]
        return t[:, 0], t[:, self.n_front:]

    @torch.no_grad()
    def intermediate_obj(self, x: torch.Tensor, n: int, obj_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """OBJ/CLS token after the final norm from each of the last n blocks (the linear probe's features)."""
        outs = [t[:, 0] for t in self.blocks(self.embed(x), obj_mask)]
        return [self.vit.norm(t) for t in outs[-n:]]

    @torch.no_grad()
    def obj_attention(self, x: torch.Tensor, obj_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last block's attention of the OBJ query over the patches: [B, heads, gh, gw] (paper Fig. 10/11)."""
        depth = len(self.vit.blocks)
        t = self.embed(x)
        for t in self.blocks(t, obj_mask, upto=depth - 1):
            pass
        attn = self.vit.blocks[-1].attn
        y = self.vit.blocks[-1].norm1(t)
        b, n, d = y.shape
        qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, h, 1, N]
        if obj_mask is not None:
            row = _obj_row_mask(obj_mask, self.num_prefix, self.n_front - self.num_prefix)
            logits = logits.masked_fill(~row, float("-inf"))
        probs = logits.softmax(-1)[:, :, 0, self.n_front:]
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return probs.reshape(b, attn.num_heads, gh, gw)


def _split_attention(attn: nn.Module, x: torch.Tensor, row_bias: torch.Tensor,
                     obj_row_backends: tuple[str, ...] = ()) -> torch.Tensor:
    """timm `Attention.forward` with only the OBJ query row masked: the other rows in one unmasked SDPA call (flash
    attention stays available to them), the OBJ row in a second, masked one of length 1. Everything else as timm
    does it (head dim, attention dropout, norm, gate), so any timm ViT attention works alike.

    The two outputs are joined token-major ([B,N,H,D]), so the join is the only copy (the flash kernel writes
    its output token-major, which is why timm's transpose + reshape after it copies nothing)."""
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = attn.attn_drop.p if attn.training else 0.0
    rest = F.scaled_dot_product_attention(q[:, :, 1:], k, v, dropout_p=p)
    with sdpa_kernel([getattr(SDPBackend, b) for b in obj_row_backends]) if obj_row_backends else nullcontext():
        obj = F.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=row_bias, dropout_p=p)
    out = attn.norm(torch.cat([obj.transpose(1, 2), rest.transpose(1, 2)], dim=1).reshape(b, n, h * hd))
    return attn.proj_drop(attn.proj(out if gate is None else out * gate))


def check_obj_mask(model: OdisViT, images: int = 8, seed: int = 0) -> str | None:
    """What is wrong with the OBJ mask as this device's attention kernels compute it (eager), or None. Run once
    before training, under the training's autocast: SDPA picks its kernel by device, dtype and PyTorch version, and
    cuDNN's has given silently wrong results with masks. Block 1's attention, on random images and boxes: the OBJ
    row must not move when only the tokens outside its box change (exactly: masked keys weigh 0), and every row
    must agree with the math backend's to rounding (with `mask`, every row goes through the masked kernel)."""
    was_training = model.training
    model.eval()  # no drop-path: the passes must differ only in their input or kernel
    try:
        return _obj_mask_problem(model, images, seed)
    finally:
        model.train(was_training)


def _obj_mask_problem(model: OdisViT, images: int, seed: int) -> str | None:
    from odis.boxes import boxes_to_patch_masks

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = model.img_size
    x = torch.randn(images, 3, size, size, generator=g).to(device)
    corner = torch.rand(images, 2, generator=g) * size / 2  # boxes of half the side, anywhere
    boxes = torch.cat([corner, corner + size / 2], 1).numpy()
    box = torch.from_numpy(boxes_to_patch_masks(boxes, size, size, model.patch_size)).to(device)
    blk = model.vit.blocks[0]
    with torch.no_grad():
        y = blk.norm1(model.embed(x))
        inside = _obj_row_mask(box, model.num_prefix, model.n_front - model.num_prefix)[:, 0, 0, :, None]  # [B,N,1]
        moved = torch.where(inside, y, y + torch.randn(y.shape, generator=g).to(y))
        bias = model.obj_bias(box, y)
        out, out_moved = (model.attention(blk, v, bias).float() for v in (y, moved))
        with sdpa_kernel([SDPBackend.MATH]):
            ref = model.attention(blk, y, bias).float()
    scale, off = ref.abs().max().item(), (out - ref).abs().max().item()
    if (out_moved[:, 0] - out[:, 0]).abs().max().item() > 1e-3 * scale:
        return "the OBJ token sees the patches outside its box"
    if off > 0.05 * scale:
        return f"the attention differs from the math backend's by {off:.3g} (its largest value {scale:.3g})"
    return None


# ---- export and loading --------------------------------------------------------------------------------------

def export_backbone(model: OdisViT, path: str | Path) -> None:
    """Save the ViT with timm's parameter names (no mask token) as safetensors, with its config as metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.vit.state_dict().items()}
    save_file(state, str(path), metadata={"odis": json.dumps(model.config())})


def load_backbone(path: str | Path, arch: str | None = None, img_size: int | None = None,
                  patch_size: int | None = None) -> OdisViT:
    """An OdisViT from a run folder, backbone.safetensors, checkpoint.pt, or any timm ViT checkpoint file
    (.safetensors / .pth / .bin with timm names; `arch` is then required)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "backbone.safetensors", path / "checkpoint.pt"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no backbone.safetensors or checkpoint.pt in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"backbone not found: {path}")
    try:
        meta, state = _read_weights(path)
    except Exception as e:  # noqa: BLE001 -- truncated, not weights, a pickle of other objects: say which file
        raise load_error(path, e, "a readable backbone (a .safetensors, an odis checkpoint.pt or a timm state "
                                  "dict)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors (found {type(state).__name__})")
    arch = arch or meta.get("arch")
    if arch is None:
        raise ValueError(f"{path}: no odis metadata in this file; pass the timm architecture (--arch)")
    patch_size = patch_size or meta.get("patch_size") or _state_patch_size(state)
    img_size = img_size or meta.get("img_size") or _state_img_size(state, patch_size) or 224
    model = OdisViT(arch, img_size=img_size, patch_size=patch_size, depth=meta.get("depth"))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a classifier is not a backbone
    missing, unexpected = model.vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        # Loud, unlike DINO's eval loaders that load with strict=False and carry on with random weights.
        raise ValueError(f"{path}: does not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _read_weights(path: Path) -> tuple[dict, dict]:
    """(odis metadata or {}, state dict) of a .safetensors file, an odis checkpoint.pt or a torch state dict."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("odis", "{}"))
        return meta, load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)  # a file from elsewhere cannot run code on load
    if isinstance(obj, dict) and "teacher_backbone" in obj:  # an odis checkpoint.pt
        return obj["backbone_config"], obj["teacher_backbone"]
    return {}, obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj


def load_error(path: Path, e: Exception, expected: str) -> ValueError:
    """One line for a weights file that cannot be read: the file, what it should be, and torch's reason. Torch's own
    text for a refused pickle advises weights_only=False (which would run the file's code): only its reason stays."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch.load(weights_only=True) refused the pickle
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n", 1)[0].split(". ", 1)[0]
        if "GLOBAL" in reason:
            reason += " (a pickle of other objects than tensors: save the model's state dict alone)"
    else:
        reason = text.strip().split("\n", 1)[0][:200] or ("empty or truncated file" if isinstance(e, EOFError)
                                                             else "no message")
    return ValueError(f"{path}: not {expected} ({type(e).__name__}: {reason})")


def _state_patch_size(state: dict) -> int | None:
    w = state.get("patch_embed.proj.weight")
    return int(w.shape[-1]) if w is not None else None


def _state_img_size(state: dict, patch: int | None) -> int | None:
    """The training size of a plain timm checkpoint, from its position embeddings (square grid + 1 CLS slot)."""
    pos = state.get("pos_embed")
    if pos is None or patch is None:
        return None
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    return grid * patch if grid * grid == pos.shape[1] - 1 else None
