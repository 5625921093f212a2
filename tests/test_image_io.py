"""Image and label decoding: round trips, palette indices, and errors that name the file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.data.codecs.image_io import CorruptImageError, read_image, read_label, write_label


@pytest.fixture
def label() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 21, (23, 31))


def _rgb_array(seed: int = 0, shape: tuple[int, int] = (20, 28)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_grayscale_label_round_trips_all_byte_values(tmp_path):
    values = torch.arange(256).view(16, 16)
    write_label(tmp_path / "gray.png", values)
    assert Image.open(tmp_path / "gray.png").mode == "L"
    out = read_label(tmp_path / "gray.png")
    assert out.dtype == torch.int64
    assert torch.equal(out, values)


def test_palette_label_is_written_as_p_png_and_read_back_as_indices(tmp_path, label):
    palette = [(10 * i, 255 - 10 * i, 7) for i in range(21)]
    write_label(tmp_path / "sub" / "p.png", label, palette=palette)
    pil = Image.open(tmp_path / "sub" / "p.png")
    assert pil.mode == "P"
    assert pil.getpalette()[: 3 * 21] == [c for colour in palette for c in colour]
    assert torch.equal(read_label(tmp_path / "sub" / "p.png"), label)


@pytest.mark.parametrize("bits", [8, 4])
def test_palette_png_written_by_pil_reads_indices_not_colours(tmp_path, label, bits):
    # 4-bit palettes are what some tools write for <= 16 classes; libpng would rescale them.
    small = label % 16
    pil = Image.fromarray(small.numpy().astype(np.uint8))
    pil.putpalette([(37 * i + 11) % 256 for i in range(768)])
    pil.save(tmp_path / "l.png", bits=bits)
    assert torch.equal(read_label(tmp_path / "l.png"), small)


def test_16_bit_label_keeps_values_above_255(tmp_path):
    values = np.array([[0, 255, 256], [1000, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "l16.png")
    assert read_label(tmp_path / "l16.png").tolist() == values.astype(np.int64).tolist()


def test_unwidened_labels_keep_the_png_integer_type_and_values(tmp_path):
    eight = np.array([[0, 7, 255], [33, 1, 2]], dtype=np.uint8)
    sixteen = np.array([[0, 255, 256], [1000, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(eight).save(tmp_path / "l8.png")
    Image.fromarray(sixteen).save(tmp_path / "l16.png")
    narrow8, narrow16 = (read_label(tmp_path / f, widen=False) for f in ("l8.png", "l16.png"))
    assert narrow8.dtype == torch.uint8 and narrow8.tolist() == eight.tolist()
    assert narrow16.dtype == torch.uint16 and narrow16.to(torch.int64).tolist() == sixteen.tolist()


def test_rgb_label_with_equal_channels_reads_as_grayscale(tmp_path, label):
    gray = label.numpy().astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb_gray.png")
    assert torch.equal(read_label(tmp_path / "rgb_gray.png"), label)


def test_colour_label_is_rejected_naming_the_file(tmp_path):
    Image.fromarray(_rgb_array()).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png.*single-channel or palette"):
        read_label(tmp_path / "colour.png")


def test_write_label_rejects_values_outside_a_byte(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        write_label(tmp_path / "x.png", torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_label(tmp_path / "x.png", torch.zeros(1, 2, 2, dtype=torch.int64))
    assert not (tmp_path / "x.png").exists()


def test_read_image_png_matches_pil_exactly(tmp_path):
    array = _rgb_array()
    Image.fromarray(array).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 28)
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(array))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_read_image_converts_gray_alpha_and_palette_to_rgb(tmp_path, mode):
    pil = Image.fromarray(_rgb_array(1)).convert(mode)
    pil.save(tmp_path / "a.png")
    expected = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "a.png"), expected)


def test_read_image_jpeg_and_bmp_decode_to_pil_values(tmp_path):
    array = np.kron(_rgb_array(2, (4, 4)), np.ones((8, 8, 1), dtype=np.uint8))  # flat blocks
    Image.fromarray(array).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(array).save(tmp_path / "a.bmp")
    reference = torch.from_numpy(np.array(Image.open(tmp_path / "a.jpg").convert("RGB")))
    jpeg = read_image(tmp_path / "a.jpg").permute(1, 2, 0)
    # Two libjpeg builds may round the IDCT differently; allow a couple of levels.
    assert (jpeg.int() - reference.int()).abs().max() <= 3
    assert torch.equal(read_image(tmp_path / "a.bmp").permute(1, 2, 0), torch.from_numpy(array))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
@pytest.mark.parametrize("reader", [read_image, read_label])
def test_truncated_file_raises_corrupt_image_error_naming_it(tmp_path, suffix, reader):
    array = _rgb_array(3, (64, 64))
    if reader is read_label:
        array = array[..., 0]
    Image.fromarray(array).save(tmp_path / f"full.{suffix}")
    data = (tmp_path / f"full.{suffix}").read_bytes()
    broken = tmp_path / f"broken.{suffix}"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=rf"broken\.{suffix}.*expected"):
        reader(broken)


@pytest.mark.parametrize("content", [b"", b"not an image at all" * 20])
@pytest.mark.parametrize("reader", [read_image, read_label])
def test_empty_or_garbage_file_raises_corrupt_image_error(tmp_path, content, reader):
    path = tmp_path / "junk.png"
    path.write_bytes(content)
    with pytest.raises(CorruptImageError, match="junk.png"):
        reader(path)


@pytest.mark.parametrize("reader", [read_image, read_label])
def test_missing_file_raises_file_not_found_naming_it(tmp_path, reader):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        reader(tmp_path / "nowhere.png")


def test_corrupt_image_error_is_a_value_error():
    assert issubclass(CorruptImageError, ValueError)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(40), b"\xff\xd8\xff" + b"\x01" * 40])
@pytest.mark.parametrize("reader", [read_image, read_label])
def test_corrupt_image_error_carries_the_offending_path(tmp_path, content, reader):
    path = tmp_path / "sub" / "bad.png"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(CorruptImageError) as info:
        reader(str(path))
    assert info.value.path == path
    assert str(info.value).startswith(f"{path} is empty" if not content else f"cannot decode {path} (")
    copy = pickle.loads(pickle.dumps(info.value))  # as it crosses from a loader worker process
    assert copy.path == path and str(copy) == str(info.value)
    assert CorruptImageError("no file known").path is None
