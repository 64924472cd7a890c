"""Label-free soups for new tasks: SSL-only ingredients mixed with the stock, scored by k-NN."""

from __future__ import annotations

import json
from pathlib import Path

from adaptsoup.core.checkpoint import save_checkpoint
from adaptsoup.ssl.mae import MaskedAutoencoder
from adaptsoup.core.models import model_meta
from adaptsoup_bench.label_free import METHODS, LabelFreeConfig, run_label_free
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
    saved = json.loads((tmp_path / "out" / "label_free_quick.json").read_text())
    assert saved["tasks"]["toy"]["test_images"] == 8
    (run_dir,) = (tmp_path / "work" / "runs").glob("toy-*")  # named by a digest of the settings, stock and data
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {r["kind"] for r in manifest["ingredients"].values()} == {"ssl-only"}


def test_cifar_tasks_are_built_once_and_split_cleanly(tmp_path):
    import numpy as np
    from PIL import Image

    from adaptsoup_bench.corruptions import FAMILIES, corrupt32, image_seed
    from adaptsoup_bench.datasets import CIFAR10_CLASSES
    from adaptsoup_bench.label_free import _uint8_folder, prepare_cifar_tasks

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
    # 20 CIFAR-10 test images, 12 train and 8 test: disjoint, and the few labels are train images
    assert len(train) == 12 and len(test) == 8 and not {p.split("/")[1] for p in train} & {p.split("/")[1] for p in test}
    assert len(few) == 5 and set(few) <= set(train)
    digits = tasks["digits"]
    assert len(files(digits.train)) + len(files(digits.test)) == 1797
    # every image is one of the family's corruptions of its clean test image, and both splits hold every member
    clean, _ = _uint8_folder(tmp_path / "cifar" / "test", CIFAR10_CLASSES)
    for folder, names in ((noise.train, train), (noise.test, test)):
        used = set()
        for name in names:
            i = int(name.split("/")[1].removesuffix(".png"))
            got = np.asarray(Image.open(Path(folder) / name))
            match = [c for c in FAMILIES["noise"] if np.array_equal(got, corrupt32(clean[i], c, 5, image_seed(c, 5, i)))]
            assert len(match) == 1, name
            used.update(match)
        assert used == set(FAMILIES["noise"])
    # a second call with the same request writes nothing; a different one leaves nothing of the old tree
    stamp = (Path(noise.train) / train[0]).stat().st_mtime_ns
    again = prepare_cifar_tasks(tmp_path / "tasks", tmp_path / "cifar", **kwargs)
    assert again == tasks and (Path(noise.train) / train[0]).stat().st_mtime_ns == stamp
    smaller = prepare_cifar_tasks(tmp_path / "tasks", tmp_path / "cifar", **{**kwargs, "train_images": 6, "test_images": 4})
    assert len(files(smaller["c10c-noise"].train)) == 6 and len(files(smaller["c10c-noise"].test)) == 4
    assert len(files(smaller["c10c-noise"].labeled)) == 5
