"""Which files of a folder are images, and how a folder's results name them.

Folders are scanned recursively in sorted order; an image is a regular file with an image suffix
(:data:`IMAGE_SUFFIXES`, case-insensitive).  Entries that look meant as images but are not (folders named
``x.jpg``, broken links, FIFOs, ``.svg``, ``.npy`` ...) are listed as skipped with the reason; other files
and hidden entries are ignored silently.  A labeled folder has the ImageFolder layout
``root/<class_name>/<image>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from adaptsoup.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Suffixes of files that are images to a person but that the decoder does not read: counted as "not an image".
UNDECODED_SUFFIXES = frozenset({".svg", ".svgz", ".npy", ".npz", ".heic", ".heif", ".avif", ".jxl", ".psd", ".raw",
                                ".cr2", ".nef", ".arw", ".dng", ".exr", ".hdr", ".pdf", ".eps"})


def check_folder(root: str | os.PathLike, what: str = "image folder") -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{what} not found: {shown_path(root)}")
    if not root.is_dir():
        raise DataError(f"{what} must be a folder, got a file: {shown_path(root)}")
    return root


def scan_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive, case-insensitive suffixes, sorted); error if none."""
    return scan_folder(root)[0]


def scan_folder(root: str | os.PathLike) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under ``root`` (recursive, sorted) and the entries that look meant as images but are
    not ((path, "not an image (...)"): folders named ``x.jpg``, broken links, FIFOs, ``.svg``, ``.npy`` ...)."""
    root = check_folder(root)
    paths, others = _entries(root, root)
    if not paths:
        extra = f" ({len(others)} entries that are not images)" if others else ""
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {shown_path(root)}{extra}")
    return paths, others


def _entries(folder: Path, root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    images: list[Path] = []
    others: list[tuple[str, str]] = []
    for p in sorted(folder.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        reason = _not_an_image(p)
        if reason is None:
            images.append(p)
        elif reason:
            others.append((shown_path(p), f"not an image ({reason})"))
    return images, others


def _not_an_image(p: Path) -> str | None:
    """None for an image file to decode; why an entry is not one; "" for entries ignored silently."""
    suffix = p.suffix.lower()
    if p.is_dir():
        return "a folder" if suffix in IMAGE_SUFFIXES else ""
    if p.is_file():
        if suffix in IMAGE_SUFFIXES:
            return None
        return f"{suffix} files are not decoded" if suffix in UNDECODED_SUFFIXES else ""
    if p.name.startswith("."):
        return ""
    return "a broken link" if p.is_symlink() else "not a regular file"


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (surrogate escapes) become ``\\xNN``."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan_labeled(root: str | os.PathLike, class_names: Sequence[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder layout ``root/<class_name>/...``: paths, label indices and class names.

    With ``class_names`` (the model's classes) every folder must name one of them; the label index is the
    position in ``class_names``.  Without, classes are the sorted sub-folder names.
    """
    paths, labels, names, _ = scan_labeled_folder(root, class_names)
    return paths, labels, names


def scan_labeled_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None
                        ) -> tuple[list[Path], list[int], list[str], list[tuple[str, str]]]:
    """:func:`scan_labeled`, plus the entries of the class folders that are not images (see :func:`scan_folder`)."""
    root = check_folder(root, "labeled folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"labeled folder {shown_path(root)} has no class sub-folders (expected {shown_path(root)}/<class_name>/<image>)")
    if class_names is None:
        class_names = folders
    else:
        class_names = list(class_names)
        unknown = [f for f in folders if f not in class_names]
        if unknown:
            shown = ", ".join(shown_path(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(
                f"{shown_path(root)}: class folder(s) {shown} are not classes of the model "
                f"({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''})"
            )
    index = {name: i for i, name in enumerate(class_names)}
    paths: list[Path] = []
    labels: list[int] = []
    others: list[tuple[str, str]] = []
    for folder in folders:
        found, not_images = _entries(root / folder, root / folder)
        paths += found
        labels += [index[folder]] * len(found)
        others += not_images
    if not paths:
        raise DataError(f"no images found in the class folders of {shown_path(root)}")
    return paths, labels, list(class_names), others


def relative_name(path: Path, root: Path) -> str:
    """How a decoded image is named in results: its path under the folder scanned, printable."""
    return shown_path(path.relative_to(root).as_posix())


def all_skipped(not_images: list[tuple[str, str]], unreadable: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A folder's skipped entries, as reported: the entries that are not images and the unreadable files, sorted."""
    return sorted(not_images + unreadable)


def none_readable(root: Path, count: int) -> DataError:
    return DataError(f"none of the {count} image files under {shown_path(root)} could be read")
