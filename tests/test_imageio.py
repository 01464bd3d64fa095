"""Untrusted images: every mode and size becomes RGB; bad files give clear errors."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from skipviz import ImageLoadError, load_image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no pixel data to be refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb(mode):
    arr = (np.arange(40 * 30) % 255).reshape(30, 40).astype(np.uint8)
    im = Image.fromarray(arr).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "I;16") else "PNG"
    rgb, info = load_image(encode(im, fmt))
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    assert info.width == 40 and info.height == 30 and len(info.sha256) == 64


def test_sixteen_bit_png_is_rescaled_not_clipped():
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb, _ = load_image(encode(Image.fromarray(arr), "PNG"))
    out = np.asarray(rgb)
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 100


def test_exif_rotation_is_applied():
    im = Image.new("RGB", (60, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb, info = load_image(encode(im, "JPEG", exif=exif.tobytes()))
    assert rgb.size == (20, 60) and info.width == 60


def test_gif_first_frame_and_transparency_on_white():
    frames = [Image.new("RGB", (8, 8), (80 * i, 200 - 60 * i, 30)) for i in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    rgb, info = load_image(data)
    assert info.frames == 3 and rgb.size == (8, 8)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(encode(clear, "PNG"))[0].getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, this is not an image at all", "not a recognised image"),
    (b"%PDF-1.4 fake", "not a recognised image"),
])
def test_bad_bytes_give_clear_errors(data, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(data)


def test_truncated_jpeg_is_refused():
    data = encode(Image.new("RGB", (64, 64), "blue"), "JPEG")
    with pytest.raises(ImageLoadError, match="damaged or truncated"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(png_header_only(20000, 20000))
    # 12,000 x 12,000 RGB (144 MP) would need about 1.2 GiB to decode: refused from the header, before decoding
    with pytest.raises(ImageLoadError, match="12000x12000 pixels .RGB. would need about 1.2 GiB"):
        load_image(png_header_only(12000, 12000))
    # 9,000 x 9,000 (81 MP, a large camera photo) fits the budget: this one is refused only for its missing pixels
    with pytest.raises(ImageLoadError, match="damaged or truncated"):
        load_image(png_header_only(9000, 9000))


def test_file_size_limit_and_missing_paths(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x00" * 2048)
    with pytest.raises(ImageLoadError, match="over the"):
        load_image(big, max_bytes=1024)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


def test_extreme_aspect_ratio_is_refused_before_resizing():
    # 113 KB can hold a 39,000,000 x 1 PNG: its pixel count passes, resizing its short side would not
    strip = png_header_only(4_000_000, 1)
    with pytest.raises(ImageLoadError, match="aspect ratio over 200:1"):
        load_image(strip)
    load_image(encode(Image.new("RGB", (600, 3)), "PNG"))  # a 200:1 strip still loads


def test_paths_that_are_not_regular_files_are_refused(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block: it must be refused without opening it
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)
    if os.path.exists("/dev/zero"):
        with pytest.raises(ImageLoadError, match="not a regular file"):
            load_image("/dev/zero")


def test_every_listed_suffix_is_a_format_load_image_reads():
    from PIL import features

    from skipviz._imageio import IMAGE_SUFFIXES

    formats = Image.registered_extensions()
    src = Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3))
    for suffix in IMAGE_SUFFIXES:
        fmt = formats[suffix]
        if fmt == "WEBP" and not features.check("webp"):
            continue
        buf = io.BytesIO()
        src.save(buf, format=fmt)
        im, info = load_image(buf.getvalue(), name=f"x{suffix}")
        assert im.size == (32, 32) and im.mode == "RGB", suffix


def test_a_link_loop_or_a_nul_byte_in_a_path_is_no_such_file(tmp_path):
    import os

    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)  # points at itself
    for path in (loop, str(tmp_path / "a\0b.jpg"), tmp_path / "missing.jpg", tmp_path / "loop.jpg" / "x.jpg"):
        with pytest.raises(ImageLoadError, match="no such file"):
            load_image(path)
