"""`segtrain predict`'s inputs: the image list (folder, glob, file, list), duplicate stems, decoding
as training does (16-bit, grey, RGBA, EXIF orientation) and unreadable files dropped, not fatal."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.data.loader import LoaderOptions, build_eval_loader
from segtrain.inference.images import ImageFiles, SkippingCollate, Unreadable, list_images


def _save(path, shape=(6, 8), value=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((*shape, 3), value, np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for name in ("b.png", "a.JPG", "c.tiff", "d.webp", "e.bmp"):
        _save(root / name)
    (root / "notes.txt").write_text("not an image")
    (root / "labels.json").write_text("{}")
    _save(root / "sub" / "f.png")
    return root


def test_a_folder_gives_its_image_files_sorted_not_its_sub_folders(folder):
    assert [p.name for p in list_images(folder)] == ["a.JPG", "b.png", "c.tiff", "d.webp", "e.bmp"]


def test_a_glob_gives_matching_image_files_and_double_star_reaches_sub_folders(folder):
    assert [p.name for p in list_images(f"{folder}/*.png")] == ["b.png"]
    assert [p.name for p in list_images(f"{folder}/**/*.png")] == ["b.png", "f.png"]


def test_a_single_file_is_that_image(folder):
    assert list_images(folder / "b.png") == [folder / "b.png"]


def test_a_list_file_keeps_its_order_with_paths_relative_to_its_folder(folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen images\nimgs/e.bmp\n\n{folder / 'a.JPG'}\n  imgs/sub/f.png  \n")
    assert list_images(listing) == [folder / "e.bmp", folder / "a.JPG", folder / "sub" / "f.png"]


def test_a_list_naming_a_missing_file_is_an_error_naming_the_line(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("gone.png\n")
    with pytest.raises(FileNotFoundError, match=r"list.txt, line 1: image file not found: .*gone.png"):
        list_images(listing)


@pytest.mark.parametrize("spec", ["empty_dir", "nothing*.png", "missing_dir"])
def test_nothing_matching_is_an_error_naming_the_input(tmp_path, spec):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=re.escape(f"input={tmp_path / spec}")):
        list_images(tmp_path / spec)


def test_a_file_that_is_not_an_image_is_an_error(folder):
    with pytest.raises(ValueError, match="labels.json is not an image file"):
        list_images(folder / "labels.json")


def test_two_images_with_one_stem_are_an_error_naming_both(tmp_path):
    _save(tmp_path / "x" / "a.png")
    _save(tmp_path / "x" / "a.jpg")
    with pytest.raises(ValueError, match=r"a.jpg and .*a.png have the same stem 'a'"):
        list_images(tmp_path / "x")
    _save(tmp_path / "y" / "a.png")
    with pytest.raises(ValueError, match="same stem 'a'"):
        list_images(f"{tmp_path}/*/a.png")


def test_items_carry_index_size_and_stem_and_the_file_name(folder):
    dataset = ImageFiles(list_images(folder))
    image, target, name = dataset[1]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 6, 8)
    assert target["image_id"] == 1 and target["file_name"] == "b" and name == "b.png"
    assert target["orig_size"].tolist() == [6, 8] and target["orig_size"].dtype == torch.int64


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_grey_is_scaled_to_8_bits_as_training_reads_it(tmp_path, suffix):
    values = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / f"g.{suffix}")
    image, _, _ = ImageFiles([tmp_path / f"g.{suffix}"])[0]
    expected = torch.from_numpy((values >> 8).astype(np.uint8))
    assert all(torch.equal(image[c], expected) for c in range(3))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grey_alpha_and_palette_images_become_rgb(tmp_path, mode):
    _save(tmp_path / "m.png", value=102, mode=mode)  # 102: in PIL's web palette, no dithering
    image, _, _ = ImageFiles([tmp_path / "m.png"])[0]
    assert tuple(image.shape) == (3, 6, 8) and bool((image == 102).all())


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp", "tif"])
def test_exif_orientation_is_applied_as_viewers_show_the_picture(tmp_path, suffix):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    extra = {"tiffinfo": {274: 6}} if suffix == "tif" else {"exif": exif}
    Image.fromarray(pixels).save(tmp_path / f"r.{suffix}", **extra, **({"quality": 100} if suffix == "jpg"
                                                                      else {}))
    image, target, _ = ImageFiles([tmp_path / f"r.{suffix}"])[0]
    assert target["orig_size"].tolist() == [40, 20]
    assert image[:, :5].float().mean() > 240 and image[:, 15:].float().mean() < 15  # the band is on top


def test_a_corrupt_file_is_returned_as_unreadable_naming_it(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    item = ImageFiles([tmp_path / "bad.png"])[0]
    assert isinstance(item, Unreadable) and item.path.endswith("bad.png") and "cannot decode" in item.error


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loader_drops_unreadable_files_and_reports_them(tmp_path, num_workers):
    paths = [_save(tmp_path / f"{i}.png", value=i) for i in range(5)]
    paths[1].write_bytes(b"")  # empty
    paths[3].write_bytes(paths[3].read_bytes()[:30])  # truncated

    def collate(samples):
        return {"images": torch.stack([image for image, _ in samples])}

    loader = build_eval_loader(ImageFiles(paths), 2, SkippingCollate(collate, keep_images=True),
                               LoaderOptions(num_workers=num_workers))
    batches = list(loader)
    kept = [t["file_name"] for b in batches for t in b.targets]
    assert kept == ["0.png", "2.png", "4.png"]
    assert [s.path for b in batches for s in b.skipped] == [str(paths[1]), str(paths[3])]
    assert [b.batch["images"].shape[0] if b.batch else 0 for b in batches] == [1, 1, 1]
    assert all(len(b.images) == len(b.targets) for b in batches)
