"""The key scan of `odis train --boxes` (rank 0 reads every sample key from the tar headers at start), same run:

    python benchmarks/keyscan.py                 # 64000 webdataset samples (jpg + json) in 32 shards
    python benchmarks/keyscan.py --samples 200000 --no-record

  tarfile   the anchor: Python's tarfile over every member (what shard_keys did before), no member data read;
  odis      odis.shards.shard_keys: ustar/pax headers parsed straight from the mapped file.
Both on the same shards, page cache warm, best of --repeats; the keys must be equal (checked). Prints the ratio and
appends a row to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import webdataset as wds  # noqa: E402
from loader import append_row  # noqa: E402

from odis.shards import shard_keys  # noqa: E402
from odis.tarscan import sample_key  # noqa: E402


def tarfile_keys(urls: list[str]) -> list[str]:
    keys = []
    for u in urls:
        with tarfile.open(u, mode="r:") as tar:
            keys.extend(k for k in (sample_key(m.name) for m in tar if m.isfile()) if k is not None)
    return keys


def best(fn, repeats: int) -> tuple[float, list[str]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64000)
    ap.add_argument("--per-shard", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--machine", default=None, help="machine description for BENCHMARKS.md")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with wds.ShardWriter(f"{tmp}/k-%06d.tar", maxcount=args.per_shard, verbose=0) as sink:
            for i in range(args.samples):
                sink.write({"__key__": f"n{i:09d}", "jpg": b"\xff\xd8" + b"x" * 98, "json": b"{}"})
        urls = sorted(str(p) for p in Path(tmp).glob("*.tar"))
        t_tar, ref = best(lambda: tarfile_keys(urls), args.repeats)
        t_odis, keys = best(lambda: shard_keys(urls), args.repeats)
    assert keys == ref, "the key scans disagree"
    us = 1e6 / args.samples
    print(f"{args.samples} samples in {len(urls)} shards: tarfile {t_tar:.2f} s ({t_tar * us:.1f} us a sample), "
          f"odis {t_odis:.2f} s ({t_odis * us:.1f} us a sample) = {t_tar / t_odis:.1f}x faster")
    if args.no_record:
        return
    machine = args.machine or f"{os.cpu_count()}-core CPU ({platform.machine()})"
    cmd = "python benchmarks/keyscan.py" + (f" --samples {args.samples}" if args.samples != 64000 else "")
    append_row(machine, cmd, f"{args.samples} webdataset samples, {len(urls)} shards (best of {args.repeats}): "
               f"tarfile {t_tar:.2f} s, odis shard_keys {t_odis:.2f} s = **{t_tar / t_odis:.1f}x** (same keys)")


if __name__ == "__main__":
    main()
