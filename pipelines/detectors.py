"""Class-agnostic box detectors for `odis extract-boxes`: YOLO (ultralytics), MAVL-style (OWL-ViT/OWLv2 from
transformers), selective search (OpenCV contrib).

A detector is built once per Ray actor and called on a list of RGB PIL images; it returns, per image, boxes
`[n, 4]` (x0, y0, x1, y1 in the pixels of that image) and scores `[n]`, best first, at most `max_boxes`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from odis.boxes import box_area, clip_boxes

DETECTORS = ("yolo", "mavl", "selective-search")
# The MAVL recipe's class-agnostic text queries (Maaz et al. 2022).
MAVL_QUERIES = ("all objects", "all entities", "all visible entities and objects", "all obscure entities and objects")


@dataclass
class DetectorConfig:
    name: str
    weights: str | None = None
    conf: float = 0.25
    iou: float = 0.7
    max_boxes: int = 100
    min_area: float = 0.0  # fraction of the image area
    imgsz: int | None = None
    device: str = "cpu"


# Per-detector defaults for options the user leaves unset.
DEFAULTS = {
    "yolo": dict(conf=0.25, iou=0.7, imgsz=640),
    "mavl": dict(conf=0.1, iou=0.5, imgsz=None),  # None: the processor's own input size
    "selective-search": dict(conf=0.0, iou=1.0, imgsz=500),  # imgsz: longest side the image is shrunk to
}


def default_yolo_weights(shared: Path | None = None) -> str | None:
    """The offline default, yolo11n_int8_openvino_model under `shared`, $ODIS_SHARED or ../shared from the
    current folder (the data/weights folder beside a checkout); None when none holds it."""
    env = os.environ.get("ODIS_SHARED")
    for base in (shared, Path(env) if env else None, Path.cwd().parent / "shared"):
        if base is not None and (base / "weights" / "yolo11n_int8_openvino_model").is_dir():
            return str(base / "weights" / "yolo11n_int8_openvino_model")
    return None


def finalize(boxes: np.ndarray, scores: np.ndarray, width: int, height: int, min_area: float,
             max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip to the image, drop empty and too small boxes (`min_area` = fraction of the image), keep the
    `max_boxes` best (scores descending)."""
    boxes = clip_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), width, height)
    scores = np.asarray(scores, np.float64).reshape(-1)
    area = box_area(boxes)
    keep = (area > 0) & (area >= min_area * width * height)
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:max_boxes]
    return boxes[order].astype(np.float32), scores[order].astype(np.float32)


def _undo_ultralytics_pil_patch() -> None:
    """Give PIL.Image.open back its own function in this process.

    Importing ultralytics replaces `PIL.Image.open` process-wide with a wrapper that, on any file Pillow does not
    recognise, tries to install and import pi-heif; `odis.imageio.load_image` then reports a text file named
    `x.jpg` as "cannot read (ModuleNotFoundError: No module named 'pi_heif')" instead of "not an image". We give
    ultralytics decoded arrays, never files, so it does not need the wrapper. Only that exact wrapper is undone.
    """
    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = original


def blank_image() -> Image.Image:
    """An image every detector takes: running one on it shows the detector works (at load, and after a batch that
    failed whole, BoxExtractor)."""
    return Image.new("RGB", (64, 64))


