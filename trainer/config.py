"""One dataclass tree for a training run, with each setting's default and range (reading recipes and dotted
overrides is trainer/recipes.py).

Defaults are the iBOT ViT-S/16 recipe that ODIS builds on; the resolved config is saved with every run as
config.yaml. A setting the library also knows has its default and its range there: the views' in
odis.views.ViewSettings (which DataConfig inherits), the named choices in odis/choices.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple


from odis.choices import ATTN_IMPLS, CENTERINGS, DEFAULT_ATTN_IMPL, METHODS
from odis.views import VIEW_RULES, ViewSettings


class ConfigError(ValueError):
    """A bad setting. A ValueError, so callers (cli/train.py) print it as a clean error; `keys` are the dotted keys it
    concerns, so that load_config can name the file that set them."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch16_224"  # any timm VisionTransformer name
    patch_size: int | None = None  # override the arch's patch size (e.g. 8 for small images)
    depth: int | None = None  # override the number of blocks (smoke tests, tiny demos)
    drop_path_rate: float = 0.1  # student only
    out_dim: int = 8192  # prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = False  # iBOT ViT-S recipe
    attn_impl: str = DEFAULT_ATTN_IMPL  # mask | split: the OBJ-masked attention's implementation (odis/choices.py)
    # torch.compile both backbones (Distiller.compile_backbones), for GPUs: the GPU recipes turn it on. Off by
    # default: eager runs start at once, and compiling on a CPU needs a C++ compiler and does not pay off there
    compile: bool = False
    # MALC (paper Table 5, odis): each local view's OBJ row masked to the sampled box carried into that crop (a crop
    # that misses the box keeps an unmasked row, counted as local_obj_unmasked); off in the final recipe
    local_obj_attention: bool = False


@dataclass
class DataSource:
    """Where the training images and their boxes come from."""

    shards: str = ""  # folder, index.json, brace pattern or URL list (see odis.shards.list_shards)
    boxes: str | None = None  # manifest joined by image_id; else boxes in the shards' json; else whole image


@dataclass
class DataConfig(ViewSettings, DataSource):
    """The source, the views (odis.views.ViewSettings, with their defaults and ranges) and the loader. A dataclass
    lists the fields of its last base first, so config.yaml keeps the order shards, boxes, box_sampling, ..."""

    batch_size: int = 64  # per process
    num_workers: int = 8
    shuffle_buffer: int = 2000  # a worker permutes its samples in chunks of this many (0 or 1: shard order)
    epoch_samples: int | None = None  # images per epoch; default: the shard index's total


@dataclass
class OptimConfig:
    epochs: int = 100
    lr: float = 5e-4  # peak lr per 256 images (linear scaling rule)
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1


@dataclass
class LossConfig:
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    # The patch targets' own temperatures, as iBOT's --warmup_teacher_patch_temp / --teacher_patch_temp (same warmup
    # epochs); null: the OBJ/CLS ones above (the ViT-S recipes' values are the same for both)
    warmup_teacher_patch_temp: float | None = None
    teacher_patch_temp: float | None = None
    center_momentum: float = 0.9
    centering: str = "center"  # center (iBOT/ODIS) | sinkhorn (DINOv2's Sinkhorn-Knopp: no collapse on small data)
    lambda_obj: float = 1.0  # weight of L_OBJ (L_CLS for ibot/dino)
    lambda_patch: float = 1.0
    lambda_koleo: float = 0.0  # DINOv2's KoLeo regulariser on the student's global OBJ/CLS (DINOv2 uses 0.1)
    # L_i (paper Table 5, odis): an image token beside [OBJ] that attends everywhere, distilled as iBOT's [CLS];
    # 0 = off, as in the final recipe
    lambda_img: float = 0.0


