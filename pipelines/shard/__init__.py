"""`odis shard`: an image folder (+ labels, + a box manifest) -> webdataset shards + index.json.

How a run goes, and where each step lives:
1. `scan`: list the image files under the root (symlinked folders followed, once each);
   `labels`: give every file its image_id (odis.manifest.image_id_for, the same rule as manifests), its label and
   its manifest boxes;
2. `plan`: shuffle with the seed and cut into shards from the source file sizes, so that which image lands in
   which shard never depends on timing: a resumed run is byte-identical to an uninterrupted one;
3. `write`: each shard (local process pool or one Ray task per shard, `run`) is written through `tar` (fixed
   metadata, hashed while written) to `.NAME.tar.partial`, fsynced and renamed; `image` decides per image whether
   its bytes are copied unchanged or re-encoded, `meta` builds its json; a small record (count, sha256, skipped
   files) goes to `.odis-shard/` next to it;
4. `outdir`: when every shard is there, index.json is written (last) and `.odis-shard/` dropped. A rerun with the
   same inputs writes only the shards that are missing; a rerun whose inputs differ refuses to mix shard sets
   unless `overwrite=True`.

The names below are the package's API (cli.py, pipelines/demo.py, benchmarks/, tests/ import them from here).
"""
from odis.pipelines.shard.image import Prepared, jpeg_size, prepare_image, target_size
from odis.pipelines.shard.labels import default_coco_json
from odis.pipelines.shard.meta import sample_meta
from odis.pipelines.shard.outdir import make_index
from odis.pipelines.shard.plan import Plan, build_plan, estimated_bytes, split_items
from odis.pipelines.shard.run import run_shard
from odis.pipelines.shard.scan import scan_images
from odis.pipelines.shard.settings import Item, ShardError, ShardSettings, parse_size
from odis.pipelines.shard.tar import TAR_MTIME, TarWriter, tar_header
from odis.pipelines.shard.write import write_shard

__all__ = ["Item", "Plan", "Prepared", "ShardError", "ShardSettings", "TAR_MTIME", "TarWriter", "build_plan",
           "default_coco_json", "estimated_bytes", "jpeg_size", "make_index", "parse_size", "prepare_image",
           "run_shard", "sample_meta", "scan_images", "split_items", "tar_header", "target_size", "write_shard"]
