"""Image folders: robust decoding of real-world files, labeled layouts, errors, and the decoded-tensor cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adaptsoup.core.data as data_module
from adaptsoup.core.data import Preprocess, load_folder, scan_images
from adaptsoup.errors import DataError

from helpers import MEAN, MESSY_BAD, MESSY_GOOD, STD, write_noise_images

PRE = Preprocess(size=(32, 32), mean=MEAN, std=STD)


def _pixel(images, paths, name) -> torch.Tensor:
    return images[paths.index(name)]


def test_messy_folder_decodes_every_readable_file(messy_folder):
    assert Image.open(messy_folder / "e_16bit.png").mode == "I;16"  # the fixture really is 16-bit
    assert Image.open(messy_folder / "f_cmyk.jpg").mode == "CMYK"

    result = load_folder(messy_folder, PRE, cache=False)

    assert result.paths == MESSY_GOOD  # sorted relative paths; .txt ignored; nested upper-case .PNG found
    assert len(result) == len(MESSY_GOOD)
    assert result.counts() == {"images": len(MESSY_GOOD), "skipped": len(MESSY_BAD)}
    assert result.labels is None
    assert result.root == str(messy_folder)
    images = result.images
    assert images.dtype == torch.uint8
    assert tuple(images.shape) == (len(MESSY_GOOD), 3, 32, 32)
    assert images.is_contiguous()

    skipped = {Path(path).name: reason for path, reason in result.skipped}
    assert sorted(skipped) == MESSY_BAD
    assert all(reason.strip() for reason in skipped.values())
    assert "empty" in skipped["h_empty.jpg"]
    assert not any("notes.txt" in p for p, _ in result.skipped)


def test_messy_folder_pixel_values(messy_folder):
    result = load_folder(messy_folder, PRE, cache=False)
    px = lambda name: _pixel(result.images, result.paths, name)  # noqa: E731

    assert (px("b_gray.png") == 128).all()  # grayscale -> equal RGB channels
    assert px("c_palette.png")[:, 0, 0].tolist() == [10, 20, 30]  # palette resolved
    assert (px("d_rgba.png") == 255).all()  # fully transparent -> white background
    deep = px("e_16bit.png")
    assert (deep[:, :16] == 0).all() and (deep[:, 16:] == 255).all()  # 16-bit scaled to 8-bit, not clipped
    red = px("f_cmyk.jpg").float().mean(dim=(1, 2))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # CMYK converted to RGB red
    assert px("sub/deeper/J_UPPER.PNG")[:, 0, 0].tolist() == [0, 0, 255]


def test_decoding_is_deterministic(messy_folder):
    first = load_folder(messy_folder, PRE, cache=False)
    second = load_folder(messy_folder, PRE, cache=False)
    assert first.paths == second.paths
    assert torch.equal(first.images, second.images)
    assert first.skipped == second.skipped


def test_scan_images_is_sorted_and_case_insensitive(messy_folder):
    rel = [p.relative_to(messy_folder).as_posix() for p in scan_images(messy_folder)]
    assert rel == sorted(MESSY_GOOD + MESSY_BAD)


def test_only_unreadable_files_is_a_data_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.png").write_text("nope")
    with pytest.raises(DataError, match="could be read"):
        load_folder(folder, PRE, cache=False)


# ----------------------------------------------------------------------------------------------------------------
# Labeled folders


def test_labeled_folder_uses_sorted_subfolders(labeled_folder):
    result = load_folder(labeled_folder, PRE, labeled=True, cache=False)
    assert result.class_names == ["cat", "dog"]
    assert result.paths == ["cat/img_000.png", "cat/img_001.png", "dog/img_000.png", "dog/img_001.png", "dog/more/img_000.png"]
    assert result.labels.dtype == torch.long
    assert result.labels.tolist() == [0, 0, 1, 1, 1]


def test_labeled_folder_follows_model_class_names(labeled_folder):
    names = ["bird", "cat", "dog"]
    result = load_folder(labeled_folder, PRE, labeled=True, class_names=names, cache=False)
    assert result.class_names == names
    assert result.labels.tolist() == [1, 1, 2, 2, 2]
    assert len(result) == 5


def test_labeled_folder_with_unknown_class_is_a_data_error(labeled_folder):
    with pytest.raises(DataError, match="dog"):
        load_folder(labeled_folder, PRE, labeled=True, class_names=["cat", "bird"], cache=False)


def test_labeled_folder_without_class_folders(tmp_path):
    write_noise_images(tmp_path / "flat", 2)
    with pytest.raises(DataError, match="class sub-folders"):
        load_folder(tmp_path / "flat", PRE, labeled=True, cache=False)
    (tmp_path / "empty_classes" / "cat").mkdir(parents=True)
    with pytest.raises(DataError):
        load_folder(tmp_path / "empty_classes", PRE, labeled=True, cache=False)


@pytest.mark.parametrize("labeled", [False, True])
def test_bad_folders_are_data_errors(tmp_path, labeled):
    a_file = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    only_text = tmp_path / "only_text"
    only_text.mkdir()
    (only_text / "readme.txt").write_text("hi")

    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "missing", PRE, labeled=labeled, cache=False)
    with pytest.raises(DataError, match="folder"):
        load_folder(a_file, PRE, labeled=labeled, cache=False)
    with pytest.raises(DataError):
        load_folder(empty, PRE, labeled=labeled, cache=False)
    with pytest.raises(DataError):
        load_folder(only_text, PRE, labeled=labeled, cache=False)


# ----------------------------------------------------------------------------------------------------------------
# The decoded-tensor cache


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "images").glob("*.pt")) if (cache_dir / "images").is_dir() else []


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded again although the cache should have been used")


def test_cache_returns_identical_tensors(tmp_path, messy_folder, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = load_folder(messy_folder, PRE, cache_dir=cache_dir)
    assert len(_cache_files(cache_dir)) == 1

    with monkeypatch.context() as patch:
        patch.setattr(data_module, "decode_images", _no_decoding)
        second = load_folder(messy_folder, PRE, cache_dir=cache_dir)
    assert torch.equal(first.images, second.images)
    assert first.paths == second.paths
    assert first.skipped == second.skipped
    assert second.root == str(messy_folder)
    assert [name for name in os.listdir(cache_dir / "images") if name.endswith(".tmp")] == []


def test_cache_keeps_labels(tmp_path, labeled_folder, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = load_folder(labeled_folder, PRE, labeled=True, class_names=["bird", "cat", "dog"], cache_dir=cache_dir)
    monkeypatch.setattr(data_module, "decode_images", _no_decoding)
    second = load_folder(labeled_folder, PRE, labeled=True, class_names=["bird", "cat", "dog"], cache_dir=cache_dir)
    assert torch.equal(first.labels, second.labels)
    assert second.class_names == ["bird", "cat", "dog"]


def test_cache_is_invalidated_when_a_file_changes(tmp_path, messy_folder):
    cache_dir = tmp_path / "cache"
    first = load_folder(messy_folder, PRE, cache_dir=cache_dir)
    target = messy_folder / "b_gray.png"
    Image.new("L", (32, 32), 200).save(target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))

    second = load_folder(messy_folder, PRE, cache_dir=cache_dir)
    assert (_pixel(first.images, first.paths, "b_gray.png") == 128).all()
    assert (_pixel(second.images, second.paths, "b_gray.png") == 200).all()
    assert len(_cache_files(cache_dir)) == 2


def test_cache_is_invalidated_when_a_file_is_added_or_removed(tmp_path, image_folder):
    cache_dir = tmp_path / "cache"
    assert len(load_folder(image_folder, PRE, cache_dir=cache_dir)) == 12
    (image_folder / "img_000.png").unlink()
    assert len(load_folder(image_folder, PRE, cache_dir=cache_dir)) == 11
    write_noise_images(image_folder / "extra", 2, seed=99)
    assert len(load_folder(image_folder, PRE, cache_dir=cache_dir)) == 13


def test_cache_depends_on_preprocessing(tmp_path, image_folder):
    cache_dir = tmp_path / "cache"
    small = load_folder(image_folder, Preprocess(size=(16, 16), mean=MEAN, std=STD), cache_dir=cache_dir)
    full = load_folder(image_folder, PRE, cache_dir=cache_dir)
    assert tuple(small.images.shape) == (12, 3, 16, 16)
    assert tuple(full.images.shape) == (12, 3, 32, 32)


def test_corrupt_cache_entry_is_rebuilt(tmp_path, image_folder):
    cache_dir = tmp_path / "cache"
    first = load_folder(image_folder, PRE, cache_dir=cache_dir)
    (entry,) = _cache_files(cache_dir)
    entry.write_bytes(b"garbage")
    again = load_folder(image_folder, PRE, cache_dir=cache_dir)
    assert torch.equal(first.images, again.images)


def test_cache_false_writes_nothing_and_default_dir_follows_env(tmp_path, image_folder, monkeypatch):
    load_folder(image_folder, PRE, cache=False, cache_dir=tmp_path / "unused")
    assert not (tmp_path / "unused").exists()
    monkeypatch.setenv("ADAPTSOUP_CACHE", str(tmp_path / "env-cache"))
    load_folder(image_folder, PRE)
    assert len(_cache_files(tmp_path / "env-cache")) == 1


def test_normalize_matches_preprocessing():
    images = torch.tensor(np.array([[[[0]], [[255]], [[128]]]], dtype=np.uint8))
    out = PRE.normalize(images)
    expected = torch.tensor([(0 / 255 - MEAN[0]) / STD[0], (1 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]])
    assert torch.allclose(out.flatten(), expected, atol=1e-5)


# Issue #15: non-UTF-8 names, absurd decoded sizes refused before decoding, non-image entries counted and listed.
def test_a_name_that_is_not_utf8_is_decoded_and_printable(tmp_path):
    from helpers import NON_UTF8_NAME

    write_noise_images(tmp_path / "imgs", 2)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "imgs" / NON_UTF8_NAME)
    for cache in (True, False):
        result = load_folder(tmp_path / "imgs", PRE, cache=cache, cache_dir=tmp_path / "cache")
        assert len(result) == 3 and "caf\\xe9 \\xff.png" in result.paths
        "\n".join(result.paths).encode("utf-8")  # printable, writable to a CSV or a manifest


@pytest.mark.parametrize("width, height", [(100_000_000, 1), (4_000_000, 1), (500_000, 1), (1, 500_000), (20_000, 20_000), (12_000, 12_000)])
def test_absurd_decoded_sizes_are_refused_before_decoding(tmp_path, width, height):
    from helpers import png_claiming

    write_noise_images(tmp_path / "imgs", 1)
    (tmp_path / "imgs" / "bomb.png").write_bytes(png_claiming(width, height))
    result = load_folder(tmp_path / "imgs", PRE, cache=False)
    assert len(result) == 1
    (path, reason), = result.skipped
    assert path.endswith("bomb.png") and ("aspect" in reason or "too large" in reason or "Bomb" in reason), reason


def test_entries_that_are_not_images_are_counted_and_listed(tmp_path):
    root = tmp_path / "imgs"
    write_noise_images(root, 2)
    (root / "folder.jpg").mkdir()
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    os.mkfifo(root / "pipe.jpg")
    (root / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    np.save(root / "array.npy", np.zeros((4, 4)))
    (root / "notes.txt").write_text("ignored")
    result = load_folder(root, PRE)
    reasons = {Path(p).name: r for p, r in result.skipped}
    assert sorted(reasons) == ["array.npy", "drawing.svg", "folder.jpg", "gone.png", "pipe.jpg"]
    assert all(r.startswith("not an image") for r in reasons.values()) and len(result) == 2
    again = load_folder(root, PRE)  # from the cache: the same list
    assert again.skipped == result.skipped


def test_labeled_folders_list_their_non_images_too(tmp_path):
    write_noise_images(tmp_path / "lab" / "cat", 2)
    (tmp_path / "lab" / "cat" / "x.npy").write_bytes(b"\x93NUMPY")
    result = load_folder(tmp_path / "lab", PRE, labeled=True, cache=False)
    assert [Path(p).name for p, _ in result.skipped] == ["x.npy"] and len(result) == 2
