"""libpng through ctypes (`segtrain.utils.png`): samples exactly as stored, or None where PIL must decode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from segtrain.utils import png


def encode(pixels: np.ndarray, mode: str | None, **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, mode) if mode else Image.fromarray(pixels)
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """data with a chunk inserted right after IHDR (8 + 25 bytes)."""
    chunk = struct.pack(">I4s", len(payload), kind) + payload
    chunk += struct.pack(">I", zlib.crc32(kind + payload))
    return data[:33] + chunk + data[33:]


def random_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_libpng_loads_here():
    # torchvision's and Pillow's wheels both bundle libpng 1.6: without it every PNG goes to PIL.
    assert png.libpng_available()


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("RGBA", 4)])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (37, 53)])
def test_samples_equal_pils_for_rgb_and_rgba(mode, channels, shape):
    pixels = random_pixels((*shape, channels))
    if mode == "RGBA":
        pixels[..., 3].flat[:3] = (0, 1, 254)  # colours under (almost) transparent alpha stay as stored
    decoded = png.decode_rgb(encode(pixels, mode))
    assert decoded.dtype == np.uint8 and decoded.shape == (*shape, channels)
    np.testing.assert_array_equal(decoded, pixels)


def test_decodes_into_the_given_buffer_when_it_fits():
    first, second = random_pixels((5, 6, 3), 1), random_pixels((5, 6, 3), 2)
    buffer = png.decode_rgb(encode(first, "RGB"))
    again = png.decode_rgb(encode(second, "RGB"), buffer)
    assert again is buffer
    np.testing.assert_array_equal(again, second)
    other = png.decode_rgb(encode(random_pixels((6, 5, 3)), "RGB"), buffer)  # another shape: a new array
    assert other is not buffer and other.shape == (6, 5, 3)


def test_plain_chunks_keep_the_fast_path():
    pixels = random_pixels((4, 4, 3))
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "segtrain")
    data = with_chunk(encode(pixels, "RGB", pnginfo=info, dpi=(72, 72)), b"sRGB", b"\x00")
    np.testing.assert_array_equal(png.decode_rgb(data), pixels)


@pytest.mark.parametrize("kind, payload", [
    (b"gAMA", struct.pack(">I", 100000)),  # gamma 1.0: libpng would re-encode every sample to sRGB
    (b"tRNS", struct.pack(">HHH", 1, 2, 3)),  # a transparent colour key
    (b"sBIT", b"\x05\x05\x05"),
    (b"cHRM", bytes(32)),
    (b"iCCP", b"p\x00\x00" + zlib.compress(b"profile")),
])
def test_chunks_that_could_change_samples_decline(kind, payload):
    data = with_chunk(encode(random_pixels((4, 4, 3)), "RGB"), kind, payload)
    assert png.decode_rgb(data) is None


def test_gamma_chunk_would_change_samples_through_libpng():
    """Why gAMA declines: the simplified API converts to sRGB (checked against libpng itself)."""
    pixels = (np.arange(3 * 16 * 16) % 251).astype(np.uint8).reshape(16, 16, 3)
    data = with_chunk(encode(pixels, "RGB"), b"gAMA", struct.pack(">I", 100000))
    lib = png._libpng()
    image = png._PngImage(version=1)
    assert lib.png_image_begin_read_from_memory(png.ctypes.byref(image), data, len(data))
    image.format = 0x02
    out = np.empty_like(pixels)
    assert lib.png_image_finish_read(png.ctypes.byref(image), None, out.ctypes.data, 16 * 3, None)
    assert not np.array_equal(out, pixels)


@pytest.mark.parametrize("mode, pixels", [
    ("L", random_pixels((4, 4))),
    ("P", random_pixels((4, 4)) % 16),
    (None, np.arange(16, dtype=np.uint16).reshape(4, 4)),  # 16-bit grey
])
def test_other_colour_types_and_depths_decline(mode, pixels):
    assert png.decode_rgb(encode(pixels, mode)) is None


def test_not_a_png_declines():
    assert png.decode_rgb(b"GIF89a" + bytes(40)) is None
    assert png.decode_rgb(b"") is None


def test_corrupt_image_data_raises_with_libpngs_message():
    data = bytearray(encode(random_pixels((32, 32, 3)), "RGB"))
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 30] = bytes(20)  # zlib stream damaged (the chunk CRC too)
    with pytest.raises(ValueError, match="libpng: "):
        png.decode_rgb(bytes(data))


def test_truncated_file_raises():
    data = encode(random_pixels((32, 32, 3)), "RGB")
    with pytest.raises(ValueError, match="libpng: "):
        png.decode_rgb(data[: len(data) // 2])


def test_without_libpng_everything_declines(monkeypatch):
    monkeypatch.setattr(png, "_libpng", lambda: None)
    assert not png.libpng_available()
    assert png.decode_rgb(encode(random_pixels((4, 4, 3)), "RGB")) is None
