"""Train the CIFAR-10 reference stock from nothing: MAE pre-training (no labels), then LP-FT with labels.

    python benchmarks/train_stock.py [--data PATH] [--work DIR] [--device cuda] [--bf16]
    torchrun --nproc-per-node 4 benchmarks/train_stock.py --device cuda   # data-parallel, same global batch

Phases are resumable: the training state is checkpointed every few minutes under ``--work`` (default
``~/.cache/adaptsoup/stock_run``) and a rerun of the same command continues where it stopped.
A run that cannot finish in one sitting (a machine that is handed back) is carried to another machine with

    python benchmarks/train_stock.py --save-wip

which copies the newest fine-tuning state into ``benchmarks/stock/wip/`` as safetensors + JSON (each file
under 25 MB, so it can be committed); the next run on a machine without a work folder resumes from it.
Outputs (committed): ``benchmarks/stock/vit_tiny_patch4_32_cifar10.safetensors`` (encoder + head),
``benchmarks/stock/vit_tiny_patch4_32_cifar10_mae_decoder.safetensors``, the MAE phase itself as
``benchmarks/stock/vit_tiny_patch4_32_cifar10_mae.safetensors`` (the *pre-trained* stock the paper's protocol
starts every ingredient from: encoder with its untrained head, + decoder; ``adapt --pretrained``) and
``benchmarks/stock/MODEL_CARD.md``.  ``--export-pretrained`` writes only that file, from the MAE phase in
``--work`` or the one committed in ``benchmarks/stock/wip`` (or a file given as ``--mae-phase``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adaptsoup.core.checkpoint import CheckpointMeta, read_checkpoint, save_checkpoint  # noqa: E402
from adaptsoup.core.data import Preprocess, default_cache_dir, load_folder  # noqa: E402
from adaptsoup_bench.datasets import CIFAR10_CLASSES, require_cifar10  # noqa: E402
from adaptsoup.core.evaluation import accuracy  # noqa: E402
from adaptsoup.core.distributed import barrier, from_main, init_distributed, main_then_barrier, world  # noqa: E402
from adaptsoup.core.io import write_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from adaptsoup.ssl.mae import MaskedAutoencoder  # noqa: E402
from adaptsoup.core.manifest import environment, file_digest  # noqa: E402
from adaptsoup.core.models import MAE_DECODER_PREFIXES, create_model, load_state_dict_strict, model_meta, set_class_names  # noqa: E402
from adaptsoup.train.loop import TrainConfig, train  # noqa: E402
from adaptsoup.train.losses import classification_loss, mae_loss  # noqa: E402
from adaptsoup.train.lpft import LinearProbeConfig, fit_linear_probe  # noqa: E402
from adaptsoup.train.optim import steps_for_epochs  # noqa: E402

ARCH = "vit_tiny_patch4_32"
OUT = ROOT / "benchmarks" / "stock"
STOCK = OUT / f"{ARCH}_cifar10.safetensors"
DECODER = OUT / f"{ARCH}_cifar10_mae_decoder.safetensors"
PRETRAINED = OUT / f"{ARCH}_cifar10_mae.safetensors"  # the MAE phase: the deployed stock is its LP-FT fine-tune
WIP = OUT / "wip"  # unfinished phases committed by an earlier run, so another machine can resume them


def log(msg: str) -> None:
    if world().is_main:  # under torchrun, rank 0 speaks for all
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_logger(name: str, every: int = 100):
    t0 = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            log(f"{name} step {step} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)")

    return on_step


def save_wip_ft_state(work: Path) -> None:
    """Copy ``work/ft_state.pt`` (fine-tuning mid-run) into ``WIP`` as committable safetensors + JSON."""
    from safetensors.torch import save_file

    src = work / "ft_state.pt"
    if not src.is_file():
        raise SystemExit(f"no fine-tuning state at {src}: nothing to save")
    state = torch.load(src, map_location="cpu", weights_only=True)
    opt = state["optimizer"]
    model = {f"module/{k}": v.contiguous() for k, v in state["module"].items()}
    model["rng_torch"] = state["rng_torch"]
    moments = {f"{name}/{i}": t.contiguous() for i, st in opt["state"].items() for name, t in st.items()}
    progress = {"step": state["step"], "wall_s": state.get("wall_s", 0.0), "losses": state["losses"], "rng_python": state["rng_python"],
                "param_groups": opt["param_groups"], "manifest": _read_json(work / "manifest.json")}
    WIP.mkdir(parents=True, exist_ok=True)
    write_atomic(WIP / "ft_state_model.safetensors", lambda tmp: save_file(model, str(tmp)))
    write_atomic(WIP / "ft_state_adam.safetensors", lambda tmp: save_file(moments, str(tmp)))
    write_json_atomic(WIP / "ft_state.json", progress)
    log(f"saved fine-tuning state at step {state['step']} to {WIP}")


RECIPE_ARGS = ("seed", "mae_epochs", "mae_lr", "mae_batch", "ft_epochs", "ft_lr", "ft_batch")  # what a resumed state must share


def restore_wip_ft_state(work: Path, args: argparse.Namespace) -> bool:
    """Rebuild ``work/ft_state.pt`` from ``WIP`` (the inverse of :func:`save_wip_ft_state`), if it is this run's."""
    from safetensors.torch import load_file

    if not (WIP / "ft_state.json").is_file():
        return False
    progress = json.loads((WIP / "ft_state.json").read_text())
    theirs = (progress.get("manifest") or {}).get("args", {})
    differ = [k for k in RECIPE_ARGS if k in theirs and theirs[k] != getattr(args, k)]
    if differ:
        raise SystemExit(f"{WIP} holds a fine-tuning state of another recipe ({', '.join(f'{k}={theirs[k]}' for k in differ)}); "
                         "rerun with those settings, or delete its ft_state* files to start fine-tuning afresh")
    if (work / "mae.safetensors").is_file() and file_digest(work / "mae.safetensors") != file_digest(WIP / "mae.safetensors"):
        raise SystemExit(f"{work}/mae.safetensors is not the MAE phase that {WIP}'s fine-tuning state started from; "
                         "use another --work folder")
    model = load_file(str(WIP / "ft_state_model.safetensors"))
    moments = load_file(str(WIP / "ft_state_adam.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in moments.items():
        name, i = key.rsplit("/", 1)
        opt_state.setdefault(int(i), {})[name] = t
    state = {
        "step": progress["step"],
        "module": {k.removeprefix("module/"): v for k, v in model.items() if k.startswith("module/")},
        "optimizer": {"state": opt_state, "param_groups": [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
                                                            for g in progress["param_groups"]]},
        "wall_s": progress["wall_s"],
        "rng_torch": model["rng_torch"],
        "rng_python": progress["rng_python"],
        "losses": progress["losses"],
    }
    write_atomic(work / "ft_state.pt", lambda tmp: torch.save(state, tmp))
    if progress.get("manifest"):
        write_json_atomic(work / "manifest.json", progress["manifest"])
    log(f"fine-tuning state at step {progress['step']} taken from {WIP}")
    return True


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def save_pretrained_stock(mae_state: dict[str, torch.Tensor], recipe: dict, out: Path = PRETRAINED) -> Path:
    """Write the MAE phase (``MaskedAutoencoder.state_dict()``) as the pre-trained stock: the encoder under
    timm's key names (its head is the untrained one of the MAE phase: LP-FT replaces it) + the decoder under
    MAE's names, with adaptsoup metadata (arch, CIFAR-10 classes, preprocessing, provenance)."""
    encoder = create_model(ARCH, num_classes=10)
    set_class_names(encoder, CIFAR10_CLASSES)
    enc = {k.removeprefix("encoder."): v for k, v in mae_state.items() if k.startswith("encoder.")}
    load_state_dict_strict(encoder, enc, source="the MAE phase's encoder")
    decoder = {k: v for k, v in mae_state.items() if k.startswith(MAE_DECODER_PREFIXES)}
    if not decoder:
        raise SystemExit("the MAE phase holds no decoder keys")
    meta = model_meta(encoder, made_by="benchmarks/train_stock.py", stage="mae-pretrain", recipe=recipe, parents=[],
                      note=("MAE phase of train_stock.py, the deployed stock is its LP-FT fine-tune; the head is the MAE "
                            "phase's untrained one (LP-FT sets it)"), decoder_keys="original MAE names")
    return save_checkpoint(out, {**encoder.state_dict(), **decoder}, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="CIFAR-10 folder or tarball (default: $ADAPTSOUP_DATA or ../shared)")
    ap.add_argument("--work", default=str(default_cache_dir() / "stock_run"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mae-epochs", type=float, default=25)
    ap.add_argument("--mae-lr", type=float, default=1.5e-3)
    ap.add_argument("--mae-batch", type=int, default=256)
    ap.add_argument("--ft-epochs", type=float, default=30)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--ft-batch", type=int, default=128)
    ap.add_argument("--save-wip", action="store_true", help="copy the fine-tuning state into benchmarks/stock/wip and exit")
    ap.add_argument("--force", action="store_true", help="train even though the committed stock exists (it is overwritten)")
    ap.add_argument("--export-pretrained", action="store_true", help=f"write only {PRETRAINED.name} from the MAE phase, and exit")
    ap.add_argument("--mae-phase", default=None, help="with --export-pretrained: the MAE phase's safetensors (default: --work's, else wip's)")
    args = ap.parse_args()
    if args.export_pretrained:
        phase = Path(args.mae_phase) if args.mae_phase else next((p for p in (Path(args.work) / "mae.safetensors", WIP / "mae.safetensors") if p.is_file()), None)
        if phase is None or not phase.is_file():
            raise SystemExit("no MAE phase found: pass --mae-phase (e.g. `git show 77356de:benchmarks/stock/wip/mae.safetensors > mae.safetensors`)")
        state, _ = read_checkpoint(phase)
        recipe = (_read_json(OUT / "manifest.json") or {}).get("args") or vars(args)  # the committed stock's recipe
        log(f"wrote {save_pretrained_stock(state, recipe)} from {phase}")
        return
    if STOCK.is_file() and DECODER.is_file() and not (args.force or args.save_wip):
        log(f"{STOCK.relative_to(ROOT)} exists (see its MODEL_CARD.md); nothing to do (--force retrains it)")
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    main_rank = init_distributed(args.device).is_main  # torchrun: data-parallel training, rank 0 writes every file
    if args.save_wip:
        save_wip_ft_state(work)
        return
    cifar = require_cifar10(args.data)
    log(f"CIFAR-10 at {cifar}; work dir {work}")
    torch.manual_seed(args.seed)
    encoder = create_model(ARCH, num_classes=10)
    set_class_names(encoder, CIFAR10_CLASSES)
    pre = Preprocess.for_model(encoder)
    train_set = load_folder(cifar / "train", pre, labeled=True, class_names=CIFAR10_CLASSES)
    test_set = load_folder(cifar / "test", pre, labeled=True, class_names=CIFAR10_CLASSES)
    log(f"train {len(train_set)} images ({len(train_set.skipped)} skipped), test {len(test_set)}")
    manifest_path = work / "manifest.json"
    with main_then_barrier() as main:
        if main and not (work / "ft_state.pt").is_file() and not (work / "ft.safetensors").is_file():
            restore_wip_ft_state(work, args)
    manifest = _read_json(manifest_path) or {"phases": {}}
    manifest.update(command=" ".join(sys.argv), args=vars(args), environment=environment())

    # Phase 1: MAE pre-training without labels (gives the decoder too).
    mae_ckpt = work / "mae.safetensors"
    mae = MaskedAutoencoder(encoder, mask_ratio=0.75, norm_pix_loss=True)
    committed = WIP / "mae.safetensors"  # a finished MAE phase committed by an earlier run
    with main_then_barrier() as main:
        if main and not mae_ckpt.is_file() and committed.is_file():
            shutil.copy2(committed, mae_ckpt)
            log(f"MAE phase taken from {committed}")
    if "mae" not in manifest["phases"] and (WIP / "manifest.json").is_file():
        manifest["phases"]["mae"] = json.loads((WIP / "manifest.json").read_text())["phases"]["mae"]
    if not mae_ckpt.is_file():
        cfg = TrainConfig(
            steps=steps_for_epochs(args.mae_epochs, len(train_set), args.mae_batch), lr=args.mae_lr,
            batch_size=args.mae_batch, weight_decay=0.05, betas=(0.9, 0.95), warmup_frac=0.05, augment="crop-flip",
            crop_scale=(0.35, 1.0), seed=args.seed, precision="bf16" if args.bf16 else "fp32", device=args.device, grad_clip=None,
        )
        log(f"MAE pre-training: {cfg.steps} steps")
        res = train(mae, mae_loss, train_set, pre, cfg, state_path=work / "mae_state.pt", description="MAE",
                    on_step=step_logger("mae"))
        manifest["phases"]["mae"] = {"config": cfg.to_dict(), "wall_s": res.wall_s, "images_per_s": res.images_per_s,
                                     "final_loss": res.losses[-1] if res.losses else None, "resumed_from": res.resumed_from}
        if main_rank:
            save_checkpoint(mae_ckpt, mae.state_dict(), None)
            write_json_atomic(manifest_path, manifest)
        barrier()
    state, _ = read_checkpoint(mae_ckpt)
    mae.load_state_dict(state)
    mae.to("cpu")

    # Phase 2: LP-FT with labels.
    ft_ckpt = work / "ft.safetensors"
    if not ft_ckpt.is_file():
        if "linear_probe" not in manifest["phases"] or not (work / "ft_state.pt").is_file():  # a saved state holds the LP head
            if main_rank:  # rank 0 fits the probe; the other ranks take its head
                t0 = time.perf_counter()
                lp = fit_linear_probe(encoder, train_set, pre, LinearProbeConfig(device=args.device, bf16=args.bf16))
                lp["test_acc"] = accuracy(encoder, test_set, pre, device=args.device)
                lp["wall_s"] = time.perf_counter() - t0
                log(f"linear probe: {lp}")
                manifest["phases"]["linear_probe"] = lp
                write_json_atomic(manifest_path, manifest)
            head = from_main({k: v.cpu() for k, v in encoder.get_classifier().state_dict().items()} if main_rank else None)
            encoder.get_classifier().load_state_dict(head)
        cfg = TrainConfig(
            steps=steps_for_epochs(args.ft_epochs, len(train_set), args.ft_batch), lr=args.ft_lr,
            batch_size=args.ft_batch, weight_decay=0.05, warmup_frac=0.05, augment="3a", crop_scale=(0.35, 1.0),
            seed=args.seed + 1, precision="bf16" if args.bf16 else "fp32", device=args.device,
        )
        log(f"fine-tuning: {cfg.steps} steps")
        res = train(encoder, classification_loss(0.1), train_set, pre, cfg, state_path=work / "ft_state.pt",
                    description="fine-tune", on_step=step_logger("ft"))
        manifest["phases"]["finetune"] = {"config": cfg.to_dict(), "wall_s": res.wall_s, "images_per_s": res.images_per_s,
                                          "final_loss": res.losses[-1] if res.losses else None, "resumed_from": res.resumed_from}
        if main_rank:
            save_checkpoint(ft_ckpt, encoder.state_dict(), None)
            write_json_atomic(manifest_path, manifest)
        barrier()
    state, _ = read_checkpoint(ft_ckpt)
    load_state_dict_strict(encoder, state)
    encoder.to("cpu")
    if not main_rank:
        return  # rank 0 evaluates and writes the stock

    clean = accuracy(encoder, test_set, pre)
    log(f"clean CIFAR-10 test accuracy: {clean:.2f}%")
    manifest["clean_test_acc"] = clean
    write_json_atomic(manifest_path, manifest)

    meta = model_meta(encoder, made_by="benchmarks/train_stock.py", recipe=vars(args), parents=[])
    OUT.mkdir(parents=True, exist_ok=True)
    save_checkpoint(STOCK, encoder.state_dict(), meta)
    save_checkpoint(DECODER, mae.decoder_state_dict(), CheckpointMeta(**{**meta.__dict__, "provenance": {"made_by": "benchmarks/train_stock.py", "part": "mae_decoder", "decoder": mae.decoder_config.__dict__}}))
    save_pretrained_stock(mae.state_dict(), vars(args))
    write_json_atomic(OUT / "manifest.json", manifest)
    write_text_atomic(OUT / "MODEL_CARD.md", model_card(manifest, clean))
    for stale in WIP.glob("ft_state*"):  # the carried fine-tuning state is finished with
        stale.unlink()
    log(f"wrote {STOCK} and {DECODER}")


def model_card(manifest: dict, clean: float) -> str:
    phases = manifest["phases"]
    env = manifest["environment"]
    wall = sum(p.get("wall_s", 0) for p in phases.values())
    return f"""# CIFAR-10 reference stock: {ARCH}

The "deployed model" of adaptsoup's CIFAR-10 → CIFAR-10-C benchmark, trained from nothing by

    {manifest['command']}

| | |
|---|---|
| architecture | `{ARCH}` (ViT, 32×32 input, 4×4 patches, 192 wide, 6 blocks, 3 heads, class token; 2.69M parameters) |
| MAE pre-training (no labels) | {manifest['args']['mae_epochs']} epochs of CIFAR-10 train, mask ratio 0.75, norm-pix loss, AdamW lr {manifest['args']['mae_lr']} batch {manifest['args']['mae_batch']} wd 0.05, crop+flip |
| fine-tuning (labels) | LP-FT: linear probe (L-BFGS) then {manifest['args']['ft_epochs']} epochs, AdamW lr {manifest['args']['ft_lr']} batch {manifest['args']['ft_batch']} wd 0.05, 3-Augment, label smoothing 0.1 |
| seed | {manifest['args']['seed']} |
| device | {manifest['args']['device']}{' (bf16 autocast)' if manifest['args']['bf16'] else ''}; {env.get('cpu', '')} |
| wall time | {wall / 3600:.2f} h (sum of phases) |
| **clean CIFAR-10 test accuracy** | **{clean:.2f}%** (10,000 test images) |

Files: `{STOCK.name}` (encoder + head, adaptsoup metadata) and `{DECODER.name}` (the MAE decoder,
original MAE key names), loadable with `adaptsoup.core.models.load_model` / `adaptsoup adapt --stock`.
`{PRETRAINED.name}` is the MAE phase before fine-tuning (encoder with an untrained head + decoder): the pre-trained stock for `adapt --pretrained`.
"""


if __name__ == "__main__":
    main()
