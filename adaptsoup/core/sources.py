"""Where a model comes from: a checkpoint file, or one of timm's own sources, always without the network.

* ``PATH`` — a checkpoint file (``.safetensors``, ``.pt``, ...) or a folder written by ``timm.models.save_for_hf``;
* ``local-dir:PATH`` — such a folder (``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``);
* ``hf-hub:ORG/NAME[@REVISION]`` — that repository's snapshot in the local Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), looked up offline.

:func:`resolve_model_source` turns any of these into a local path; :func:`adaptsoup.core.checkpoint.read_checkpoint`
reads what it returns, so every command that takes a model takes every source.
"""

from __future__ import annotations

import os
from pathlib import Path

from adaptsoup.errors import CheckpointError

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as the environment names it now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def is_source_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a timm source (``local-dir:`` / ``hf-hub:``) rather than a path."""
    return str(spec).startswith((LOCAL_DIR, HF_HUB))


def resolve_model_source(spec: str | os.PathLike) -> Path:
    """The local file or timm folder ``spec`` names; a one-line :class:`CheckpointError` when there is none."""
    text = str(spec)
    if text.startswith(LOCAL_DIR):
        return timm_folder(Path(text[len(LOCAL_DIR):]).expanduser(), spec=text)
    if text.startswith(HF_HUB):
        return timm_folder(_hub_snapshot(text[len(HF_HUB):]), spec=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return timm_folder(path, spec=text)
    return path


def timm_folder(folder: Path, spec: str) -> Path:
    """``folder`` if it holds a timm model (config and weights), else an error naming what is missing."""
    if not folder.is_dir():
        raise CheckpointError(f"{spec}: no such folder {folder}")
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{spec}: {folder} has no {CONFIG} (expected a folder written by timm.models.save_for_hf)")
    if not any((folder / name).is_file() for name in WEIGHTS):
        raise CheckpointError(f"{spec}: {folder} holds no weights ({' or '.join(WEIGHTS)})")
    return folder


def _hub_snapshot(repo: str) -> Path:
    """The cached snapshot of ``ORG/NAME[@REVISION]``, found with the network off."""
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"hf-hub:{repo}: expected hf-hub:ORG/NAME (for example hf-hub:timm/vit_base_patch16_224.mae)")
    cache = hf_cache_dir()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise CheckpointError(f"hf-hub:{repo} is not in the local Hugging Face cache {cache} (adaptsoup never downloads: "
                              f"fetch it on a machine with network, e.g. `hf download {repo_id}`, and copy the cache, "
                              f"or set HF_HUB_CACHE)") from None
