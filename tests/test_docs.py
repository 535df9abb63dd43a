"""Every `odis ...` command written in README.md and docs/ names a command, options and config keys that exist,
and its recipe (-c) is found: a reader who copies one gets the tool's answer, not a usage error."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from odis.cli import app
from odis.trainer.config import ConfigError
from odis.trainer.recipes import find_recipe, load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line, tokens after `odis`) of each odis command in the file's fenced code blocks."""
    found, block, start, pending = [], False, 0, ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            block = not block
            continue
        if not block:
            continue
        text = pending + line.split(" #")[0].strip()
        if text.endswith("\\"):
            pending, start = text[:-1] + " ", start or n
            continue
        pending, first = "", start or n
        start = 0
        m = re.search(r"(?:^|\s-m |^)odis (.*)$", text)
        if m and not text.startswith(("pip", "git")):
            tokens = shlex.split(m.group(1).replace("…", ""))
            found.append((first, tokens))
    return found


CASES = [(f"{p.name}:{n}", t) for p in DOCS for n, t in _commands(p)]


def test_the_docs_hold_commands():
    assert len(CASES) >= 20, CASES  # the parser found them (a broken parser would make every case vacuous)


@pytest.mark.parametrize("where, tokens", CASES, ids=[c[0] for c in CASES])
def test_documented_command_exists(where, tokens):
    cmd = typer.main.get_command(app)
    path = []
    while hasattr(cmd, "commands") and tokens and not tokens[0].startswith("-"):  # a group: its subcommand
        sub = cmd.commands.get(tokens[0])
        assert sub is not None, f"{where}: `odis {' '.join(path + tokens[:1])}` is not a command"
        path.append(tokens.pop(0))
        cmd = sub
    options = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    overrides, recipe = [], None
    for i, tok in enumerate(tokens):
        if tok.startswith("-") and not re.fullmatch(r"-\d.*", tok):
            name = tok.split("=", 1)[0]
            assert name in options | {"--help"}, f"{where}: `odis {' '.join(path)}` has no option {name}"
            if name in ("-c", "--config") and i + 1 < len(tokens):
                recipe = find_recipe(tokens[i + 1])
        elif re.fullmatch(r"[a-z_]+(\.[a-z_]+)*=.*", tok) and path == ["train"]:
            overrides.append(tok)
    if overrides:
        try:
            load_config(recipe, overrides)
        except ConfigError as e:
            assert "shards" in str(e), f"{where}: {e}"  # a key that exists, with a value the defaults refuse


def test_gpu_check_lays_out_the_package_as_pyproject_does():
    """benchmarks/gpu_check.sh runs on a machine where the repo is not installed: it links the package together
    as pyproject.toml's package-dir maps it, so a subpackage folder added there must be added to the script too."""
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    package_dir = dict(re.findall(r'^"([\w.]+)" = "(\w+)"$', section, re.M))  # tomllib is 3.11+; README says 3.10
    assert package_dir.get("odis") == "odis"
    subs = {folder for name, folder in package_dir.items() if name.startswith("odis.")}
    assert all(package_dir[f"odis.{folder}"] == folder for folder in subs)  # the script links odis/<folder>
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    linked = re.search(r"^for sub in ([\w ]+); do ln -s", script, re.M)
    assert linked and set(linked.group(1).split()) == subs
