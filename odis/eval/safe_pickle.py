"""Reading a pickle that someone else made (the revisited Oxford/Paris ground truth) without running its code.

`pickle.load` calls whatever global a file names: `os.system` by way of `__reduce__` is one line. This loader
resolves a global only from a fixed allow-list, enough for containers of strings, numbers and numpy arrays:

    numpy.core.multiarray._reconstruct, numpy._core.multiarray._reconstruct   an ndarray, protocols 0-4
    numpy.ndarray, numpy.dtype (no object dtype)                               its class and dtype
    numpy.core.numeric._frombuffer, numpy._core.numeric._frombuffer            an ndarray, protocol 5
    numpy.core.multiarray.scalar, numpy._core.multiarray.scalar (no objects)   a numpy scalar
    _codecs.encode (latin-1 only)                                              bytes in a protocol-2 pickle

Lists, dicts, tuples, strings, bytes and numbers need no global. Any other global is refused with `UnsafePickle`
naming the file and the global, before anything is called; persistent ids are refused too.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


class UnsafePickle(ValueError):
    """A pickle names a global outside the allow-list; the message names the file and the global."""


def _dtype(obj, align=False, copy=False):
    d = np.dtype(obj, align, copy)
    if d.hasobject:
        raise pickle.UnpicklingError("numpy object dtype")
    return d


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy scalar of object dtype")
    return _multiarray.scalar(dtype, data)


def _latin1(text, encoding="latin1"):
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    **{(f"{m}.multiarray", "_reconstruct"): _multiarray._reconstruct for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.numeric", "_frombuffer"): _numeric._frombuffer for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.multiarray", "scalar"): _scalar for m in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}
ALLOWED_GLOBALS = tuple(f"{m}.{n}" for m, n in _ALLOWED)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose `find_class` knows only `ALLOWED_GLOBALS`."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays in a Python 2 pickle
        self.where = where

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickle(f"{self.where}: refused to unpickle the global {module}.{name} (only lists, dicts, "
                               "strings, numbers and numpy arrays are read; allowed globals: "
                               f"{', '.join(ALLOWED_GLOBALS)})")
        return found

    def persistent_load(self, pid):
        raise UnsafePickle(f"{self.where}: refused a persistent id in the pickle")


def safe_load(path: str | Path):
    """The object a pickle file holds, built from the allow-list only; UnsafePickle / ValueError naming the file
    otherwise (refused global, truncated or not a pickle)."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except UnsafePickle:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise ValueError(f"{path}: not a readable pickle of lists, dicts and arrays ({type(e).__name__}: "
                             f"{e})") from None
