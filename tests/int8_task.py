"""A small trained model for the int8 tests, and the synthetic task it was trained on.

A random ViT's logits are nearly tied, so whether int8 agrees with fp32 on it says more about rounding than
about quantization (issue #22: 54% top-1 agreement on one CPU, 96% on another). This ``vit_pico_patch4_32``
is trained on stripes: class 0 horizontal, 1 vertical, 2 diagonal, each with a random period (4.5 to 7
pixels: at 4 or 8, multiples of the 4-pixel patch, whole patches can be one colour and hide the orientation),
phase and pair of colours under pixel noise. It learns them to 100%, every logit margin above 6.

``python tests/int8_task.py`` retrains it (800 steps, under a minute on one core) and rewrites
``tests/fixtures/int8_task.safetensors`` (about 90 KB); it prints the held-out accuracy and smallest margin.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ARCH, MEAN, STD  # noqa: E402

CLASS_NAMES = ["horizontal", "vertical", "diagonal"]
FIXTURE = Path(__file__).parent / "fixtures" / "int8_task.safetensors"
TRAIN_SEED, STEPS, BATCH = 0, 800, 64
# export_and_check(trained_model(), images=labeled_images(), quantize="dynamic,static"): each int8 model's mean
# |logit difference| from fp32 on the 48 held-out images, measured on an AVX-512 VNNI Xeon, where u8×s8
# products are exact. A CPU whose kernels saturate moves them 10-20× (tests/test_int8_cpu.py).
REFERENCE_MEAN_ABS_DIFF = {"dynamic": 0.00537, "static": 0.01132}


def stripes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` uint8 images [N, 3, 32, 32] and their labels, the classes in turn (0, 1, 2, 0, ...)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASS_NAMES)
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    images = np.empty((count, 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        axis = (y, x, x + y)[label]
        period, phase = rng.uniform(4.5, 7.0), rng.uniform(0.0, 2 * np.pi)
        wave = (np.sin(2 * np.pi * axis / period + phase) > 0).astype(np.float32)  # 1 on a stripe, 0 between
        low, high = rng.uniform(0, 110, 3), rng.uniform(145, 255, 3)
        image = low[:, None, None] + (high - low)[:, None, None] * wave + rng.normal(0, 12, (3, 32, 32))
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels)


def labeled_images(count: int = 96, seed: int = 7):
    """A labeled :class:`ImageSet` of ``count`` stripes (an equal number per class), as ``load_folder`` gives."""
    from adaptsoup.core.data import ImageSet

    images, labels = stripes(count, seed)
    paths = [f"{CLASS_NAMES[label]}/{i:03d}.png" for i, label in enumerate(labels.tolist())]
    return ImageSet(images=images, paths=paths, labels=labels, class_names=list(CLASS_NAMES), root="stripes")


def untrained_model(seed: int = TRAIN_SEED) -> torch.nn.Module:
    from adaptsoup.core.checkpoint import CheckpointMeta
    from adaptsoup.core.models import apply_meta, create_model

    torch.manual_seed(seed)
    model = create_model(ARCH, num_classes=len(CLASS_NAMES))
    apply_meta(model, CheckpointMeta(arch=ARCH, num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
                                     input_size=(3, 32, 32), mean=MEAN, std=STD, interpolation="bicubic",
                                     crop_pct=1.0, provenance={"made_by": "tests/int8_task.py"}))
    return model


def trained_model() -> torch.nn.Module:
    """The committed fixture, with its metadata (class names, preprocessing)."""
    from adaptsoup.core.models import load_model

    return load_model(None, FIXTURE).eval()


def train() -> torch.nn.Module:
    from adaptsoup.core.data import Preprocess

    model = untrained_model()
    pre = Preprocess.for_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    model.train()
    for step in range(STEPS):
        images, labels = stripes(BATCH, seed=1000 + step)
        loss = torch.nn.functional.cross_entropy(model(pre.normalize(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def margins(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Top-1 logit minus the runner-up's, per image."""
    from adaptsoup.core.data import Preprocess

    with torch.no_grad():
        logits = model(Preprocess.for_model(model).normalize(images))
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def main() -> None:
    from adaptsoup.core.checkpoint import save_checkpoint
    from adaptsoup.core.data import Preprocess
    from adaptsoup.core.models import model_meta

    torch.set_num_threads(1)
    model = train()
    images, labels = stripes(600, seed=1)
    with torch.no_grad():
        accuracy = (model(Preprocess.for_model(model).normalize(images)).argmax(1) == labels).float().mean().item()
    save_checkpoint(FIXTURE, model.state_dict(), model_meta(model))
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes): held-out accuracy {accuracy * 100:.2f}%, "
          f"smallest logit margin {margins(model, images).min().item():.3f}")


if __name__ == "__main__":
    main()
