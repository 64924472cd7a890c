"""The deploy recommendation every ``adapt`` run ends with: validation images, candidates, per-shift decisions."""

from __future__ import annotations

import json

import torch

from adaptsoup.pipeline import recommend as recommend_module
from adaptsoup.pipeline.adapt import run_adapt
from adaptsoup.pipeline.inputs import holdout_split
from adaptsoup.pipeline.recommend import shifts_of
from adaptsoup.pipeline.recipe import AdaptConfig, FineTuneConfig, InterTrainConfig
from helpers import CLASS_NAMES, build_adapt_inputs, write_noise_images


def test_the_holdout_is_class_balanced_disjoint_seeded_and_sorted():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 2)
    kept, held = holdout_split(labels, 7, seed=3)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(18))  # a partition
    assert torch.bincount(labels[held], minlength=3).tolist() == [3, 2, 2]  # round-robin over classes, the small one exhausted
    assert held.tolist() == sorted(held.tolist()) and kept.tolist() == sorted(kept.tolist())
    assert torch.equal(holdout_split(labels, 7, seed=3)[1], held) and not torch.equal(holdout_split(labels, 7, seed=4)[1], held)


def _config(root, out: str, **changes) -> AdaptConfig:
    return AdaptConfig(model=str(root / "stock.safetensors"), target=str(root / "target"), source=str(root / "source"), out=str(root / out),
                       checkpoint_every_s=0.0, precision="fp32", vanilla=1,
                       inter=InterTrainConfig(lrs=[1e-3], steps=[2], batch_size=8, decoder_warmup_steps=1),
                       finetune=FineTuneConfig(lrs=[1e-3], steps=2, batch_size=8), **changes)


def test_a_validation_folder_is_used_whole_and_each_target_subfolder_gets_its_own_decision(tmp_path, monkeypatch):
    build_adapt_inputs(tmp_path, per_class=4, target=0)
    write_noise_images(tmp_path / "target" / "fog", 6, seed=1)
    write_noise_images(tmp_path / "target" / "snow", 6, seed=2)
    write_noise_images(tmp_path / "target" / "tiny", 2, seed=3)  # too few images for a shift of its own
    for i, name in enumerate(CLASS_NAMES):
        write_noise_images(tmp_path / "val" / name, 3, seed=50 + i)
    monkeypatch.setattr(recommend_module, "MIN_SUBFOLDER_IMAGES", 5)
    result = run_adapt(_config(tmp_path, "run", validation=str(tmp_path / "val")), echo=None)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["data"]["source"]["images"] == 12 and manifest["data"]["validation"]["images"] == 9  # no holdout
    rec = manifest["recommendation"]
    assert set(rec["per_shift"]) == {"fog", "snow"}
    assert all(r["model"] in {"deployed", "soup", "supervised_soup"} for r in rec["per_shift"].values())
    assert manifest["estimates"]["images"] == {"target": 14, "validation": 9}
    from adaptsoup.pipeline.deploy_choice import resolve_export

    exported = resolve_export(result.run_dir).path  # export --model RUN: what the run recommends
    assert exported.is_file() and exported.resolve() == (tmp_path / "stock.safetensors" if rec["model"] == "deployed"
                                                         else result.run_dir / rec["path"]).resolve()
    log = (tmp_path / "run" / "adapt.log").read_text()
    assert "recommendation:" in log and "shift fog:" in log and "estimated accuracy of soup on the target" in log


def test_without_validation_images_the_run_says_so_and_recommends_nothing(tmp_path):
    build_adapt_inputs(tmp_path, per_class=4, target=10)
    result = run_adapt(_config(tmp_path, "run", validation_holdout=0), echo=None)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["recommendation"] is None and result.recommendation is None and manifest["data"]["validation"] is None
    assert "no deploy recommendation: no validation images" in (tmp_path / "run" / "adapt.log").read_text()


def test_class_folders_are_not_shifts(monkeypatch):
    from adaptsoup.core.image_set import ImageSet

    monkeypatch.setattr(recommend_module, "MIN_SUBFOLDER_IMAGES", 1)
    images = ImageSet(images=torch.zeros(4, 3, 2, 2, dtype=torch.uint8), paths=["cat/a.png", "cat/b.png", "dog/c.png", "fog/d.png"])
    assert set(shifts_of(images, ["cat", "dog", "fog"])) == set()  # every subfolder is a class: a labeled layout
    assert set(shifts_of(images, ["cat", "dog"])) == {"cat", "dog", "fog"}  # one is not a class: shifts
    assert set(shifts_of(images)) == {"cat", "dog", "fog"}
