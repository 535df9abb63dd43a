"""The shipped recipes (configs/*.yaml): each loads by name into a config of real keys, the paper recipes resolve to
the values their files cite, and every file names the source of every setting it makes.

Fast: no model is built and nothing is trained (the arch check reads a weightless skeleton)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from odis.trainer.config import Config, ConfigError
from odis.trainer.recipes import find_recipe, load_config, recipe_names

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "configs").glob("*.yaml"))
NAMES = recipe_names()
PAPER = [n for n in NAMES if n.startswith("vit_")]  # the paper-scale GPU recipes; the *_cpu ones are odis's own

# "# Total batch: 256 = 8 GPUs x 32 per GPU": the whole batch, how many processes, and each one's data.batch_size
TOTAL_BATCH = re.compile(r"^# Total batch: (\d+) = (\d+) GPUs x (\d+) per GPU", re.M)
TAG = re.compile(r"\[([A-Za-z][\w-]*)\]")
LEAF = re.compile(r"^(\s*)([A-Za-z_]\w*):\s*(\S.*)?$")  # `key: value  # comment` or a section `key:`


def _text(name: str) -> str:
    return find_recipe(name).read_text()


def _lines(name: str) -> list[tuple[int, str, str, str]]:
    """(line number, indent, key, the text after the key) of every key line of the recipe."""
    out = []
    for n, line in enumerate(_text(name).splitlines(), 1):
        m = LEAF.match(line)
        if m and not line.lstrip().startswith("#"):
            out.append((n, m.group(1), m.group(2), m.group(3) or ""))
    return out


def _defined_tags(text: str) -> set[str]:
    """The tags the file's `# Sources:` block defines: `#   [TAG] what it is` (or `# Sources: [TAG] ...`)."""
    head = text[text.index("# Sources:"):].split("\n")
    block = [head[0]] + [ln for ln in head[1:] if ln.startswith("#   ") or ln.startswith("#  [")]
    defined = set()
    for ln in block:
        m = re.match(r"#(?: Sources:)?\s*\[([A-Za-z][\w-]*)\]", ln)
        if m:
            defined.add(m.group(1))
    return defined


def test_the_shipped_recipes_are_the_files_in_configs():
    assert NAMES == [p.stem for p in FILES]
    assert {"vit_small_coco", "vit_small_in1k", "vit_base_in1k", "vit_large_in1k", "tiny_cpu", "mini_cpu"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_loads_by_name_into_real_keys(name):
    cfg = load_config(name)  # refuses unknown keys and wrong types, names the file
    assert isinstance(cfg, Config)
    data = yaml.safe_load(_text(name))

    def walk(node, obj, prefix=""):
        for key, value in node.items():
            assert hasattr(obj, key), f"{name}: {prefix}{key} is no config key"
            if isinstance(value, dict):
                assert dataclasses.is_dataclass(getattr(obj, key)), f"{name}: {prefix}{key} is not a section"
                walk(value, getattr(obj, key), f"{prefix}{key}.")

    walk(data, cfg)


def test_a_recipe_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_text("vit_small_coco").replace("  box_sampling: area", "  box_samplin: area"))
    with pytest.raises(ConfigError, match="box_samplin"):
        load_config(bad)


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_names_its_sources(name):
    """A `# Sources:` block defines each [TAG]; every top-level line carries a comment naming where it comes from;
    in the paper recipes every setting does, with a defined tag or `guess:`, and every tag used is defined."""
    text = _text(name)
    assert re.search(r"^# Sources:", text, re.M), f"{name}: no '# Sources:' line"
    defined = _defined_tags(text)
    assert defined, f"{name}: the Sources block defines no [TAG]"
    for n, indent, key, rest in _lines(name):
        comment = rest.split("#", 1)[1] if "#" in rest else ""
        if not indent or name in PAPER:
            assert comment.strip(), f"{name}:{n}: `{key}` names no source"
        if name in PAPER and indent:
            assert TAG.search(comment) or "guess:" in comment, f"{name}:{n}: `{key}`: no [TAG] and no 'guess:'"
    used = {t for t in TAG.findall(text) if not t.isdigit()} - {"OBJ", "CLS"}  # the paper's token names
    assert used <= defined, f"{name}: tags used but not defined in the Sources block: {sorted(used - defined)}"


