"""Reading untrusted images: every failure becomes an :class:`ImageLoadError` with a clear message.

Handles any size and mode: grayscale, RGBA/LA (composited on white), palette, 16/32-bit integer and float
images (rescaled to 8 bit), CMYK, EXIF orientation; animated images use their first frame. Refuses empty
files, files over ``max_bytes``, paths that are not regular files (devices, pipes), non-images, truncated files,
and extreme aspect ratios (over ``max_aspect``: a 39,000,000 x 1 PNG is 113 KB, but resizing its short side for a
model would ask for gigabytes).

Large photos: a JPEG is decoded at a reduced size (``Image.draft``: the decoder scales by 1/2, 1/4 or 1/8 in
the DCT domain) whenever its short side stays >= ``min_side`` (default 1024 pixels, four times what an ImageNet
model's preprocessing keeps), so a 50 MP camera JPEG opens in a fraction of a second. An image is refused as a
decompression bomb only when decoding what remains would really exhaust memory: the estimated peak of decoding
and converting it (decoded frame plus working copies, by mode) over ``max_decode_bytes`` (default 1 GiB), or
more pixels than Pillow itself will open (``2 * Image.MAX_IMAGE_PIXELS``, about 179 MP).
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

MAX_BYTES = 50 * 1024 * 1024
MAX_DECODE_BYTES = 1024**3  # estimated peak memory of decoding one image (after any reduced-size decoding)
MAX_ASPECT = 200.0  # long side / short side: panoramas pass, 1-pixel-high strips do not
DRAFT_MIN_SIDE = 1024  # a JPEG is decoded at 1/2, 1/4 or 1/8 scale while its short side stays at least this

#: The file name suffixes of the image formats this module reads and the dashboard's uploaders accept (Pillow's
#: decoders for them are built in): every still and animated format users meet, TIFF and ICO included.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".pcx")

# Bytes per pixel at the peak of decoding and converting to RGB, by decoded mode: the decoded frame, plus the
# copies _to_rgb and the EXIF rotation make (float32 rescaling for 16/32-bit, an RGBA composite for alpha).
_PEAK_BYTES_PER_PIXEL = {"1": 7, "L": 7, "P": 17, "RGB": 9, "YCbCr": 9, "LAB": 9, "HSV": 9, "CMYK": 10,
                         "RGBA": 16, "LA": 16, "PA": 16, "RGBa": 16, "La": 16, "I;16": 14, "I;16B": 14, "I;16L": 14,
                         "I;16N": 14, "I": 16, "F": 16}


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
    decoded_width: int = 0  # the size actually decoded (smaller than width x height after a reduced-size decode)
    decoded_height: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.array(im, dtype=np.float32)  # one float32 copy, then in place: a large 16-bit scan stays in budget
        finite = np.isfinite(arr)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        if hi <= lo:
            arr[...] = 0.0
        else:
            np.nan_to_num(arr, copy=False, nan=lo, posinf=hi, neginf=lo)
            arr -= lo
            arr *= 255.0 / (hi - lo)
        im = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def read_bytes(source: str | Path | bytes | BinaryIO, max_bytes: int = MAX_BYTES,
               name: str | None = None) -> tuple[bytes, str]:
    """Raw bytes and a display name from a path, bytes or a file-like object (size-checked). ``name``: what
    messages call the input (an upload's file name); default: the path's name, else ``<bytes>``."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), name or "<bytes>"
    elif isinstance(source, (str, Path)):
        p = Path(source)
        try:
            info = os.stat(p)  # one stat (following links) answers every check below: audits read thousands
        except ValueError:  # e.g. a NUL byte in the path
            raise ImageLoadError(f"{p}: no such file") from None
        except OSError as e:  # what Path.exists() answers False for: missing, not a folder, a link loop
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                raise ImageLoadError(f"{p}: no such file") from None
            raise
        if stat.S_ISDIR(info.st_mode):
            raise ImageLoadError(f"{p}: is a folder, not an image")
        if not stat.S_ISREG(info.st_mode):  # a device, pipe or socket: its size says nothing about what a read returns
            raise ImageLoadError(f"{p}: not a regular file")
        name = name or p.name
        size = info.st_size
        if size > max_bytes:
            raise ImageLoadError(f"{name}: file is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit")
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)  # bounded even if the file grows meanwhile
    else:
        data = source.read(max_bytes + 1)
        name = name or getattr(source, "name", "<upload>")
    if len(data) > max_bytes:
        raise ImageLoadError(f"{name}: file is over the {max_bytes / 2**20:.0f} MiB limit")
    if not data:
        raise ImageLoadError(f"{name}: file is empty (0 bytes)")
    return data, str(name)


