"""`odis verify` catches broken shard sets; the reader API lists shards from folders, indexes, patterns, URLs."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest
import webdataset as wds
from typer.testing import CliRunner

from odis.cli import app
from odis.shards import iter_samples, list_shards, read_index
from odis.verify import verify_shards

runner = CliRunner()
CLASSES = ["n01443537", "n01629819"]  # 100 Tiny-ImageNet images -> 4 shards of 25


@pytest.fixture(scope="module")
def good(tiny_imagenet, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src") / "train"
    for c in CLASSES:
        shutil.copytree(tiny_imagenet / "train" / c, root / c)
    out = tmp_path_factory.mktemp("shards") / "tin"
    r = runner.invoke(app, ["shard", "--images", str(root), "--out", str(out), "--labels", "folder",
                            "--max-samples", "25", "--num-workers", "1"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def shards(good, tmp_path) -> Path:
    """A fresh copy of the good shard set to break."""
    return Path(shutil.copytree(good, tmp_path / "tin"))


def verify(folder: Path, *extra: str) -> tuple[int, dict]:
    r = runner.invoke(app, ["verify", str(folder), "--json", *extra])
    return r.exit_code, json.loads(r.output)


def rewrite(folder: Path, name: str, edit) -> None:
    """Rewrite one shard through `edit([(member, bytes)]) -> [(member, bytes)]` and make the index agree with
    the new file, so that only the problem `edit` plants is left to find."""
    path = folder / name
    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for n, data in edit(members):
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    index = json.loads((folder / "index.json").read_text())
    entry = next(s for s in index["shards"] if s["name"] == name)
    entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    entry["count"] = len({n.split(".", 1)[0] for n, _ in edit(members)})
    (folder / "index.json").write_text(json.dumps(index))


def members_of(folder: Path, name: str) -> list[tuple[str, bytes]]:
    with tarfile.open(folder / name) as t:
        return [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]


def test_good_set_verifies(good):
    code, rep = verify(good, "--decode")
    assert code == 0 and rep["ok"] and rep["samples"] == 100 and rep["decoded"] == 100 and rep["shards_ok"] == 4


def test_truncated_shard(shards):
    p = shards / "tin-000001.tar"
    p.write_bytes(p.read_bytes()[:30000])
    code, rep = verify(shards)
    kinds = {(x["kind"], x["shard"]) for x in rep["problems"]}
    assert code == 1 and {("sha256", "tin-000001.tar"), ("count", "tin-000001.tar")} <= kinds
    assert rep["shards_ok"] == 3


def test_flipped_byte(shards):
    p = shards / "tin-000002.tar"
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))
    code, rep = verify(shards)
    assert code == 1 and [(x["kind"], x["shard"]) for x in rep["problems"]] == [("sha256", "tin-000002.tar")]


def test_missing_shard_named_in_the_text_report(shards):
    (shards / "tin-000003.tar").unlink()
    r = runner.invoke(app, ["verify", str(shards)])
    assert r.exit_code == 1
    assert "missing: tin-000003.tar" in r.output and "3/4 shards ok" in r.output


def test_verify_of_one_shard_or_a_binary_index_is_a_one_line_error(shards, tmp_path):
    """The shard itself instead of its folder, or a binary file as index.json: exit 2 naming the file."""
    r = runner.invoke(app, ["verify", str(shards / "tin-000000.tar")])
    assert r.exit_code == 2 and "tin-000000.tar: one shard, not a shard set: give its folder" in r.output
    (tmp_path / "index.json").write_bytes(bytes(range(128, 256)))
    r = runner.invoke(app, ["verify", str(tmp_path)])
    assert r.exit_code == 2 and "index.json: not valid JSON" in r.output and "Traceback" not in r.output


def test_duplicate_key_across_shards(shards):
    first = members_of(shards, "tin-000000.tar")[:2]  # KEY.jpg + KEY.json of shard 0
    rewrite(shards, "tin-000001.tar", lambda ms: ms + first)
    code, rep = verify(shards)
    key = first[0][0].split(".")[0]
    assert code == 1
    assert [(x["kind"], x["shard"], x["key"]) for x in rep["problems"]] == [("duplicate-key", "tin-000001.tar", key)]
    assert "tin-000000.tar" in rep["problems"][0]["message"]


def test_box_outside_image_and_bad_json(shards):
    def edit(ms):
        out = []
        for i, (n, data) in enumerate(ms):
            if i == 1:  # first json: a box past the right edge of the 64x64 image
                meta = json.loads(data)
                meta["boxes"], meta["scores"] = [[10, 10, 70, 20]], [1.0]
                data = json.dumps(meta).encode()
            if i == 3:
                data = b"{not json"
            out.append((n, data))
        return out

    rewrite(shards, "tin-000000.tar", edit)
    code, rep = verify(shards)
    assert code == 1 and sorted(x["kind"] for x in rep["problems"]) == ["bad-box", "bad-json"]


def test_decode_catches_garbage_image(shards):
    rewrite(shards, "tin-000002.tar", lambda ms: [(n, b"\xff\xd8garbage" if n.endswith(".jpg") and i == 0 else d)
                                                   for i, (n, d) in enumerate(ms)])
    assert verify(shards)[0] == 0  # the bytes are what the index says: only decoding can tell
    code, rep = verify(shards, "--decode")
    assert code == 1 and [x["kind"] for x in rep["problems"]] == ["decode"]


def test_label_past_the_class_list_and_wrong_json_size_and_exif_rotation(shards):
    """Three contract breaks found only by reading the samples: a label index outside the index's class list, a
    json size the image does not have (--decode), an EXIF orientation left in a stored image (--decode)."""
    from PIL import Image

    def rotated(jpg: bytes) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpg)).save(buf, "JPEG", exif=exif.tobytes())
        return buf.getvalue()

    def edit(ms):
        out = []
        for i, (n, data) in enumerate(ms):
            if i in (1, 3):  # the first two jsons: label 2 of 2 classes, then a 65-px width
                meta = json.loads(data)
                meta.update({"label": 2} if i == 1 else {"width": 65})
                data = json.dumps(meta).encode()
            if i == 4:  # the third image: an EXIF rotation
                data = rotated(data)
            out.append((n, data))
        return out

    rewrite(shards, "tin-000001.tar", edit)
    code, rep = verify(shards)
    assert code == 1 and [(x["kind"], "label 2" in x["message"]) for x in rep["problems"]] == [("bad-json", True)]
    code, rep = verify(shards, "--decode")
    found = sorted((x["kind"], x["message"].split(" ")[0]) for x in rep["problems"])
    assert code == 1 and found == [("bad-json", "label"), ("decode", "EXIF"), ("decode", "decoded")], found


def test_verify_api_report(shards):
    (shards / "tin-000000.tar").unlink()
    rep = verify_shards(shards)
    assert not rep.ok and rep.counts() == {"missing": 1} and rep.samples == 75
    assert "missing" in rep.summary()


# ---- reader API ---------------------------------------------------------------------------------------------

def test_list_shards_forms(good, tmp_path):
    names = [f"tin-{i:06d}.tar" for i in range(4)]
    want = [str(good / n) for n in names]
    assert list_shards(good) == want
    assert list_shards(good / "index.json") == want
    assert list_shards(f"{good}/tin-{{000000..000003}}.tar") == want
    assert list_shards([good / names[0], f"{good}/tin-{{000002..000003}}.tar"]) == [want[0], *want[2:]]
    assert list_shards(f"{want[0]}::{want[1]}") == want[:2]
    assert list_shards(f"pipe:cat {good}/tin-{{000000..000001}}.tar") == [f"pipe:cat {w}" for w in want[:2]]
    with pytest.raises(FileNotFoundError, match="6 of 10 shard.s. not found, e.g. .*tin-000004.tar"):
        list_shards(f"{good}/tin-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match="shards/nope: no such shard folder, index.json or .tar file"):
        list_shards("shards/nope")
    # A folder without an index: its *.tar files, never a temporary .partial.
    bare = tmp_path / "bare"
    bare.mkdir()
    for n in names[:2]:
        shutil.copy(good / n, bare / n)
    (bare / ".tin-000002.tar.partial").write_bytes(b"")
    assert list_shards(bare) == [str(bare / n) for n in names[:2]]
    with pytest.raises(FileNotFoundError, match="no index.json"):
        list_shards(tmp_path / "bare" / "..")


def test_read_index_rejects_names_outside_the_folder(good, tmp_path):
    index = read_index(good)
    assert index["classes"] == CLASSES and [s["count"] for s in index["shards"]] == [25] * 4
    index["shards"][0]["name"] = "../../etc/passwd"
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a plain file name"):
        read_index(tmp_path)


def test_pipe_and_http_urls_stream_with_plain_webdataset(good):
    """What object storage looks like to the trainer: pipe: commands and an https index."""
    urls = list_shards(f"pipe:cat {good}/tin-{{000000..000003}}.tar")
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == 100
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(good))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        urls = list_shards(f"{base}/index.json")
        assert urls == [f"{base}/tin-{i:06d}.tar" for i in range(4)]
        keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
        assert len(keys) == 100 == len(set(keys))
    finally:
        srv.shutdown()


def test_iter_samples(good):
    samples = list(iter_samples(good))
    assert len(samples) == 100 and {s.ext for s in samples} == {"jpg"}
    assert all(s.meta["image_id"] == s.key and s.meta["label"] in (0, 1) for s in samples)


def test_shard_keys_leave_out_an_unreadable_shard_and_say_so(tmp_path):
    """The key scan (box matching in train and eval) must not die on a shard the readers would skip and count."""
    from odis.shards import shard_keys

    good, empty = tmp_path / "a-000000.tar", tmp_path / "a-000001.tar"
    with tarfile.open(good, "w") as tar:
        for name in ("k1.jpg", "k1.json", "k2.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    empty.write_bytes(b"")
    with pytest.warns(UserWarning, match="a-000001.tar: unreadable shard"):
        assert shard_keys([str(good), str(empty)]) == ["k1", "k1", "k2"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, "webdataset", "latin-1"])
def test_the_fast_key_scan_reads_what_tarfile_reads(tmp_path, fmt):
    """shard_keys parses plain ustar and pax headers itself (4x faster than tarfile) and leaves anything else, or a
    damaged shard, to tarfile: the names must always be tarfile's."""
    from odis.shards import shard_keys
    from odis.tarscan import plain_tar_members, sample_key, sample_offsets

    def _plain_tar_names(p):
        members = plain_tar_members(p)
        return None if members is None else [n for n, _ in members]

    names = ["k1.jpg", "k1.json", "dir/k2.cls", "a" * 96 + ".jpg", "d" * 120 + "/k3.jpg", "é-k4.txt.gz"]
    path = tmp_path / "s-000000.tar"
    if fmt == "webdataset":
        with wds.TarWriter(str(path)) as sink:
            for i, n in enumerate(names):
                key, _, ext = n.rpartition("/")[2].partition(".")
                sink.write({"__key__": n.rpartition("/")[0] + "/" + key if "/" in n else key, ext: b"x" * i})
    elif fmt == "latin-1":  # a name that is not UTF-8 (an old GNU tar): webdataset reads it, so must the scan
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
            for n in ("bild-\xe4.jpg", "bild-\xe4.json"):
                tar.addfile(tarfile.TarInfo(n), io.BytesIO(b""))
    else:
        with tarfile.open(path, "w", format=fmt) as tar:
            if fmt != tarfile.USTAR_FORMAT:
                folder = tarfile.TarInfo("dir")
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)
                for skipped in ("no_extension", "._k1.jpg", "__meta__/x.json"):  # webdataset leaves them out
                    tar.addfile(tarfile.TarInfo(skipped), io.BytesIO(b""))
            for i, n in enumerate(names):
                info = tarfile.TarInfo(n)
                info.size = 700 * i
                tar.addfile(info, io.BytesIO(b"y" * info.size))
    with tarfile.open(path) as tar:
        expected = [m.name for m in tar if m.isfile()]
    fast = _plain_tar_names(path)
    assert fast is None or fast == expected
    if fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, "webdataset", "latin-1"):
        assert fast == expected  # the fast path is taken
    assert shard_keys([str(path)]) == [k for k in map(sample_key, expected) if k is not None]
    offsets = sample_offsets(path)
    if fast is not None:  # seeking to a sample's offset reads that sample and the rest, as webdataset groups them
        keys = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
        assert len(offsets) == len(keys)
        for n in range(len(keys)):
            with open(path, "rb") as f:
                f.seek(offsets[n])
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    first = next(m.name for m in tar if m.isfile())
            assert first.rpartition("/")[0] + "/" + first.rpartition("/")[2].partition(".")[0] == keys[n] \
                if "/" in first else first.partition(".")[0] == keys[n]
    data = path.read_bytes()
    bad = bytearray(data)
    bad[600] ^= 0xFF  # inside a header or a member: either way the result is tarfile's
    path.write_bytes(bytes(bad))
    try:
        with tarfile.open(path) as tar:
            want = [m.name for m in tar if m.isfile()]
    except tarfile.TarError:
        want = None
    got = _plain_tar_names(path)
    assert got is None or got == want
    path.write_bytes(data[:513])  # truncated: no end-of-archive block
    assert _plain_tar_names(path) is None
    path.write_bytes(data[:148] + b"zzzzzzz\0" + data[156:])  # a checksum that is not octal: tarfile's call
    assert _plain_tar_names(path) is None