@pytest.mark.parametrize("name", PAPER)
def test_the_paper_recipes_sample_boxes_by_area(name):
    """The paper's final objective (appendix E, Table 5) draws one box per image proportional to its area."""
    c = load_config(name)
    assert (c.method, c.data.box_sampling) == ("odis", "area")


@pytest.mark.parametrize("name", PAPER)
def test_the_paper_recipes_state_their_total_batch(name):
    """data.batch_size is per process: the file says how many processes make its total batch (the lr scales by it)."""
    c = load_config(name)
    m = TOTAL_BATCH.search(_text(name))
    assert m, f"{name}: no '# Total batch: N = G GPUs x B per GPU' line"
    total, gpus, per_gpu = map(int, m.groups())
    assert per_gpu == c.data.batch_size and gpus * per_gpu == total, (name, m.group(0), c.data.batch_size)
    assert total == (256 if name == "vit_small_coco" else 1024), name


def test_vit_small_coco_is_cribos_published_coco_recipe():
    """`odis train -c vit_small_coco` resolves to area sampling and to tileb1/CrIBo's COCO ViT-S/16 arguments
    (checkpoints/vits16-coco_args.json: 8 x 32 = 256 images, 300 epochs), with iBOT's multi-crop and masking."""
    text = _text("vit_small_coco")
    assert "tileb1/CrIBo@94ca303e checkpoints/vits16-coco_args.json" in text
    c = load_config("configs/vit_small_coco.yaml")  # as the command line names it
    assert c.data.box_sampling == "area"
    assert c.data.batch_size * 8 == 256
    got = (c.model.arch, c.model.drop_path_rate, c.model.norm_last_layer, c.optim.epochs, c.optim.lr,
           c.optim.min_lr, c.optim.warmup_epochs, c.optim.weight_decay, c.optim.weight_decay_end,
           c.optim.momentum_teacher, c.optim.clip_grad, c.optim.freeze_last_layer_epochs,
           c.loss.warmup_teacher_temp, c.loss.teacher_temp, c.loss.warmup_teacher_temp_epochs,
           tuple(c.data.global_scale), tuple(c.data.local_scale))
    assert got == ("vit_small_patch16_224", 0.1, False, 300, 5e-4, 1e-5, 10, 0.04, 0.4, 0.996, 0.0, 1,
                   0.04, 0.07, 30, (0.25, 1.0), (0.05, 0.25))
    # the objective's own settings stay iBOT's ViT-S/16 ones (and say so)
    assert (c.data.n_local, c.model.out_dim, c.data.mask_prob, tuple(c.data.mask_ratio)) == (10, 8192, 0.5, (0.1, 0.5))


def test_the_vit_b_and_l_recipes_mark_what_they_could_not_find():
    """iBOT's ViT-B/L args.txt were not readable: the values taken from ViT-S are marked as guesses; ViT-B's
    head follows main_ibot.py's help ("True with vit_base")."""
    b, l = load_config("vit_base_in1k"), load_config("vit_large_in1k")
    assert (b.model.arch, l.model.arch) == ("vit_base_patch16_224", "vit_large_patch16_224")
    assert b.model.norm_last_layer and l.model.norm_last_layer
    for name in ("vit_base_in1k", "vit_large_in1k"):
        lines = {key: rest for _, indent, key, rest in _lines(name) if indent}
        for key in ("lr", "min_lr", "drop_path_rate", "epochs", "warmup_teacher_temp_epochs", "global_scale"):
            assert "guess:" in lines[key], f"{name}: {key} is no published ViT-B/L value, yet not marked a guess"


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("_cpu")])
def test_the_cpu_recipes_say_they_are_odis_own(name):
    first = _text(name).splitlines()[0]
    assert first.startswith("# odis's own CPU-sized recipe, not from a paper"), first