def peak_decode_bytes(mode: str, width: int, height: int) -> int:
    """Estimated peak memory (bytes) of decoding a ``width`` x ``height`` image of ``mode`` and converting it to
    RGB (:data:`_PEAK_BYTES_PER_PIXEL`; 16 bytes per pixel for a mode not listed)."""
    return int(width) * int(height) * _PEAK_BYTES_PER_PIXEL.get(mode, 16)


def load_image(source: str | Path | bytes | BinaryIO, max_bytes: int = MAX_BYTES,
               max_decode_bytes: int = MAX_DECODE_BYTES, max_aspect: float = MAX_ASPECT,
               min_side: int | None = DRAFT_MIN_SIDE, name: str | None = None,
               sha256: str | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode an untrusted image to RGB. Returns ``(image, info)``; raises :class:`ImageLoadError`.

    ``min_side``: a JPEG is decoded at reduced size while its short side stays >= this (``None``: always at
    full size); ``info`` keeps the file's own size and records the decoded one. ``name``: what messages call
    the input (an upload's file name; default the path's name, or ``<bytes>``). ``sha256``: the hex digest of
    ``source``'s bytes when the caller has already computed it (``info.sha256``; otherwise computed here).
    """
    data, name = read_bytes(source, max_bytes, name)
    digest = sha256 or hashlib.sha256(data).hexdigest()
    frames = 1
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 MP; the limit that matters here is the memory estimate below, after any
            # reduced-size decoding (Pillow still refuses outright above about 179 MP, at open)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            w, h = im.size
            if max(w, h) > max_aspect * max(1, min(w, h)):
                raise ImageLoadError(f"{name}: {w}x{h} pixels has an aspect ratio over {max_aspect:g}:1 (resizing "
                                     "its short side for a model would need an image of extreme length)")
            if min_side and fmt == "JPEG" and min(w, h) >= 2 * min_side:
                im.draft(im.mode, (min_side, min_side))  # the largest DCT scaling that keeps both sides >= min_side
            dw, dh = im.size
            need = peak_decode_bytes(im.mode, dw, dh)
            if need > max_decode_bytes:
                raise ImageLoadError(f"{name}: {w}x{h} pixels ({im.mode}) would need about {need / 2**30:.1f} GiB to "
                                     f"decode, over the {max_decode_bytes / 2**30:.1f} GiB memory limit (possible "
                                     "decompression bomb)")
            frames = int(getattr(im, "n_frames", 1))
            if frames > 1:
                im.seek(0)
            im.load()
            mode = im.mode
            if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # without a rotation: no copy (audits decode
                im = ImageOps.exif_transpose(im)                      # thousands of images)
            rgb = _to_rgb(im)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{name}: refused as a decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name}: not a recognised image format") from e
    except MemoryError as e:
        raise ImageLoadError(f"{name}: out of memory decoding this image") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{name}: image is damaged or truncated ({e})") from e
    return rgb, ImageInfo(sha256=digest, format=fmt, width=w, height=h, mode=mode, n_bytes=len(data),
                          frames=frames, name=name, decoded_width=dw, decoded_height=dh)