class YoloDetector:
    """ultralytics YOLO, class-agnostic NMS, offline: `weights` is a local file or export folder."""

    def __init__(self, cfg: DetectorConfig):
        os.environ.setdefault("YOLO_OFFLINE", "1")
        os.environ.setdefault("YOLO_AUTOINSTALL", "false")
        os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="odis-yolo-"))
        os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
        import ultralytics.nn.tasks as tasks
        from ultralytics import YOLO

        # A .pt file is a pickle: load it with torch's weights_only and ultralytics' allow-list of model classes,
        # so weights from elsewhere cannot run code (the flag is read when ultralytics is first imported; set it
        # here too for a process that imported it earlier).
        tasks.SAFE_LOAD = True

        if not cfg.weights:
            raise ValueError("--detector yolo needs --weights (a local .pt file or an exported model folder)")
        self.cfg = cfg
        from ultralytics.utils import LOGGER

        LOGGER.setLevel(max(LOGGER.level, logging.WARNING))  # its "Loading ... for inference" lines: our bar's line
        self.model = YOLO(cfg.weights, task="detect")
        _undo_ultralytics_pil_patch()
        # YOLO() loads every format but .pt lazily, at the first predict: run one on a blank image now, so that
        # weights that cannot load fail here (BoxExtractor: DetectorLoadError, nothing written), not as an error
        # row for every image.
        self([blank_image()])

    @staticmethod
    def prepare(im) -> np.ndarray:
        """A decoded RGB PIL image as the BGR array ultralytics wants (what it does to PIL input itself), in one
        OpenCV pass (faster than a numpy channel flip). BoxExtractor calls it in its decode
        threads."""
        import cv2

        return cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR)

    def __call__(self, images: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """Boxes and scores per image: RGB PIL images, or BGR arrays from `prepare`."""
        c = self.cfg
        arrays = [im if isinstance(im, np.ndarray) else self.prepare(im) for im in images]
        results = self.model.predict(arrays, imgsz=c.imgsz, conf=c.conf, iou=c.iou, agnostic_nms=True,
                                     max_det=c.max_boxes, device=c.device, verbose=False)
        out = []
        for a, r in zip(arrays, results):
            b = r.boxes
            out.append(finalize(b.xyxy.cpu().numpy(), b.conf.cpu().numpy(), a.shape[1], a.shape[0],
                                c.min_area, c.max_boxes))
        return out


class MavlDetector:
    """The MAVL recipe over an OWL-ViT / OWLv2 model from `transformers`, loaded from a local folder: the four
    class-agnostic text queries, a box's objectness = its best sigmoid score over the queries, class-agnostic
    NMS at `iou` (0.5 in MAVL)."""

    def __init__(self, cfg: DetectorConfig):
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if not cfg.weights or not Path(cfg.weights).is_dir():
            raise ValueError("--detector mavl needs --weights FOLDER: a local OWL-ViT/OWLv2 model saved with "
                             f"save_pretrained (got {cfg.weights!r}); weights are never downloaded")
        self.cfg = cfg
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(cfg.weights, local_files_only=True)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(cfg.weights, local_files_only=True)
        self.model.eval().to(cfg.device)
        self.owlv2 = self.model.config.model_type == "owlv2"  # OWLv2 pads to a square before resizing
        text = self.processor(text=[list(MAVL_QUERIES)], padding=True, truncation=True, return_tensors="pt")
        self.text = {k: v.to(cfg.device) for k, v in text.items()}

    def __call__(self, images: list) -> list[tuple[np.ndarray, np.ndarray]]:
        import torchvision

        torch, c = self.torch, self.cfg
        kwargs = {}
        if c.imgsz:  # another input size than the model's: resize there and interpolate the position embeddings
            size = {"height": c.imgsz, "width": c.imgsz}
            kwargs = {"size": size} if self.owlv2 else {"size": size, "crop_size": size}
        pixels = self.processor(images=images, return_tensors="pt", **kwargs)["pixel_values"].to(c.device)
        n = len(images)
        text = {k: v.repeat(n, 1) for k, v in self.text.items()}
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixels, **text, interpolate_pos_encoding=bool(c.imgsz))
        # logits [n, patches, queries]; pred_boxes [n, patches, 4] normalised (cx, cy, w, h)
        scores = outputs.logits.sigmoid().amax(dim=-1).float().cpu()
        cxcywh = outputs.pred_boxes.float().cpu()
        out = []
        for i, im in enumerate(images):
            sx, sy = (max(im.width, im.height),) * 2 if self.owlv2 else (im.width, im.height)
            b = torchvision.ops.box_convert(cxcywh[i], "cxcywh", "xyxy") * torch.tensor([sx, sy, sx, sy])
            s = scores[i]
            keep = s >= c.conf
            b, s = b[keep], s[keep]
            keep = torchvision.ops.nms(b, s, c.iou)
            out.append(finalize(b[keep].numpy(), s[keep].numpy(), im.width, im.height, c.min_area, c.max_boxes))
        return out


def _ximgproc():
    import cv2

    if not hasattr(cv2, "ximgproc"):
        raise RuntimeError(
            "selective search needs OpenCV contrib (cv2.ximgproc), but the installed cv2 has none: ultralytics "
            "pulled opencv-python over it. Fix: pip install --force-reinstall --no-deps "
            "opencv-contrib-python-headless==<the opencv version installed>  (or `make install`)")
    return cv2


class SelectiveSearchDetector:
    """OpenCV contrib selective search ("fast" mode), weight-free class-agnostic proposals as in SoCo. The image
    is shrunk so its longest side is `imgsz`; score = 1 - rank / n in a random order that is the same in every run.

    OpenCV ranks its proposals by C's rand() x hierarchy level: the set is a function of the image, the order is
    not (another top --max-boxes in every run, actor and resume; seeding rand() does not hold in a process whose
    other threads call it, as Ray's do). So the set is put in a canonical order and shuffled by a seed drawn from
    the set itself: SoCo draws its proposals at random too."""

    def __init__(self, cfg: DetectorConfig):
        self.cv2 = _ximgproc()
        self.cfg = cfg
        self.cv2.setNumThreads(1)

    def _one(self, im) -> tuple[np.ndarray, np.ndarray]:
        cv2, c = self.cv2, self.cfg
        scale = min(1.0, (c.imgsz or max(im.size)) / max(im.size))
        small = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale)))) if scale < 1 else im
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(np.ascontiguousarray(np.asarray(small)[:, :, ::-1]))
        ss.switchToSelectiveSearchFast()
        rects = np.unique(np.asarray(ss.process(), np.int64).reshape(-1, 4), axis=0)  # canonical order
        if len(rects) == 0:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        seed = int.from_bytes(hashlib.blake2b(rects.tobytes(), digest_size=8).digest(), "little")
        r = rects[np.random.default_rng(seed).permutation(len(rects))].astype(np.float64)
        boxes = np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], 1) / scale
        scores = 1.0 - np.arange(len(r)) / len(r)
        return finalize(boxes, scores, im.width, im.height, c.min_area, c.max_boxes)

    def __call__(self, images: list) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self._one(im) for im in images]


