"""The CIFAR-10-C benchmark harness end to end on a tiny stock and a tiny CIFAR-like tree."""

from __future__ import annotations

import json

import pytest

from adaptsoup.bench import ROW_NAMES, C10CConfig, run_c10c
from adaptsoup.checkpoint import save_checkpoint
from adaptsoup.errors import AdaptsoupError
from adaptsoup.mae import MaskedAutoencoder
from adaptsoup.models import model_meta
from helpers import CLASS_NAMES, tiny_model, write_noise_images


def test_c10c_harness_writes_the_tables(tmp_path):
    model = tiny_model()
    stock = save_checkpoint(tmp_path / "stock.safetensors", model.state_dict(), model_meta(model))
    save_checkpoint(tmp_path / "stock_mae_decoder.safetensors", MaskedAutoencoder(model).decoder_state_dict(), None)
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "cifar" / "train" / name, 6, seed=i)
        write_noise_images(tmp_path / "cifar" / "test" / name, 6, seed=10 + i)
    cfg = C10CConfig(mode="quick", stock=str(stock), data=str(tmp_path / "cifar"), out=str(tmp_path / "results"),
                     work=str(tmp_path / "work"), corruptions=["gaussian_noise", "contrast"], per_corruption=12, clean_images=9,
                     source_images=12, inter_lrs=[1e-3], inter_steps=2, ft_lrs=[1e-3, 2e-3], ft_steps=2, vanilla=2, batch_size=6,
                     self_season_epochs=1, self_season_subset=0, sar_batch=4, bf16=False)
    result = run_c10c(cfg, command="test", log=lambda m: None)
    saved = json.loads((tmp_path / "results" / "c10c_quick_s5.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["name"] for r in saved["rows"]] == list(ROW_NAMES)
    for key in ("benchmark", "mode", "severity", "command", "commit", "machine", "wall_time_s", "stock"):
        assert key in saved
    assert 0 <= saved["stock"]["clean_acc"] <= 100
    for r in saved["rows"]:
        assert set(r["per_corruption"]) == {"gaussian_noise", "contrast"}
        assert 0 <= r["disjoint"] <= 100
    assert saved["data"]["target_images"] == 12  # 2 corruptions x 6 even images
    assert (tmp_path / "results" / "c10c_quick_s5.md").read_text().startswith("# CIFAR-10")
    assert (tmp_path / "results" / "c10c_quick_s5_per_corruption.png").is_file()
    # the even/odd split is disjoint and covers the selection
    even = {p.name for p in (tmp_path / "work").rglob("even/gaussian_noise/*/*.png")}
    odd = {p.name for p in (tmp_path / "work").rglob("odd/gaussian_noise/*/*.png")}
    assert len(even) == len(odd) == 6 and not even & odd


def test_missing_stock_is_a_clear_error(tmp_path):
    with pytest.raises(AdaptsoupError, match="make stock"):
        run_c10c(C10CConfig(stock=str(tmp_path / "none.safetensors"), out=str(tmp_path)), log=lambda m: None)
