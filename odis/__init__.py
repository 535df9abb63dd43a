"""odis: object-level self-distillation (ODIS) for vision-transformer pretraining with bounding boxes.

The library holds the paper's concepts (boxes, manifests, views, masking, model, heads, losses, evaluation).
It never imports `pipelines/`, `trainer/` or `cli/` (installed as odis.pipelines, odis.trainer, odis.cli);
only `__main__.py`, the command line entry, does.
"""
__version__ = "0.1.0"
