"""The optional C part of `odis shard` (_fastpack.c, built by setup.py when a C compiler is at hand).

It writes the same bytes as the Python code it stands in for (tests/test_shard_native.py runs both); set
ODIS_SHARD_NATIVE=0 to run the Python code alone."""
from __future__ import annotations

import os
from typing import Callable

NATIVE_ENV = "ODIS_SHARD_NATIVE"


def native(name: str) -> Callable | None:
    """_fastpack's function `name`, or None when the module is not built or NATIVE_ENV is "0"."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    try:
        from odis.pipelines.shard import _fastpack
    except ImportError:  # installed without a C compiler
        return None
    return getattr(_fastpack, name)
