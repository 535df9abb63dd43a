"""trainer/config.py: bad input is refused up front with a ValueError (what cli.py prints as a clean `error:` line)
naming the key, and the file and line where a file is at fault, never a traceback from deep inside a run.
trainer/metrics.py: a run that logged nothing gets no plot rather than an error hiding why.

Fast: no model is built (the arch check reads a weightless skeleton) and nothing is trained."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_type_hints

import pytest

from odis.trainer.config import Config
from odis.trainer.recipes import load_config

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "configs" / "mini_cpu.yaml"  # test_vit, 8-px patches, 32-px globals, 16-px locals, 10 epochs

# Each override is applied on top of MINI; the error must name the key (the override set it, not the file).
BAD_OVERRIDES = [
    # steps and run settings
    ("log_every=0", "log_every"),
    ("checkpoint_every=0", "checkpoint_every"),
    ("max_steps=0", "max_steps"),
    ("max_steps=-5", "max_steps"),
    ("max_bad_steps=0", "max_bad_steps"),
    ("seed=-1", "seed"),
    ("seed=18446744073709551616", "seed"),
    ("device=tpu", "device"),
    ("device=cuda:x", "device"),
    ("out=''", "out"),
    ("method=foo", "method"),
    # model
    ("model.patch_size=0", "model.patch_size"),
    ("model.patch_size=5", "data.global_size"),  # 32 px do not tile into 5-px patches
    ("model.depth=0", "model.depth"),
    ("model.drop_path_rate=1", "model.drop_path_rate"),
    ("model.drop_path_rate=-0.1", "model.drop_path_rate"),
    ("model.out_dim=0", "model.out_dim"),
    ("model.hidden_dim=0", "model.hidden_dim"),
    ("model.bottleneck_dim=-1", "model.bottleneck_dim"),
    ("model.arch=nope", "model.arch"),
    ("model.arch=resnet50", "model.arch"),
    ("model.arch=vit_base_patch16_siglip_224", "model.arch"),  # a ViT, but no [CLS] token to become [OBJ]
    ("model.attn_impl=flash", "model.attn_impl"),
    # data
    ("data.global_size=30", "data.global_size"),
    ("data.global_size=0", "data.global_size"),
    ("data.local_size=20", "data.local_size"),
    ("data.local_size=-16", "data.local_size"),
    ("data.n_local=-1", "data.n_local"),
    ("data.box_sampling=weird", "data.box_sampling"),
    ("data.global_scale=[0,0]", "data.global_scale"),
    ("data.local_scale=[0.3,0.1]", "data.local_scale"),
    ("data.local_scale=[0.1,1.5]", "data.local_scale"),
    ("data.global_scale=[0.3]", "data.global_scale"),
    ("data.max_crop_tries=0", "data.max_crop_tries"),
    ("data.min_visible=0", "data.min_visible"),
    ("data.min_visible=1.5", "data.min_visible"),
    ("data.mask_prob=1.5", "data.mask_prob"),
    ("data.mask_prob=-0.5", "data.mask_prob"),
    ("data.mask_ratio=[0.5,2]", "data.mask_ratio"),
    ("data.mask_ratio=[0.5,0.1]", "data.mask_ratio"),
    ("data.mask_ratio=[-0.1,0.5]", "data.mask_ratio"),
    ("data.mask_ratio=[0.5,1]", "data.mask_ratio"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("data.epoch_samples=0", "data.epoch_samples"),
    # optimisation
    ("optim.epochs=0", "optim.epochs"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=true", "optim.lr"),
    ("optim.lr=[1", "optim.lr"),  # not YAML
    ("optim.min_lr=-1e-6", "optim.min_lr"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("optim.warmup_epochs=11", "optim.warmup_epochs"),  # longer than the 10 epochs
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.weight_decay_end=-1", "optim.weight_decay_end"),
    ("optim.momentum_teacher=1.5", "optim.momentum_teacher"),
    ("optim.clip_grad=-1", "optim.clip_grad"),
    ("optim.freeze_last_layer_epochs=11", "optim.freeze_last_layer_epochs"),
    # losses
    ("loss.student_temp=0", "loss.student_temp"),
    ("loss.warmup_teacher_temp=-0.04", "loss.warmup_teacher_temp"),
    ("loss.teacher_temp=0", "loss.teacher_temp"),
    ("loss.warmup_teacher_temp_epochs=-1", "loss.warmup_teacher_temp_epochs"),
    ("loss.center_momentum=2", "loss.center_momentum"),
    ("loss.centering=weird", "loss.centering"),
    ("loss.lambda_obj=-1", "loss.lambda_obj"),
    ("loss.lambda_patch=-1", "loss.lambda_patch"),
    ("loss.lambda_koleo=-0.1", "loss.lambda_koleo"),
]


@pytest.mark.parametrize("override, key", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_override_is_refused_naming_its_key(override, key):
    with pytest.raises(ValueError) as err:
        load_config(MINI, [override])
    message = str(err.value)
    assert key in message and "\n" not in message, message
    assert not message.startswith(str(MINI)), f"the override is at fault, not the file: {message}"


# Edges that are valid: the checks must not refuse them.
GOOD_OVERRIDES = ["seed=0", "max_steps=1", "device=cuda:1", "device=cpu", "optim.lr=1e-3", "optim.clip_grad=0",
                  "optim.warmup_epochs=10", "optim.freeze_last_layer_epochs=0", "data.n_local=0 data.local_size=20",
                  "data.global_scale=[1,1]", "data.mask_ratio=[0,0]", "data.mask_prob=1", "loss.lambda_patch=0",
                  "model.patch_size=16", "model.arch=vit_tiny_patch16_224", "loss.warmup_teacher_temp_epochs=30",
                  "model.drop_path_rate=0"]


@pytest.mark.parametrize("overrides", GOOD_OVERRIDES)
def test_valid_edge_values_are_accepted(overrides):
    load_config(MINI, overrides.split())


def test_the_arch_patch_size_counts_when_none_is_given():
    """Without model.patch_size the arch's own (16 for test_vit, which does not say so in its name) must tile
    the crops: 32 px does, 40 px does not."""
    base = ["model.arch=test_vit", "model.patch_size=null", "data.local_size=16"]
    load_config(MINI, [*base, "data.global_size=32"])
    with pytest.raises(ValueError, match=r"data.global_size must be a multiple of the patch size 16 .*got 40"):
        load_config(MINI, [*base, "data.global_size=40"])


def _write(tmp_path: Path, content: str | bytes, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# (file content, what the message must say besides the file name)
BAD_FILES = [
    pytest.param("optim:\n  lr: [1\n", ["line 2", "not valid YAML"], id="unclosed-list"),  # opened on line 2
    pytest.param("method: odis\nmodel:\n  arch: test_vit\n   depth: 2\n", ["line 4", "not valid YAML"], id="indent"),
    pytest.param("optim:\n\tlr: 1\n", ["line 2", "not valid YAML"], id="tab"),
    pytest.param("method: odis\nout: runs/x\nseed: \x07\n", ["line 3", "not valid YAML"], id="control-char"),
    pytest.param(b"method: odis\nout: caf\xe9\n", ["line 2", "UTF-8"], id="latin-1"),
    pytest.param("- 1\n- 2\n", ["mapping at the top level"], id="a-list"),
    pytest.param("optim:\n  1: 2\n", ["optim.1"], id="number-key"),
    pytest.param("optim:\n  lr: -1\n", ["optim.lr must be > 0"], id="range"),
    # the default warm-up is 10 epochs: longer than the file's run
    pytest.param("optim:\n  epochs: 5\n", ["optim.warmup_epochs must be <= optim.epochs (5)"], id="warmup"),
    pytest.param("model:\n  patch_size: 8\ndata:\n  global_size: 30\n", ["data.global_size"], id="patch-grid"),
    pytest.param("data:\n  bogus: 1\n", ["unknown config key 'data.bogus'"], id="unknown-key"),
]


@pytest.mark.parametrize("content, says", BAD_FILES)
def test_a_bad_file_is_refused_naming_the_file_and_where(tmp_path, content, says):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}"), message
    assert all(s in message for s in says) and "\n" not in message, message


def test_an_override_of_a_bad_file_value_is_the_override_s_fault(tmp_path):
    """The error names the source that set the value last: a good override mends the file, a bad one is named."""
    path = _write(tmp_path, "optim:\n  lr: -1\n")
    assert load_config(path, ["optim.lr=0.1"]).optim.lr == 0.1
    with pytest.raises(ValueError, match=r"^optim.lr must be > 0, got -2.0$"):
        load_config(path, ["optim.lr=-2"])


def test_text_settings_take_an_override_as_typed():
    """Paths and names are not YAML: `#` starts no comment, a date stays text; quotes and null still work."""
    cfg = load_config(overrides=["out=runs/exp #3", "data.shards=2024-01-01", "model.arch= vit_tiny_patch16_224",
                                 "data.boxes=null", "device='cpu'", "optim.epochs=30"])
    assert (cfg.out, cfg.data.shards, cfg.data.boxes, cfg.device) == ("runs/exp #3", "2024-01-01", None, "cpu")
    assert cfg.model.arch == "vit_tiny_patch16_224"  # stripped, as YAML would
    assert load_config(overrides=["data.boxes=yolo #2.parquet"]).data.boxes == "yolo #2.parquet"


def test_errors_are_config_errors_carrying_their_keys():
    from odis.trainer.config import ConfigError

    assert issubclass(ConfigError, ValueError)  # what cli.py's train command turns into `error: ...`
    with pytest.raises(ConfigError) as err:
        load_config(MINI, ["data.global_size=30"])
    assert err.value.keys[0] == "data.global_size"


def test_every_recipe_validates():
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        load_config(path)
    Config().validate()  # the defaults too


def test_every_numeric_setting_has_a_range():
    """A numeric field added later without a rule would again be accepted at any value."""
    from odis.trainer.config import RULES

    def numeric_keys(cls, prefix=""):
        for name, typ in get_type_hints(cls).items():
            if dataclasses.is_dataclass(typ):
                yield from numeric_keys(typ, f"{prefix}{name}.")
            elif any(t in (int, float) for t in (typ, *getattr(typ, "__args__", ()))) or "tuple" in str(typ):
                yield prefix + name

    keys = list(numeric_keys(Config))
    assert len(keys) > 30
    assert [k for k in keys if k not in RULES] == []


def test_a_run_that_logged_nothing_plots_nothing(tmp_path):
    from odis.trainer.metrics import COLUMNS, plot_metrics

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(",".join(COLUMNS) + "\n")
    assert plot_metrics(csv_path, tmp_path / "plots") == []
