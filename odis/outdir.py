"""An output folder a command writes into again and again (a resume, a rerun, `--overwrite`): which entries are its
own, deleting only those, and refusing to add to what was made with other settings. Shared by extract-boxes, shard
and train; what each keeps in its folder (parts and staging, shards and records, checkpoints) stays in its module.

    OutputFolder(path, files, dirs)       .ours()  .others()  .clear()  .refuse_others(...)
    changed_settings(old, new)            {key: (old, new)} for every setting that differs (nested as `a.b`)
    describe_changes(changes)             ["key: old -> new", ...]
    refuse_changed(what, changes, error)  raise `error` naming every change, unless there is none
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any


class OutputFolder:
    """The folder `path` and the rule for which of its entries the command wrote: files whose name matches the
    regex `files` (or is one of the names, given a collection), and real folders named in `dirs`. A symlink is
    ours only under a file's name and pointing to a file; clear() then removes the link, never what it points to.
    A folder of ours holding a symlink loses the link only (shutil.rmtree does not follow links)."""

    def __init__(self, path: str | Path, files: str | Iterable[str] = (), dirs: Iterable[str] = ()):
        self.path = Path(path)
        names = files if isinstance(files, str) else "|".join(map(re.escape, files)) or r"(?!)"
        self._files = re.compile(names)
        self._dirs = frozenset(dirs)

    def is_ours(self, entry: Path) -> bool:
        if entry.name in self._dirs:
            return entry.is_dir() and not entry.is_symlink()
        return self._files.fullmatch(entry.name) is not None and entry.is_file()

    def _entries(self) -> list[Path]:
        return sorted(self.path.iterdir()) if self.path.is_dir() else []

    def ours(self) -> list[Path]:
        """The entries this command wrote (none when the folder does not exist)."""
        return [p for p in self._entries() if self.is_ours(p)]

    def others(self) -> list[Path]:
        """Everything else in the folder: never deleted, and never read as if it were ours."""
        return [p for p in self._entries() if not self.is_ours(p)]

    def clear(self, drop_empty: bool = False) -> None:
        """Delete our entries and nothing else; with `drop_empty`, then the folder itself if nothing is left."""
        for p in self.ours():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        if drop_empty and self.path.is_dir() and not self.path.is_symlink() and not any(self.path.iterdir()):
            self.path.rmdir()

    def refuse_others(self, error: type[Exception], tool: str, what: str) -> None:
        """Raise `error` when the path is a file, or the folder holds anything `tool` did not write: a resume would
        mix it in, and --overwrite must never delete someone else's files. `what`: e.g. 'an extract-boxes output
        folder'."""
        p = self.path
        if p.is_file() or p.is_symlink() and not p.is_dir():
            raise error(f"{p} exists and is a file, not {what}; use another --out (or remove it yourself)")
        others = [e.name for e in self.others()]
        if others:
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            raise error(f"{p} holds files {tool} did not write ({', '.join(others[:3])}{more}); use another --out "
                        f"({tool} never deletes or mixes in other files)")


def changed_settings(old: Mapping, new: Mapping, keys: Iterable[str] | None = None, ignore: Collection[str] = (),
                     prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for every setting that differs, sorted by key. `keys`: compare these (one a side lacks
    counts as None); by default the keys both sides have (a setting added by a newer odis is no change). Mappings
    on both sides are compared key by key, named `a.b`; `ignore` holds the (dotted) keys that may change."""
    changes = {}
    for key in (old.keys() & new.keys()) if keys is None else keys:
        name, a, b = prefix + key, old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes.update(changed_settings(a, b, None, ignore, name + "."))
        elif a != b and name not in ignore:
            changes[name] = (a, b)
    return dict(sorted(changes.items()))


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """One `key: old -> new` per change (values as Python writes them, so '1' and 1 differ)."""
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()]


def refuse_changed(what: Any, changes: Mapping[str, tuple[Any, Any]], error: type[Exception] = ValueError) -> None:
    """Refuse to add to `what` (a folder, a part) made with other settings: the result would mix two runs."""
    if changes:
        raise error(f"{what} was made with other settings: {', '.join(describe_changes(changes))}; "
                    "use --overwrite to start over or another --out")
