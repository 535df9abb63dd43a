"""One dataclass tree for a training run; YAML recipes in configs/; dotted overrides (`optim.lr=1e-3`).

Defaults are the iBOT ViT-S/16 recipe that ODIS builds on (REFERENCE-hparams.md); the resolved config is saved
with every run as config.yaml.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

METHODS = ("odis", "ibot", "dino")


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
    # split | mask: two equal implementations of the OBJ masked attention (odis/model.py); split, the default
    # (odis.model.DEFAULT_ATTN_IMPL), keeps flash attention for the patch rows: the faster on a GPU (BENCHMARKS.md)
    attn_impl: str = "split"
    # torch.compile both backbones (odis.distill.Distiller.compile_backbones): fuses the many small operations of a
    # ViT step, for GPUs; the first steps are slow while it compiles. Off by default: eager runs start at once, and
    # on a CPU compiled steps were slower and need a C++ compiler (BENCHMARKS.md)
    compile: bool = False


@dataclass
class DataConfig:
    shards: str = ""  # folder, index.json, brace pattern or URL list (see odis.shards.list_shards)
    boxes: str | None = None  # manifest joined by image_id; else boxes in the shards' json; else whole image
    box_sampling: str = "uniform"  # uniform | area
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    max_crop_tries: int = 20  # object-aware crop: redraw until the crop contains the box
    min_visible: float = 0.5  # "contains the box": this share of the box's area lies inside the crop
    local_object_aware: bool = False  # odis: local crops object-aware too (ODIS-derived code's option; paper: off)
    mask_prob: float = 0.5  # iBOT: half the images unmasked
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    batch_size: int = 64  # per process
    num_workers: int = 8
    shuffle_buffer: int = 2000
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
    center_momentum: float = 0.9
    centering: str = "center"  # center (iBOT/ODIS) | sinkhorn (DINOv2's Sinkhorn-Knopp: no collapse on small data)
    lambda_obj: float = 1.0  # weight of L_OBJ (L_CLS for ibot/dino)
    lambda_patch: float = 1.0
    lambda_koleo: float = 0.0  # DINOv2's KoLeo regulariser on the student's global OBJ/CLS (DINOv2 uses 0.1)


@dataclass
class Config:
    method: str = "odis"  # odis | ibot | dino
    seed: int = 0
    out: str = "runs/odis"
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    checkpoint_every: int = 500  # steps
    max_steps: int | None = None  # stop after this many steps (smoke runs, tests)
    max_bad_steps: int = 20  # consecutive non-finite losses before giving up
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> "Config":
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.data.box_sampling not in ("uniform", "area"):
            raise ValueError(f"data.box_sampling must be uniform|area, got {self.data.box_sampling!r}")
        if self.loss.centering not in ("center", "sinkhorn"):
            raise ValueError(f"loss.centering must be center|sinkhorn, got {self.loss.centering!r}")
        if self.data.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")
        return self


def to_dict(cfg: Any) -> dict:
    """Plain dicts, lists and scalars (tuples become lists): what YAML and a weights-only checkpoint hold."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a YAML value into the field's type, or say which key is wrong."""
    origin = getattr(typ, "__origin__", None)
    args = getattr(typ, "__args__", ())
    if value is None:
        if type(None) in args or typ is Any:
            return None
        raise ValueError(f"config key {key!r} may not be null")
    if origin is tuple or typ is tuple:
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise ValueError(f"config key {key!r} expects a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if args and type(None) in args:  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if typ is float and not isinstance(value, bool):
        try:  # YAML reads "1e-3" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key!r} expects a number, got {value!r}") from None
    if typ in (int, str, bool) and not isinstance(value, typ):
        raise ValueError(f"config key {key!r} expects {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects int, got {value!r}")
    return value


def _set(cfg: Any, dotted: str, value: Any, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    hints = get_type_hints(type(cfg))
    if head not in hints:
        known = ", ".join(sorted(hints))
        raise ValueError(f"unknown config key {prefix + head!r} (known here: {known})")
    if rest:
        _set(getattr(cfg, head), rest, value, prefix + head + ".")
    elif dataclasses.is_dataclass(hints[head]):
        if not isinstance(value, dict):
            raise ValueError(f"config key {prefix + head!r} is a section; give a mapping")
        for k, v in value.items():
            _set(getattr(cfg, head), k, v, prefix + head + ".")
    else:
        setattr(cfg, head, _coerce(value, hints[head], prefix + head))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key.sub=value` overrides (values parsed as YAML: numbers, lists, null)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping at the top level")
        for key, value in data.items():
            try:
                _set(cfg, key, value)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        _set(cfg, key.strip(), yaml.safe_load(raw))
    return cfg.validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
