"""adaptsoup: Self-Soupervision — make a deployed ViT robust to distribution shift without target labels.

Importing the package registers adaptsoup's small ViT architectures with timm.
"""

from adaptsoup.core import models  # noqa: F401  (registers the architectures)
from adaptsoup.core.checkpoint import CheckpointMeta, read_checkpoint, save_checkpoint
from adaptsoup.core.models import load_model

__all__ = ["CheckpointMeta", "load_model", "read_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"
