"""Resume cost of the training loader: time to the first batch when a run resumes late, in the same run:

    python benchmarks/resume.py                    # coco_tiny JPEGs x 10 (1600 a pass, 8 shards), 20000 samples used
    python benchmarks/resume.py --used 100000 --no-record

  read-through  the anchor: reading (without decoding) every raw sample the worker used, with webdataset, as every
                resume did before the loader saved its position;
  computed      make_train_loader(start_step=k) without a saved position (another number of processes or workers):
                each worker's position is computed from the pass plan, nothing is read up to it;
  saved         make_train_loader(start_step=k+1, state=the computed loader's state after its first batch): the
                worker seeks to its chunk and reads it (and the next, ahead).
One worker, in this process (num_workers=0), page cache warm. The second batch of the computed loader must equal
the first batch of the saved one (checked). Prints the ratio and appends a row to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from loader import append_row, load_coco  # noqa: E402

from odis.trainer.config import Config  # noqa: E402
from odis.trainer.data import make_train_loader  # noqa: E402


def write_shards(images: list[dict], copies: int, per_shard: int, folder: Path) -> int:
    """The images `copies` times under new keys, in shards of `per_shard` samples, with an index.json."""
    import hashlib
    import json

    import webdataset as wds

    n = 0
    with wds.ShardWriter(str(folder / "resume-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for c in range(copies):
            for im in images:
                meta = {"image_id": f"{im['key']}_{c}", "width": im["width"], "height": im["height"],
                        "boxes": im["boxes"]}
                sink.write({"__key__": f"{im['key']}_{c}", "jpg": im["bytes"], "json": json.dumps(meta).encode()})
                n += 1
    shards = [{"name": p.name, "count": per_shard, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
              for p in sorted(folder.glob("resume-*.tar"))]
    (folder / "index.json").write_text(json.dumps({"format": "odis-shards", "version": 1, "shards": shards,
                                                   "num_samples": n, "classes": None}))
    return n


def first_batch(loader) -> tuple[float, dict, object]:
    t = time.perf_counter()
    it = iter(loader)
    batch = next(it)
    return time.perf_counter() - t, batch, it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=10, help="coco_tiny's 160 images this many times a pass")
    ap.add_argument("--per-shard", type=int, default=200)
    ap.add_argument("--used", type=int, default=20000, help="raw samples the worker used before the resume")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--machine", default=None, help="machine description for BENCHMARKS.md")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = load_coco(None)
    with tempfile.TemporaryDirectory() as tmp:
        n = write_shards(images, args.copies, args.per_shard, Path(tmp))
        cfg = Config(method="odis", seed=0, device="cpu")
        d = cfg.data
        d.shards, d.batch_size, d.num_workers = tmp, args.batch, 0
        d.global_size, d.local_size, d.n_local = 96, 48, 2
        urls = sorted(str(f) for f in Path(tmp).glob("*.tar"))
        for f in urls:
            Path(f).read_bytes()  # into the page cache, for all three
        k = args.used // args.batch
        t = time.perf_counter()
        read = sum(1 for _ in itertools.islice(wds.tarfile_to_samples()(
            {"url": u} for u in itertools.cycle(urls)), k * args.batch))
        t_read = time.perf_counter() - t
        computed = make_train_loader(cfg, 16, start_step=k)
        t_computed, _, it = first_batch(computed)
        state = computed.state_dict()
        expected = next(it)
        del it, computed  # its read-ahead thread finishes before the next timing
        gc.collect()
        t_saved, got, _ = first_batch(make_train_loader(cfg, 16, start_step=k + 1, state=state))
        assert got["key"] == expected["key"] and torch.equal(got["global"], expected["global"]), "resume differs"
    ratio = t_read / t_saved
    print(f"{n} samples a pass in {n // args.per_shard} shards, shuffle_buffer {d.shuffle_buffer}, resume at step "
          f"{k} (batch {args.batch}, {read} samples used), one worker:")
    print(f"  read-through (before):  {t_read:.2f} s to read the used samples")
    print(f"  computed position:      {t_computed:.2f} s to the first batch")
    print(f"  saved position:         {t_saved:.2f} s to the first batch ({ratio:.1f}x faster; same batch)")
    if args.no_record:
        return
    machine = args.machine or f"{os.cpu_count()}-core CPU ({platform.machine()})"
    cmd = "python benchmarks/resume.py" + (f" --used {args.used}" if args.used != 20000 else "")
    figures = (f"resume at {k * args.batch} samples used (coco_tiny x {args.copies}, {n // args.per_shard} shards of "
               f"{args.per_shard}, shuffle_buffer {d.shuffle_buffer}, 1 worker): reading the used samples {t_read:.2f} s"
               f"; first batch with the computed position {t_computed:.2f} s, with the saved one {t_saved:.2f} s = "
               f"**{ratio:.1f}x** faster than reading (same batch)")
    append_row(machine, cmd, figures)


if __name__ == "__main__":
    main()
