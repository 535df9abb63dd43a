"""The OBJ token's last-block attention over an image (paper Fig. 10/11), with or without a box."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from odis.eval.features import box_view, eval_view, eval_view_box, input_size


@torch.inference_mode()
def obj_attention_maps(model, img: Image.Image, box=None, size: int | None = None):
    """(eval view [PIL size x size], attention [heads, gh, gw] numpy, box in the view's pixels or None).

    With a box, the OBJ token attends only to the box's patches (mode `mask`), as in training; without, it is the
    plain CLS attention over the whole view.
    """
    size = input_size(model, size)
    img = img.convert("RGB")
    v = box_view(img, box, "mask" if box is not None else "none", size, patch=model.patch_size)
    if box is not None and v.obj_mask is None:
        raise ValueError(f"the box {list(box)} lies outside the centre-cropped view ({v.fallback})")
    device = next(model.parameters()).device
    m = v.obj_mask[None].to(device) if v.obj_mask is not None else None
    att = model.eval().obj_attention(v.image[None].to(device), obj_mask=m)
    vbox = eval_view_box(img.width, img.height, np.asarray(box, float), size) if box is not None else None
    return eval_view(img, size), att[0].float().cpu().numpy(), vbox
