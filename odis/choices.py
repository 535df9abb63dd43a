"""The named choices of the library's options, with the one default that has to be shared, in a module without
torch: the modules that use a choice check it (odis/model.py, odis/distill.py, odis/views.py) and trainer/config.py
validates a recipe against the same tuples without loading torch and timm.
"""
from __future__ import annotations

METHODS = ("odis", "ibot", "dino")
# The OBJ-masked attention's two implementations, equal in their outputs (odis/model.py): `split` keeps flash
# attention for the patch rows; compiled, `mask` (one SDPA call) is the faster, the GPU recipes' choice.
ATTN_IMPLS = ("mask", "split")
DEFAULT_ATTN_IMPL = "split"
CENTERINGS = ("center", "sinkhorn")  # iBOT/ODIS's EMA center, or DINOv2's Sinkhorn-Knopp


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """`value`, or a ValueError naming `name` and its choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
