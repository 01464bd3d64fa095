"""Reading untrusted images: every failure becomes an :class:`ImageLoadError` with a clear message.

Handles any size and mode: grayscale, RGBA/LA (composited on white), palette, 16/32-bit integer and float
images (rescaled to 8 bit), CMYK, EXIF orientation; animated images use their first frame. Refuses empty
files, files over ``max_bytes``, paths that are not regular files (devices, pipes), non-images, truncated files,
decompression bombs (over ``max_pixels``) and extreme aspect ratios (over ``max_aspect``: a 39,000,000 x 1 PNG is
113 KB, but resizing its short side for a model would ask for gigabytes).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 40 MP: large photos pass, 20000 x 20000 bombs do not
MAX_ASPECT = 200.0  # long side / short side: panoramas pass, 1-pixel-high strips do not


class ImageLoadError(ValueError):
    """The input could not be read as an image; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    """What was read: hash of the raw bytes, container format, original size and mode."""

    sha256: str
    format: str
    width: int
    height: int
    mode: str
    n_bytes: int
    frames: int
    name: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        im = Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def read_bytes(source: str | Path | bytes | BinaryIO, max_bytes: int = MAX_BYTES) -> tuple[bytes, str]:
    """Raw bytes and a display name from a path, bytes or a file-like object (size-checked)."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "<bytes>"
    elif isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise ImageLoadError(f"{p}: no such file")
        if p.is_dir():
            raise ImageLoadError(f"{p}: is a folder, not an image")
        if not p.is_file():  # a device, pipe or socket: its size says nothing about what a read returns
            raise ImageLoadError(f"{p}: not a regular file")
        size = p.stat().st_size
        if size > max_bytes:
            raise ImageLoadError(f"{p.name}: file is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit")
        with p.open("rb") as f:
            data, name = f.read(max_bytes + 1), p.name  # bounded even if the file grows meanwhile
    else:
        data = source.read(max_bytes + 1)
        name = getattr(source, "name", "<upload>")
    if len(data) > max_bytes:
        raise ImageLoadError(f"{name}: file is over the {max_bytes / 2**20:.0f} MiB limit")
    if not data:
        raise ImageLoadError(f"{name}: file is empty (0 bytes)")
    return data, str(name)


def load_image(source: str | Path | bytes | BinaryIO, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> tuple[Image.Image, ImageInfo]:
    """Decode an untrusted image to RGB. Returns ``(image, info)``; raises :class:`ImageLoadError`."""
    data, name = read_bytes(source, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            w, h = im.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{name}: {w}x{h} pixels is over the {max_pixels:,}-pixel limit "
                                     "(possible decompression bomb)")
            if max(w, h) > max_aspect * max(1, min(w, h)):
                raise ImageLoadError(f"{name}: {w}x{h} pixels has an aspect ratio over {max_aspect:g}:1 (resizing "
                                     "its short side for a model would need an image of extreme length)")
            frames = int(getattr(im, "n_frames", 1))
            if frames > 1:
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{name}: refused as a decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name}: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{name}: image is damaged or truncated ({e})") from e
    return rgb, ImageInfo(sha256=digest, format=fmt, width=w, height=h, mode=im.mode if im else "", n_bytes=len(data),
                          frames=frames, name=name)
