"""Decoding images and label maps from disk, with errors that name the offending file."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import io as tvio
from torchvision import tv_tensors

from segtrain.utils.files import write_atomically

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY, _PNG_PALETTE = 0, 3
# torchvision decodes these natively (JPEG ~1.5x, PNG ~1.2x faster than PIL, measured);
# anything else (BMP, TIFF, ...) goes through PIL.
_TV_FORMATS = (_PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF8", b"RIFF")
# Those whose EXIF orientation torchvision applies (not WebP's): the others go through PIL then.
_TV_EXIF_FORMATS = _TV_FORMATS[:2]
# torchvision 0.29 deprecates its image codecs (every call warns); while they exist they are the
# faster path, and once they are gone PIL takes over.
_TV_CODECS = hasattr(tvio, "decode_image") and hasattr(tvio, "decode_png")
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)
_PIL_INDEX_MODES = ("P", "L", "I;16", "I;16B", "I;16L", "I", "1")
_PIL_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # "I": PIL's mode for some 16-bit files


class CorruptImageError(ValueError):
    """A file exists but cannot be decoded as the image or label map it should hold.

    `path` is the offending file (None when unknown: an error re-raised from a DataLoader
    worker is rebuilt from its message alone).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def read_image(path: str | os.PathLike, exif_orientation: bool = False) -> tv_tensors.Image:
    """Decode an image file to RGB: uint8 (3, H, W); grayscale, palette and alpha become RGB,
    16-bit values are scaled to 8 bits (value >> 8).

    exif_orientation: turn the pixels as the file's EXIF Orientation tag says, i.e. as image
    viewers show the picture (`segtrain predict`). Off by default: datasets' annotations refer to
    the stored pixel order, which is what training reads.

    Raises FileNotFoundError for a missing file and CorruptImageError for one that does not
    decode (truncated, empty, not an image).
    """
    path = Path(path)
    data = _read_bytes(path, "image")
    try:
        tv_decodes = data.startswith(_TV_EXIF_FORMATS if exif_orientation else _TV_FORMATS)
        if _TV_CODECS and tv_decodes:
            image = tvio.decode_image(
                torch.frombuffer(data, dtype=torch.uint8), mode=tvio.ImageReadMode.RGB,
                apply_exif_orientation=exif_orientation,
            )
            if image.dtype != torch.uint8:  # 16-bit PNG
                image = (image.to(torch.int32) >> 8).to(torch.uint8)
        else:
            with Image.open(io.BytesIO(data)) as pil:
                image = _pil_rgb(ImageOps.exif_transpose(pil) if exif_orientation else pil)
    # Decoders raise a zoo of types (RuntimeError, OSError, SyntaxError, zlib.error, ...);
    # each of them means the same thing to the caller.
    except Exception as err:
        raise _corrupt(path, "an RGB, grayscale or palette image (PNG, JPEG, ...)", err) from err
    # decode_image's (3, H, W) is a view of interleaved (H, W, 3) memory; kept as it is (a copy to
    # planar costs ~20% of a 2048x1024 PNG sample): transforms take either layout and
    # collate's stack writes batches contiguous.
    return tv_tensors.Image(image)


def read_label(path: str | os.PathLike, widen: bool = True) -> torch.Tensor:
    """Decode a label map: int64 (H, W) holding the stored pixel values.

    widen=False keeps a PNG's own integer type (uint8 or uint16) where torchvision decodes it,
    for callers that map values through a table first (8x fewer bytes than int64).

    Single-channel PNGs (8 or 16 bit) give their values, palette ('P') PNGs their palette
    indices, not colours. A colour image whose channels are all equal is read as grayscale;
    any other colour image is a ValueError (labels must be indices, not a colour rendering).
    """
    path = Path(path)
    data = _read_bytes(path, "label")
    try:
        if _TV_CODECS and _is_8_or_16_bit_index_png(data):
            label = tvio.decode_png(
                torch.frombuffer(data, dtype=torch.uint8), mode=tvio.ImageReadMode.UNCHANGED
            )[0]
            return label.to(torch.int64) if widen else label
        # PIL keeps palette indices and 1-, 2-, 4-bit values as stored; libpng (torchvision)
        # would rescale low bit depths to 0..255.
        with Image.open(io.BytesIO(data)) as pil:
            mode = pil.mode
            if mode not in _PIL_INDEX_MODES + ("LA", "PA", "RGB", "RGBA"):
                pil, mode = pil.convert("RGB"), "RGB"
            array = np.array(pil)
    except Exception as err:
        raise _corrupt(path, "a single-channel or palette PNG of class indices", err) from err
    return _label_from_array(array, mode, path)


