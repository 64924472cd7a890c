"""Label-free soups for new tasks: SSL-only ingredients mixed with the stock, scored by k-NN."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_cifar_tasks_are_built_once_and_split_cleanly(tmp_path):
    import numpy as np
    from PIL import Image

    from adaptsoup.datasets import CIFAR10_CLASSES
    from adaptsoup.transfer import prepare_cifar_tasks

    for i, name in enumerate(CIFAR10_CLASSES):
        write_noise_images(tmp_path / "cifar" / "train" / name, 3, seed=i)
        write_noise_images(tmp_path / "cifar" / "test" / name, 3, seed=20 + i)
    kwargs = dict(train_images=12, test_images=8, labeled_images=5, families=("noise", "digital"))
    tasks = prepare_cifar_tasks(tmp_path / "tasks", tmp_path / "cifar", **kwargs)
    assert list(tasks) == ["cifar10", "digits", "c10c-noise", "c10c-digital"]

    def files(folder):
        return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*.png"))

    assert len(files(tasks["cifar10"].train)) == 12 and len(files(tasks["cifar10"].test)) == 8
    noise = tasks["c10c-noise"]
    train, test, few = files(noise.train), files(noise.test), files(noise.labeled)
    # 20 test images of CIFAR-10, even positions train and odd test: disjoint, and the few labels are train images
    assert len(train) == len(test) == 10 and not {p.split("/")[1] for p in train} & {p.split("/")[1] for p in test}
    assert len(few) == 5 and set(few) <= set(train)
    digits = tasks["digits"]
    assert len(files(digits.train)) + len(files(digits.test)) == 1797
    # a second call with the same request writes nothing
    stamp = (Path(noise.train) / train[0]).stat().st_mtime_ns
    again = prepare_cifar_tasks(tmp_path / "tasks", tmp_path / "cifar", **kwargs)
    assert again == tasks and (Path(noise.train) / train[0]).stat().st_mtime_ns == stamp
    # the noise family's images are not the clean test images themselves
    clean_name = train[0].split("/")
    corrupted = np.asarray(Image.open(Path(noise.train) / train[0]), dtype=np.float64)
    clean_dir = tmp_path / "cifar" / "test" / clean_name[0]
    clean = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted(clean_dir.glob("*.png"))]
    assert min(np.abs(c - corrupted).mean() for c in clean) > 1.0
