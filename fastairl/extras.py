"""The one seam for optional dependencies: import lazily, or say which extra to install."""
from __future__ import annotations

import importlib

_NAMES = {"dali": "DALI", "ffcv": "FFCV", "opencv": "OpenCV", "sklearn": "scikit-learn", "skimage": "scikit-image"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


def require(extra: str, module: str):
    """Import `module`, part of the optional extra `extra`, or raise MissingExtra with the install line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        name = _NAMES.get(extra) or _NAMES.get(top, top)
        raise MissingExtra(f"{name} is not installed: pip install 'fastairl[{extra}]'") from None