def write_label(
    path: str | os.PathLike,
    label: torch.Tensor | np.ndarray,
    palette: Sequence[Sequence[int]] | None = None,
    atomic: bool = False,
) -> None:
    """Write an (H, W) label map of ints in 0..255 as an 8-bit PNG.

    With `palette` (up to 256 RGB colours, the rest black) the PNG is a palette PNG whose
    indices are the labels, as VOC stores them; otherwise a grayscale PNG. Parent directories
    are created. atomic: through a temporary file renamed over `path` (`write_atomically`).
    """
    path = Path(path)
    label = torch.as_tensor(label)
    if label.ndim != 2:
        raise ValueError(
            f"write_label({path}): label has shape {tuple(label.shape)}; expected (H, W)"
        )
    if label.is_floating_point() or label.is_complex():
        raise ValueError(f"write_label({path}): label dtype is {label.dtype}; expected integers")
    if label.numel() and (int(label.min()) < 0 or int(label.max()) > 255):
        raise ValueError(
            f"write_label({path}): values span {int(label.min())}..{int(label.max())}; "
            "an 8-bit PNG holds 0..255"
        )
    image = Image.fromarray(label.to(torch.uint8).cpu().numpy())  # mode "L"
    if palette is not None:
        image.putpalette(_flat_palette(palette, path))  # turns the image into mode "P"
    if atomic:
        write_atomically(path, lambda f: image.save(f, format="PNG"), binary=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _pil_rgb(pil: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W) of a PIL image; 16-bit grayscale scaled as the PNG path does (PIL's own
    conversion would clip every value above 255 to white)."""
    if pil.mode in _PIL_16_BIT_MODES:
        grey = (np.array(pil).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return torch.from_numpy(grey).expand(3, *grey.shape).contiguous()
    return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)


def _read_bytes(path: Path, what: str) -> bytearray:
    try:
        # bytearray: torch.frombuffer wants a writable buffer.
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    if not data:
        raise CorruptImageError(f"{path} is empty; expected an encoded {what} file", path)
    return data


def _flat_palette(palette: Sequence[Sequence[int]], path: Path) -> list[int]:
    flat = [int(c) for colour in palette for c in colour]
    if len(palette) > 256 or len(flat) != 3 * len(palette) or not all(0 <= c <= 255 for c in flat):
        raise ValueError(
            f"write_label({path}): palette has {len(palette)} entries; expected at most 256 "
            "(r, g, b) tuples of ints in 0..255"
        )
    return flat + [0] * (768 - len(flat))


def _is_8_or_16_bit_index_png(data: bytearray) -> bool:
    """Grayscale (8/16 bit) or 8-bit palette PNG, read from the IHDR chunk."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 26:
        return False
    bit_depth, colour_type = data[24], data[25]
    if colour_type == _PNG_GRAY:
        return bit_depth in (8, 16)
    return colour_type == _PNG_PALETTE and bit_depth == 8


def _label_from_array(array: np.ndarray, mode: str, path: Path) -> torch.Tensor:
    if mode in _PIL_INDEX_MODES:
        return torch.from_numpy(array.astype(np.int64))
    if mode in ("LA", "PA"):  # the alpha channel says nothing about the class
        return torch.from_numpy(array[..., 0].astype(np.int64))
    rgb = array[..., :3]
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return torch.from_numpy(rgb[..., 0].astype(np.int64))
    raise ValueError(
        f"{path} is a {mode} colour image; expected a single-channel or palette PNG whose "
        "pixel values are class indices (convert colour renderings back to indices first)"
    )


def _corrupt(path: Path, expected: str, err: Exception) -> CorruptImageError:
    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return CorruptImageError(
        f"cannot decode {path} ({reason}); expected {expected}. The file may be truncated or "
        "not an image",
        path,
    )
