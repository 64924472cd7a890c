"""Label-free soups for new tasks: SSL-only ingredients mixed with the stock, scored by k-NN."""

from __future__ import annotations

import json

from adaptsoup.checkpoint import save_checkpoint
from adaptsoup.mae import MaskedAutoencoder
from adaptsoup.models import model_meta
from adaptsoup.transfer import METHODS, LabelFreeConfig, run_label_free
from helpers import tiny_model, write_noise_images


def test_label_free_soups_on_a_new_task(tmp_path):
    model = tiny_model()  # a 3-class stock; the new task has 2 other classes
    stock = save_checkpoint(tmp_path / "stock.safetensors", model.state_dict(), model_meta(model))
    decoder = save_checkpoint(tmp_path / "dec.safetensors", MaskedAutoencoder(model).decoder_state_dict(), None)
    for i, name in enumerate(["left", "right"]):
        write_noise_images(tmp_path / "task" / "train" / name, 8, seed=i)
        write_noise_images(tmp_path / "task" / "test" / name, 4, seed=10 + i)
    cfg = LabelFreeConfig(steps=2, batch_size=8, samples=3, self_season_epochs=1, self_season_subset=0, bf16=False, k=3)
    result = run_label_free(str(stock), str(decoder), {"toy": (str(tmp_path / "task" / "train"), str(tmp_path / "task" / "test"))}, cfg,
                            out=str(tmp_path / "out"), work=str(tmp_path / "work"), log=lambda m: None)
    task = result["tasks"]["toy"]
    assert set(task["top1_knn"]) == {"stock", *METHODS}
    assert all(0 <= v <= 100 for v in task["top1_knn"].values())
    # five SSL-only ingredients (MAE, MMCR λ=0 and λ=0.1, MoCo v3 τ=0.1 and τ=1.0) plus the stock
    assert sorted(task["coefficients"]["uniform"]) == ["mae00", "mmcr00", "mmcr01", "mocov300", "mocov301", "stock"]
    saved = json.loads((tmp_path / "out" / "label_free.json").read_text())
    assert saved["tasks"]["toy"]["test_images"] == 8
    manifest = json.loads((tmp_path / "work" / "toy" / "manifest.json").read_text())
    assert {r["kind"] for r in manifest["ingredients"].values()} == {"ssl-only"}