class DetectorConfigError(ValueError):
    """A detector option or file is wrong; found in the driver before Ray starts or any output is created."""


def _check_weights(cfg: DetectorConfig) -> None:
    """The files each detector loads exist locally (weights are never downloaded, so a missing one can only fail
    later, inside a Ray actor, with pages of tracebacks)."""
    if cfg.name == "selective-search":
        return
    if not cfg.weights:
        what = "a local .pt file or exported model folder" if cfg.name == "yolo" else "a local OWL-ViT/OWLv2 folder"
        raise DetectorConfigError(f"--detector {cfg.name} needs --weights ({what})")
    w = Path(cfg.weights)
    if not w.exists():
        raise DetectorConfigError(f"--weights {cfg.weights}: no such file")
    if cfg.name == "yolo":
        _check_yolo_weights(cfg.weights, w)
    if cfg.name == "mavl" and not (w / "config.json").is_file():
        raise DetectorConfigError(f"--weights {cfg.weights}: not a model folder saved with save_pretrained (no "
                                  "config.json); --detector mavl needs a local OWL-ViT/OWLv2 folder")


# The names ultralytics takes for a model: ultralytics.engine.exporter.export_formats()["Suffix"] and ".mlmodel",
# matched anywhere in the lower-case name as AutoBackend._model_type does (a test keeps this list up to date;
# importing ultralytics here would cost the driver a second and patch PIL.Image.open).
YOLO_SUFFIXES = (".pt", ".torchscript", ".onnx", "_openvino_model", ".engine", ".mlpackage", ".mlmodel", ".aimodel",
                 "_saved_model", ".pb", ".tflite", "_paddle_model", ".mnn", "_ncnn_model", "_imx_model",
                 "_rknn_model", "_executorch_model", "_axelera_model", "_deepx_model", "_hailo_model",
                 "_ascend_model", "_xilinx_model")


def _check_yolo_weights(weights: str, w: Path) -> None:
    """The wrong kinds of --weights that are cheap to see: a name no ultralytics format has (a .parquet, a folder
    called `models`), and an empty folder. Anything else is loaded for real in each actor (YoloDetector)."""
    if not any(s in w.name.lower() for s in YOLO_SUFFIXES):
        raise DetectorConfigError(f"--weights {weights}: not a YOLO model (ultralytics loads a .pt file or an "
                                  "exported model, e.g. yolo11n.onnx or a yolo11n_openvino_model folder)")
    if w.is_dir() and not any(w.iterdir()):
        raise DetectorConfigError(f"--weights {weights}: an empty folder, not an exported YOLO model")


def _check_options(cfg: DetectorConfig) -> None:
    """Option values the detectors would reject (or silently misuse) later, in every actor."""
    bad = [f"--conf {cfg.conf}: expected 0..1" if not 0 <= cfg.conf <= 1 else None,
           f"--iou {cfg.iou}: expected 0..1" if not 0 <= cfg.iou <= 1 else None,
           f"--max-boxes {cfg.max_boxes}: expected >= 1" if cfg.max_boxes < 1 else None,
           f"--min-area {cfg.min_area}: expected 0..1" if not 0 <= cfg.min_area < 1 else None,
           f"--imgsz {cfg.imgsz}: expected >= 1" if cfg.imgsz is not None and cfg.imgsz < 1 else None,
           f"--device {cfg.device}: expected cpu or cuda[:N]" if not cfg.device.startswith(("cpu", "cuda")) else None]
    bad = [b for b in bad if b]
    if bad:
        raise DetectorConfigError("; ".join(bad))


def check_detector(cfg: DetectorConfig) -> None:
    """Fail early, in the driver, with a one-line message (a failure inside a Ray actor is harder to read, and
    would come after Ray started and the staging folder was made)."""
    if cfg.name not in DETECTORS:
        raise DetectorConfigError(f"unknown detector {cfg.name!r}, expected one of {DETECTORS}")
    _check_options(cfg)
    _check_weights(cfg)
    if cfg.name == "selective-search":
        _ximgproc()


def build_detector(cfg: DetectorConfig):
    """The detector for `cfg.name` (one of DETECTORS)."""
    if cfg.name == "yolo":
        return YoloDetector(cfg)
    if cfg.name == "mavl":
        return MavlDetector(cfg)
    if cfg.name == "selective-search":
        return SelectiveSearchDetector(cfg)
    raise ValueError(f"unknown detector {cfg.name!r}, expected one of {DETECTORS}")
