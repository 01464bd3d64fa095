"""Built-in sample images for the dashboard: photos that ship inside the scikit-image wheel, plus images
drawn here with NumPy. None of them comes from the shared data set, and none needs the network.

Every sample is returned as encoded file bytes (PNG, JPEG or GIF), so it goes through exactly the same
:func:`skipviz.load_image` path as an upload.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Sample:
    """A built-in image: ``name`` shown in the picker, ``source`` saying where it comes from."""

    name: str
    source: str
    make: Callable[[], bytes]


def _png(arr: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 array -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _skimage_file(filename: str) -> Callable[[], bytes]:
    """A photo bundled in the scikit-image wheel, read as a file: no ``skimage.data`` import (it loads scipy)
    and no download."""

    def make() -> bytes:
        from pathlib import Path

        import skimage

        return (Path(skimage.__file__).parent / "data" / filename).read_bytes()

    return make


def draw_sky_and_sea(size: int = 128) -> np.ndarray:
    """A drawn scene: blue sky, darker sea, a grey hull. Returns (size, size, 3) uint8."""
    y = np.linspace(0.0, 1.0, size)[:, None]
    img = np.zeros((size, size, 3), dtype=np.float64)
    sky = y < 0.55
    img[..., 0] = np.where(sky, 0.45 + 0.3 * y, 0.05)
    img[..., 1] = np.where(sky, 0.65 + 0.2 * y, 0.25 + 0.1 * y)
    img[..., 2] = np.where(sky, 0.95, 0.45 + 0.1 * y)
    yy, xx = np.mgrid[0:size, 0:size] / size
    hull = (yy > 0.48) & (yy < 0.6) & (np.abs(xx - 0.5) < 0.3 - (yy - 0.48))
    img[hull] = (0.55, 0.55, 0.58)
    cabin = (yy > 0.38) & (yy <= 0.48) & (np.abs(xx - 0.45) < 0.1)
    img[cabin] = (0.9, 0.9, 0.9)
    return (img * 255).clip(0, 255).astype(np.uint8)


def draw_noise(size: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth seeded colour noise (an out-of-distribution input). Returns (size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((8, 8, 3))
    img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
    return img


SAMPLES: dict[str, Sample] = {s.name: s for s in [
    Sample("cat (scikit-image 'chelsea')", "scikit-image bundled photo", _skimage_file("chelsea.png")),
    Sample("rocket (scikit-image)", "scikit-image bundled photo", _skimage_file("rocket.jpg")),
    Sample("coffee (scikit-image)", "scikit-image bundled photo", _skimage_file("coffee.png")),
    Sample("astronaut (scikit-image)", "scikit-image bundled photo", _skimage_file("astronaut.png")),
    Sample("motorcycle (scikit-image)", "scikit-image bundled photo (stereo left view)",
           _skimage_file("motorcycle_left.png")),
    Sample("animated GIF (scikit-image, first frame)", "scikit-image bundled GIF",
           _skimage_file("no_time_for_that_tiny.gif")),
    Sample("ship (drawn)", "drawn by skipviz.samples.draw_sky_and_sea", lambda: _png(draw_sky_and_sea())),
    Sample("colour noise (drawn)", "drawn by skipviz.samples.draw_noise", lambda: _png(draw_noise())),
]}


def sample_names() -> list[str]:
    """The picker's choices, in display order."""
    return list(SAMPLES)


@lru_cache(maxsize=None)
def sample_bytes(name: str) -> bytes:
    """Encoded bytes of a built-in sample (cached); ``KeyError`` for an unknown name."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; choose one of {sample_names()}")
    return SAMPLES[name].make()
