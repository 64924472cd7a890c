from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import build_labeled_folder, build_messy_folder, tiny_model, write_noise_images

# The tests are tiny; one thread avoids fighting over the cores and keeps results reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write the image cache into the user's home folder."""
    monkeypatch.setenv("ADAPTSOUP_CACHE", str(tmp_path_factory.mktemp("adaptsoup-cache")))


@pytest.fixture
def pico_model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_noise_images(folder, 12, seed=7)
    return folder


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    return build_messy_folder(tmp_path / "messy")


@pytest.fixture
def labeled_folder(tmp_path) -> Path:
    return build_labeled_folder(tmp_path / "labeled")
