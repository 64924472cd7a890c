"""Train the embedded demo's deployed model: vit_mini_patch4_32 on the clean digits source split.

    python benchmarks/train_demo_model.py

MAE pre-training (no labels, gives the MAE decoder the demo inter-trains with), then LP-FT with labels.
Writes ``benchmarks/assets/digits_vit_mini.safetensors`` and ``benchmarks/assets/digits_vit_mini_mae_decoder.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptsoup.core.checkpoint import save_checkpoint  # noqa: E402
from adaptsoup.core.data import Preprocess, load_folder  # noqa: E402
from adaptsoup_bench.digits import DIGIT_CLASSES, make_digits_folders  # noqa: E402
from adaptsoup.core.evaluation import accuracy  # noqa: E402
from adaptsoup.ssl.mae import MaskedAutoencoder  # noqa: E402
from adaptsoup.core.models import create_model, model_meta, set_class_names  # noqa: E402
from adaptsoup.train.loop import TrainConfig, train  # noqa: E402
from adaptsoup.train.losses import classification_loss, mae_loss  # noqa: E402
from adaptsoup.train.lpft import LinearProbeConfig, fit_linear_probe  # noqa: E402
from adaptsoup.train.optim import steps_for_epochs  # noqa: E402

ASSETS = ROOT / "benchmarks" / "assets"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mae-epochs", type=float, default=60)
    ap.add_argument("--ft-epochs", type=float, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source_dir, shifted_dir = make_digits_folders(tmp)
        torch.manual_seed(args.seed)
        model = create_model("vit_mini_patch4_32", num_classes=10)
        set_class_names(model, DIGIT_CLASSES)
        model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.25, 0.25, 0.25), std=(0.35, 0.35, 0.35))
        pre = Preprocess.for_model(model)
        source = load_folder(source_dir, pre, labeled=True, class_names=DIGIT_CLASSES, cache=False)
        shifted = load_folder(shifted_dir, pre, labeled=True, class_names=DIGIT_CLASSES, cache=False)
        mae = MaskedAutoencoder(model)
        cfg = TrainConfig(steps=steps_for_epochs(args.mae_epochs, len(source), 128), lr=1.5e-3, batch_size=128, weight_decay=0.05,
                          betas=(0.9, 0.95), warmup_frac=0.05, augment="crop-flip", crop_scale=(0.6, 1.0), seed=args.seed, grad_clip=None)
        res = train(mae, mae_loss, source, pre, cfg, description="MAE")
        print(f"MAE: {cfg.steps} steps, final loss {res.losses[-1]:.4f}, {res.wall_s:.0f}s")
        probe = fit_linear_probe(model, source, pre, LinearProbeConfig())
        print(f"linear probe: {probe}")
        cfg = TrainConfig(steps=steps_for_epochs(args.ft_epochs, len(source), 64), lr=5e-4, batch_size=64, weight_decay=0.05,
                          warmup_frac=0.05, augment="none", seed=args.seed + 1)
        res = train(model, classification_loss(0.1), source, pre, cfg, description="fine-tune")
        print(f"fine-tune: {cfg.steps} steps, final loss {res.losses[-1]:.4f}, {res.wall_s:.0f}s")
        clean_held = accuracy(model, source, pre)
        shifted_acc = accuracy(model, shifted, pre)
        wall = time.perf_counter() - t_start
        print(f"source (train) accuracy {clean_held:.2f}%  shifted accuracy {shifted_acc:.2f}%  wall {wall:.0f}s")
        meta = model_meta(model, made_by="benchmarks/train_demo_model.py", recipe=vars(args), wall_s=round(wall, 1),
                          source_train_acc=round(clean_held, 2), shifted_acc=round(shifted_acc, 2))
        ASSETS.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ASSETS / "digits_vit_mini.safetensors", model.state_dict(), meta)
        save_checkpoint(ASSETS / "digits_vit_mini_mae_decoder.safetensors", mae.decoder_state_dict(), None)


if __name__ == "__main__":
    main()
