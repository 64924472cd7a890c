"""benchmarks/train_stock.py carries a fine-tuning state across machines, and only to a run of the same recipe."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from adaptsoup.core.models import create_model
from adaptsoup.train.loop import load_train_state, save_train_state
from adaptsoup.train.optim import make_optimizer

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_stock.py"


@pytest.fixture
def stock_script(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_stock_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WIP", tmp_path / "wip")
    (tmp_path / "wip").mkdir()
    (tmp_path / "wip" / "mae.safetensors").write_bytes(b"the committed MAE phase")
    return module


def _args(**changes) -> argparse.Namespace:
    base = dict(seed=0, mae_epochs=25, mae_lr=1.5e-3, mae_batch=256, ft_epochs=30, ft_lr=5e-4, ft_batch=128)
    return argparse.Namespace(**{**base, **changes})


def _model_and_optimizer():
    torch.manual_seed(0)
    model = create_model("vit_pico_patch4_32", num_classes=10)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))
    return model, optimizer


def test_fine_tuning_state_round_trips_through_the_committable_files(stock_script, tmp_path):
    model, optimizer = _model_and_optimizer()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    work = tmp_path / "work"
    work.mkdir()
    (work / "manifest.json").write_text(json.dumps({"phases": {"linear_probe": {"test_acc": 47.7}}, "args": vars(_args())}))
    save_train_state(work / "ft_state.pt", 7, model, optimizer, [1.0, 0.5], 123.0)
    stock_script.save_wip_ft_state(work)
    assert all(p.stat().st_size < 25 * 2**20 for p in (tmp_path / "wip").iterdir())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert stock_script.restore_wip_ft_state(elsewhere, _args())
    model2, optimizer2 = _model_and_optimizer()
    step, losses, wall, _ = load_train_state(elsewhere / "ft_state.pt", model2, optimizer2)
    assert (step, losses, wall) == (7, [1.0, 0.5], 123.0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][i][k], s2["state"][i][k]) for i in s1["state"] for k in s1["state"][i])
    assert json.loads((elsewhere / "manifest.json").read_text())["phases"]["linear_probe"]["test_acc"] == 47.7


def test_a_state_of_another_recipe_or_mae_phase_is_refused(stock_script, tmp_path):
    model, optimizer = _model_and_optimizer()
    work = tmp_path / "work"
    work.mkdir()
    (work / "manifest.json").write_text(json.dumps({"phases": {}, "args": vars(_args())}))
    save_train_state(work / "ft_state.pt", 3, model, optimizer, [], 1.0)
    stock_script.save_wip_ft_state(work)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SystemExit, match="ft_lr=0.0005"):
        stock_script.restore_wip_ft_state(other, _args(ft_lr=1e-4))
    (other / "mae.safetensors").write_bytes(b"a different MAE phase")
    with pytest.raises(SystemExit, match="not the MAE phase"):
        stock_script.restore_wip_ft_state(other, _args())
    assert not (other / "ft_state.pt").exists()
