"""Installed package versions, read from package metadata (no import: torchvision's costs ~2 s)."""
from __future__ import annotations

from importlib import metadata


def package_version(name: str) -> str:
    """The installed version of distribution ``name`` (e.g. ``"0.29.1+cu130"``), or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


#: The package's version (``skipviz.__version__``), here so that modules below the package root can record it.
__version__ = "0.1.0"
