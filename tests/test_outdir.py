"""odis.outdir: clear() deletes a command's own entries and nothing else (foreign files, symlinks and what they point
to, other folders), and a settings diff names every changed key."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

from odis.files import tmp_pattern, write_atomic
from odis.outdir import OutputFolder, changed_settings, describe_changes, refuse_changed

OURS = r"part-[a-z0-9]+\.bin"
NAMES = ["part-a.bin", "part-b.bin", "part-1.bin", "part-.bin", "part-a.bin.bak", "xpart-a.bin", "tb", "tb2",
         "notes.txt", ".part-a.bin.tmp-12", ".hidden"]
# What an entry is: a file, a folder (holding a file and a link out), a symlink to a file inside the folder,
# outside it, to a folder outside, or to nothing.
KINDS = ["file", "dir", "link_in", "link_out", "link_dir", "dangling"]


def _make(root: Path, entries: dict[str, str]) -> tuple[Path, Path]:
    folder, outside = root / "out", root / "outside"
    folder.mkdir()
    (outside / "d").mkdir(parents=True)
    (outside / "f").write_text("outside")
    (outside / "d" / "g").write_text("outside too")
    for name, kind in entries.items():
        p = folder / name
        if kind == "file":
            p.write_text(name)
        elif kind == "dir":
            p.mkdir()
            (p / "inner").write_text("inner")
            (p / "out").symlink_to(outside / "f")
        elif kind == "link_in":
            (folder / f"target-of-{name}").write_text("target")
            p.symlink_to(folder / f"target-of-{name}")
        elif kind == "link_out":
            p.symlink_to(outside / "f")
        elif kind == "link_dir":
            p.symlink_to(outside / "d")
        else:
            p.symlink_to(root / "nothing")
    return folder, outside


def _expected_ours(name: str, kind: str) -> bool:
    """The rule, written independently: files (or links to files) under our names; the real folder `tb`."""
    if name == "tb":
        return kind == "dir"
    return re.fullmatch(OURS, name) is not None and kind in ("file", "link_in", "link_out")


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root (links not followed) with what it is: the link's target, a file's text."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_text()
    return out


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), st.sampled_from(KINDS), max_size=len(NAMES)))
@example({"tb": "link_dir", "part-a.bin": "dangling", "part-b.bin": "link_dir", "part-1.bin": "link_out",
          "part-.bin": "dir", "notes.txt": "link_in", "tb2": "dir"})
@example({"tb": "dir", "part-a.bin": "link_in", "part-b.bin": "file", "xpart-a.bin": "file"})
def test_clear_deletes_only_ours(entries):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, _ = _make(root, entries)
        f = OutputFolder(folder, files=OURS, dirs=["tb"])
        want = {n for n, k in entries.items() if _expected_ours(n, k)}
        assert {p.name for p in f.ours()} == want
        assert {p.name for p in f.others()} == {p.name for p in folder.iterdir()} - want
        before = _snapshot(root)
        f.clear()
        after = _snapshot(root)
        gone = {k for k in before if k not in after}
        # exactly our entries (and what our folders held) went; everything else is as it was, links included
        assert gone == {k for k in before if k.startswith("out/") and k.split("/")[1] in want}
        assert all(after[k] == before[k] for k in after)
        assert {k for k in after if k.startswith("outside")} == {k for k in before if k.startswith("outside")}
        assert f.ours() == []


def test_clear_keeps_the_folder_unless_asked_and_empty(tmp_path):
    f = OutputFolder(tmp_path / "o", files=["a.bin"])
    f.clear(drop_empty=True)  # no folder: nothing to do
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a.bin").write_text("x")
    f.clear()
    assert (tmp_path / "o").is_dir() and f.ours() == []
    (tmp_path / "o" / "a.bin").write_text("x")
    (tmp_path / "o" / "b.txt").write_text("theirs")
    f.clear(drop_empty=True)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["b.txt"]
    (tmp_path / "o" / "b.txt").unlink()
    f.clear(drop_empty=True)
    assert not (tmp_path / "o").exists()


def test_the_temporary_of_an_atomic_write_is_ours(tmp_path):
    """write_atomic's temporary name matches tmp_pattern, so what a killed write leaves is cleared by its owner."""
    names = []
    write_atomic(tmp_path / "part-a.bin", lambda tmp: names.append(tmp.name) or tmp.write_text("x"))
    assert re.fullmatch(tmp_pattern(OURS), names[0])
    (tmp_path / names[0]).write_text("left by a killed run")
    (tmp_path / ".notes.txt.tmp-1").write_text("theirs")
    OutputFolder(tmp_path, files=f"{OURS}|{tmp_pattern(OURS)}").clear()
    assert [p.name for p in tmp_path.iterdir()] == [".notes.txt.tmp-1"]


def test_refuse_others_names_them_and_refuses_a_file(tmp_path):
    f = OutputFolder(tmp_path, files=OURS)
    (tmp_path / "part-a.bin").write_text("ours")
    f.refuse_others(ValueError, "tool", "a tool folder")
    for n in ["n1.txt", "n2.txt", "n3.txt", "n4.txt", "n5.txt"]:
        (tmp_path / n).write_text("theirs")
    with pytest.raises(ValueError, match=r"holds files tool did not write \(n1.txt, n2.txt, n3.txt and 2 more\)"):
        f.refuse_others(ValueError, "tool", "a tool folder")
    with pytest.raises(ValueError, match="is a file, not a tool folder"):
        OutputFolder(tmp_path / "n1.txt", files=OURS).refuse_others(ValueError, "tool", "a tool folder")


_values = st.one_of(st.none(), st.integers(-3, 3), st.sampled_from(["a", "b", "1"]), st.booleans())


@given(st.dictionaries(st.sampled_from("abcdefgh"), _values), st.data())
def test_settings_diff_names_every_changed_key(old, data):
    keys = sorted(old)
    changed = data.draw(st.sets(st.sampled_from(keys)) if keys else st.just(set()))
    new = {k: data.draw(_values.filter(lambda x, v=v: x != v)) if k in changed else v for k, v in old.items()}
    new.update(data.draw(st.dictionaries(st.sampled_from("xyz"), _values)))  # added: no change
    got = changed_settings(old, new)
    assert set(got) == changed and all(got[k] == (old[k], new[k]) for k in got)
    assert list(got) == sorted(got)
    if changed:
        with pytest.raises(ValueError) as e:
            refuse_changed("OUT", got)
        msg = str(e.value)
        assert msg.startswith("OUT was made with other settings: ") and msg.endswith(
            "; use --overwrite to start over or another --out")
        assert all(f"{k}: {old[k]!r} -> {new[k]!r}" in msg for k in changed)
    else:
        refuse_changed("OUT", got)  # nothing to refuse


def test_settings_diff_nested_ignored_and_listed_keys():
    old = {"model": {"depth": 2, "dim": 8}, "out": "a", "data": {"shards": "x", "batch": 4}, "gone": 1}
    new = {"model": {"depth": 1, "dim": 8, "added": 3}, "out": "b", "data": {"shards": "y", "batch": 8}}
    got = changed_settings(old, new, ignore={"out", "data.shards"})
    assert got == {"data.batch": (4, 8), "model.depth": (2, 1)}
    assert describe_changes(got) == ["data.batch: 4 -> 8", "model.depth: 2 -> 1"]
    # listed keys: one a side lacks counts as None (a key the old run did not record is a change)
    assert changed_settings({"conf": 0.25}, {"conf": 0.25, "iou": 0.5}, keys=["conf", "iou"]) == {"iou": (None, 0.5)}
