"""Montage of the 15 CIFAR-10-C corruptions (32-px parameters) at severities 3 and 5 on CIFAR-10 test images.

    python benchmarks/c10c_montage.py [--data PATH]      # writes benchmarks/results/c10c_montage.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptsoup_bench.corruptions import CORRUPTIONS, corrupt_batch  # noqa: E402
from adaptsoup.core.data import Preprocess, load_folder  # noqa: E402
from adaptsoup_bench.datasets import CIFAR10_CLASSES, require_cifar10  # noqa: E402
from adaptsoup.core.io import atomic_path  # noqa: E402
from adaptsoup.core.models import CIFAR_MEAN, CIFAR_STD  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "c10c_montage.png"))
    args = ap.parse_args()
    test = load_folder(require_cifar10(args.data) / "test", Preprocess((32, 32), CIFAR_MEAN, CIFAR_STD), labeled=True, class_names=CIFAR10_CLASSES)
    idx = np.arange(args.images) * 1000 + 7  # one image from several classes (test folders are sorted by class)
    clean = test.images[idx].permute(0, 2, 3, 1).numpy()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 * args.images
    fig, axes = plt.subplots(len(CORRUPTIONS) + 1, cols, figsize=(cols * 0.9, (len(CORRUPTIONS) + 1) * 0.95))
    rows = [("clean", clean, clean)] + [(c, corrupt_batch(clean, c, 3, idx), corrupt_batch(clean, c, 5, idx)) for c in CORRUPTIONS]
    for r, (name, s3, s5) in enumerate(rows):
        for j in range(args.images):
            for k, img in enumerate((s3[j], s5[j])):
                ax = axes[r, j + k * args.images]
                ax.imshow(img, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    axes[0, 0].set_title("severity 3", fontsize=8, loc="left")
    axes[0, args.images].set_title("severity 5", fontsize=8, loc="left")
    fig.tight_layout(pad=0.2)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
