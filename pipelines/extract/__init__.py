"""`odis extract-boxes`: a class-agnostic detector over a folder of images, writing a box manifest (a directory of
parquet parts); one detector in this process on one machine, a Ray Data job on a cluster or with several.

How a run goes, and where each step lives:
1. `run`: check the detector, the options and the output folder before any detector loads, and list the image paths (the
   job's input, not `read_images`; the same listing as `odis shard`);
2. `outdir`: decide what an earlier run left: empty, finished, resumable (its finished parts are kept, the images
   they cover skipped), or made with other settings (refused unless `overwrite=True`, which deletes only the parts
   extract-boxes wrote);
3. `job`: the batch function (`BoxExtractor`: the detector is loaded once; decoding happens inside it, each row's
   failure becomes an `error` value), run by `local` in this process or by `map_batches` in Ray actors
   (`run.uses_ray` picks);
4. `run`: the driver streams the per-image results in, explodes them to one row per box and writes parquet
   parts into the staging folder next to the output (`.NAME.partial/`), each part atomically; `outdir`: when
   the job succeeds the parts move into OUT and the staging folder goes.
`settings` holds what a run is asked to do (ExtractConfig), what it reports (ExtractSummary) and the provenance a
resume must match.

The names below are the package's API (cli/boxes.py, benchmarks/, tests/ import them from here).
"""
from odis.pipelines.extract.job import (DETECTOR_FAILED, RESULT_SCHEMA, BoxExtractor, DetectorBatchError,
                                        DetectorLoadError)
from odis.pipelines.extract.outdir import PASSING_REASONS, redone_on_resume, staging_dir
from odis.pipelines.extract.run import extract_boxes, results_to_manifest
from odis.pipelines.extract.settings import ExtractConfig, ExtractSummary, build_metadata, resolve_detector

__all__ = ["BoxExtractor", "DETECTOR_FAILED", "DetectorBatchError", "DetectorLoadError", "ExtractConfig",
           "ExtractSummary", "PASSING_REASONS", "RESULT_SCHEMA", "build_metadata", "extract_boxes",
           "redone_on_resume", "resolve_detector", "results_to_manifest", "staging_dir"]