@dataclass
class Config:
    method: str = "odis"  # odis | ibot | dino
    seed: int = 0
    out: str = "runs/odis"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 on GPUs that have it, else fp16 with loss scaling (iBOT/DINO's fp16 path: V100, T4); fp32 on CPU
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    log_every: int = 10
    checkpoint_every: int = 500  # steps
    max_steps: int | None = None  # stop after this many steps (smoke runs, tests)
    max_bad_steps: int = 20  # consecutive non-finite losses before giving up
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> "Config":
        """Refuse what would crash deep inside a run or silently train something else (ConfigError naming the key).
        The ranges first: the checks after them divide by the patch size and compare epochs."""
        for key, rule in RULES.items():
            _require(key, functools.reduce(getattr, key.split("."), self), rule)
        _check_within_epochs(self.optim)
        _check_model(self)
        _check_switches(self)
        return self


class Rule(NamedTuple):
    text: str  # completes "KEY must be ..."
    ok: Callable[[Any], bool]


def _require(key: str, value: Any, rule: Rule) -> None:
    if value is not None and not rule.ok(value):  # None: an optional setting left unset
        raise ConfigError(f"{key} must be {rule.text}, got {value!r}", key)


def _at_least(n: int) -> Rule:
    return Rule(f">= {n}", lambda v: v >= n)


def _choice(*options: str) -> Rule:
    return Rule("|".join(options), lambda v: v in options)


_COUNT = _at_least(1)
_NON_NEGATIVE = _at_least(0)
_POSITIVE = Rule("> 0", lambda v: v > 0)
_UNIT = Rule("in [0, 1]", lambda v: 0 <= v <= 1)  # EMA momenta

# The range of every number and the choices of every string, by how the run uses them (trainer/, odis/schedules.py;
# the views' are odis.views.VIEW_RULES). tests/test_config.py checks that every numeric field has one.
RULES: dict[str, Rule] = {
    "method": Rule(f"one of {METHODS}", lambda v: v in METHODS),
    # torch generators take 64-bit seeds; the loop derives seed * 1_000_003 + step * 1009 + rank from it
    "seed": Rule("in [0, 2**32)", lambda v: 0 <= v < 2**32),
    "out": Rule("a folder name", lambda v: v.strip() != ""),
    "device": Rule("auto|cpu|cuda|cuda:N", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None),
    "precision": _choice("auto", "bf16", "fp16", "fp32"),
    "log_every": _COUNT,  # steps: `step % log_every`
    "checkpoint_every": _COUNT,
    "max_steps": _COUNT,  # 0 would export an untrained backbone as if it were a run
    "max_bad_steps": _COUNT,
    "model.patch_size": _COUNT,
    "model.depth": _COUNT,
    # a probability; 1 would drop every block's branch, always: the student's blocks would never train
    "model.drop_path_rate": Rule("in [0, 1)", lambda v: 0 <= v < 1),
    "model.out_dim": _COUNT,
    "model.hidden_dim": _COUNT,
    "model.bottleneck_dim": _COUNT,
    "model.attn_impl": _choice(*ATTN_IMPLS),
    **{f"data.{name}": Rule(*rule) for name, rule in VIEW_RULES.items()},  # global_size: also _check_model's
    "data.batch_size": _COUNT,
    "data.num_workers": _NON_NEGATIVE,  # 0: load in the training process
    "data.shuffle_buffer": _NON_NEGATIVE,
    "data.epoch_samples": _COUNT,  # 0 would silently mean "the index's total" (unset is null)
    "optim.epochs": _COUNT,
    "optim.lr": _POSITIVE,
    "optim.min_lr": _NON_NEGATIVE,
    "optim.warmup_epochs": _NON_NEGATIVE,  # <= epochs: _check_within_epochs
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.weight_decay_end": _NON_NEGATIVE,
    "optim.momentum_teacher": _UNIT,
    "optim.clip_grad": _NON_NEGATIVE,  # 0: no clipping
    "optim.freeze_last_layer_epochs": _NON_NEGATIVE,
    "loss.student_temp": _POSITIVE,  # temperatures divide the logits
    "loss.warmup_teacher_temp": _POSITIVE,
    "loss.teacher_temp": _POSITIVE,
    "loss.warmup_teacher_patch_temp": _POSITIVE,
    "loss.teacher_patch_temp": _POSITIVE,
    # may exceed optim.epochs (the temperature then never reaches teacher_temp): short runs of long recipes
    "loss.warmup_teacher_temp_epochs": _NON_NEGATIVE,
    "loss.center_momentum": _UNIT,
    "loss.centering": _choice(*CENTERINGS),
    "loss.lambda_obj": _NON_NEGATIVE,  # loss weights: a negative one would maximise its loss
    "loss.lambda_patch": _NON_NEGATIVE,
    "loss.lambda_koleo": _NON_NEGATIVE,
    "loss.lambda_img": _NON_NEGATIVE,
}


def _check_switches(cfg: Config) -> None:
    """Table 5's switches name what they change: refused for a method that has no such part."""
    if cfg.model.local_obj_attention and cfg.method != "odis":
        raise ConfigError(f"model.local_obj_attention masks the [OBJ] row of local views: method odis only, got "
                          f"method {cfg.method}", "model.local_obj_attention", "method")
    if cfg.data.whole_image_box_prob and cfg.method != "odis":
        raise ConfigError(f"data.whole_image_box_prob chooses the [OBJ] token's box: method odis only, got method "
                          f"{cfg.method}", "data.whole_image_box_prob", "method")
    if cfg.loss.lambda_img and cfg.method != "odis":
        raise ConfigError(f"loss.lambda_img adds an image token beside [OBJ]: method odis only, got method "
                          f"{cfg.method}", "loss.lambda_img", "method")
    if cfg.data.local_block_masking and cfg.method == "dino":
        raise ConfigError("data.local_block_masking adds L_PATCH on local views: method ibot or odis, got "
                          "method dino", "data.local_block_masking", "method")


def _check_within_epochs(o: OptimConfig) -> None:
    """Warm-up and last-layer freezing are parts of the run: longer, the run would end inside them."""
    for name in ("warmup_epochs", "freeze_last_layer_epochs"):
        if getattr(o, name) > o.epochs:
            raise ConfigError(f"optim.{name} must be <= optim.epochs ({o.epochs}), got {getattr(o, name)}",
                              f"optim.{name}", "optim.epochs")


def _check_model(cfg: Config) -> None:
    """What timm knows: the arch exists and is a ViT with a [CLS] token, and the crops tile into its patches (timm's
    patch embedding asserts that at the first forward, deep inside the run)."""
    m, d = cfg.model, cfg.data
    _vit_patch_size(m.arch)  # also when patch_size overrides it: this checks the arch
    patch = backbone_patch_size(cfg)
    if patch is None:
        return
    patch_key, source = (("model.patch_size", "model.patch_size") if m.patch_size else
                         ("model.arch", f"that of model.arch {m.arch!r}"))
    sizes = {"data.global_size": d.global_size}
    if d.n_local:  # without local crops, local_size is unused
        sizes["data.local_size"] = d.local_size
    for key, size in sizes.items():
        if size % patch:
            raise ConfigError(f"{key} must be a multiple of the patch size {patch} ({source}), got {size}",
                              key, patch_key)


def backbone_patch_size(cfg: Config) -> int | None:
    """The patch size the backbone is built with (odis.trainer.train): model.patch_size, else model.arch's own."""
    return cfg.model.patch_size or _vit_patch_size(cfg.model.arch)


@functools.lru_cache(maxsize=None)
def _vit_patch_size(arch: str) -> int | None:
    """The patch size of timm ViT `arch`, or ConfigError when it is none that OdisViT can use (odis/model.py).

    The patch size and the [CLS] token are facts of the model, not of its name (test_vit names no patch size; the
    gap, siglip, rpn, aimv2... ViTs have no [CLS] token), so they are read from a one-block skeleton built on the
    meta device: no weights are allocated, milliseconds. Where even that fails, the real build will say why: None."""
    import timm
    import torch

    if not timm.is_model(arch) or not timm.models.is_model_in_modules(arch, ["vision_transformer"]):
        near = difflib.get_close_matches(arch, timm.list_models(module="vision_transformer"), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(near)}?" if near else
                "one of timm.list_models(module='vision_transformer'), e.g. vit_small_patch16_224")
        raise ConfigError(f"model.arch must be a timm VisionTransformer name, got {arch!r} ({hint})", "model.arch")
    try:
        with torch.device("meta"):
            vit = timm.create_model(arch, pretrained=False, num_classes=0, depth=1)
    except Exception:  # noqa: BLE001 -- a skeleton the meta device cannot hold says nothing about the real model
        return None
    if getattr(vit, "cls_token", None) is None:
        raise ConfigError(f"model.arch must be a ViT with a [CLS] token (ODIS turns it into [OBJ]), got {arch!r}",
                          "model.arch")
    return vit.patch_embed.patch_size[0]


def to_dict(cfg: Any) -> dict:
    """Plain dicts, lists and scalars (tuples become lists): what YAML and a weights-only checkpoint hold."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))
