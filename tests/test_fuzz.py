"""Fuzz suite (issue #15): a zoo of odd image files and entries, and ``adapt`` (tiny), ``predict`` and ``tta`` run
over it in real processes.  Each must exit 0 with no traceback, use every good file and count every bad one."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import NON_UTF8_NAME, build_adapt_inputs, png_claiming


def build_zoo(root: Path) -> tuple[int, int]:
    """Write the zoo into ``root`` (beside what is there); returns (good images, bad entries) added."""
    rng = np.random.default_rng(5)
    rgb = lambda w=40, h=32: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    good: dict[str, callable] = {
        "rgb.jpg": lambda p: rgb().save(p, quality=90),
        "deep16.png": lambda p: Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(p),
        "cmyk.jpg": lambda p: Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p),
        "palette_alpha.png": lambda p: _palette_alpha().save(p, transparency=0),
        "la.png": lambda p: Image.new("LA", (32, 32), (100, 128)).save(p),
        "float.tif": lambda p: Image.fromarray(rng.random((32, 32), dtype=np.float32)).save(p),
        "animated.gif": lambda p: rgb().convert("P").save(p, save_all=True, append_images=[rgb().convert("P")], duration=50),
        "pages.tiff": lambda p: rgb().save(p, save_all=True, append_images=[rgb()]),
        "photo.webp": lambda p: rgb().save(p),
        "bitmap.bmp": lambda p: rgb().save(p),
        "UPPER.JPEG": lambda p: rgb().save(p, format="JPEG"),
        "with spaces.png": lambda p: rgb().save(p),
        "new\nline.png": lambda p: rgb().save(p),
        NON_UTF8_NAME: lambda p: rgb().save(p, format="PNG"),
        "panorama.jpg": lambda p: rgb(320, 32).save(p),  # 10:1 is a real photo shape
    }
    for name, write in good.items():
        write(root / name)
    jpeg = (root / "rgb.jpg").read_bytes()
    png = (root / "la.png").read_bytes()
    idat = png.index(b"IDAT") + 8
    bad_files = {
        "zero.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) // 2], "corrupt_idat.png": png[:idat] + b"\x00" * 16 + png[idat + 16:],
        "text.jpg": b"just some text\n", "page.png": b"<!doctype html><html><body>hi</body></html>",
        "bomb.png": png_claiming(60_000, 60_000), "line100m.png": png_claiming(100_000_000, 1),
        "line4m.png": png_claiming(4_000_000, 1), "line500k.png": png_claiming(500_000, 1),
        "drawing.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "array.npy": b"\x93NUMPY\x01\x00",
    }
    for name, data in bad_files.items():
        (root / name).write_bytes(data)
    (root / "folder.jpg").mkdir()
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    os.mkfifo(root / "pipe.jpg")
    return len(good), len(bad_files) + 3


def _palette_alpha() -> Image.Image:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.paste(1, (8, 8, 24, 24))
    return img


def run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "adaptsoup_cli.main", *map(str, args)], capture_output=True, timeout=300, env=env)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, Path, int, int]:
    root = tmp_path_factory.mktemp("fuzz")
    stock = build_adapt_inputs(root, per_class=3, target=2)
    good, bad = build_zoo(root / "target")
    return root, stock, good + 2, bad


def test_adapt_over_the_zoo(zoo):
    root, stock, good, bad = zoo
    run("adapt", "--model", stock, "--target", root / "target", "--no-finetune", "--out", root / "run", "--no-progress",
        "--inter-lrs", "1e-3", "--inter-steps", "1", "--batch-size", "4", "--decoder-warmup-steps", "1")  # label-free: no probe to fit
    data = json.loads((root / "run" / "manifest.json").read_text())["data"]["target"]
    assert (data["images"], data["skipped"]) == (good, bad)


def test_predict_over_the_zoo(zoo, tmp_path):
    from adaptsoup.deploy.onnx import export_onnx
    from helpers import tiny_model

    root, _, good, bad = zoo
    onnx_path = export_onnx(tiny_model(), tmp_path / "model.onnx", log=lambda _: None).path
    run("predict", "--onnx", onnx_path, root / "target", "--csv", tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    assert len(rows) == good and any("\\xff" in r[0] for r in rows) and any("\n" in r[0] for r in rows)


def test_tta_over_the_zoo(zoo, tmp_path):
    root, stock, good, bad = zoo
    run("tta", "--model", stock, "--target", root / "target", "--out", tmp_path / "tta", "--batch-size", "4", "--no-progress")
    data = json.loads((tmp_path / "tta" / "manifest.json").read_text())["data"]
    assert (data["images"], data["skipped"]) == (good, bad)
