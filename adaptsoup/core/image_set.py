"""The decoded images of one folder, as every stage takes them: one uint8 tensor ``[N, 3, H, W]`` at the
model's input size, the images' names, their labels when the folder is labeled, and what was skipped.

:func:`adaptsoup.core.data.load_folder` makes one from a folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class ImageSet:
    """Decoded images of one folder: ``images`` uint8 ``[N, 3, H, W]``; ``labels`` int64 ``[N]`` or None."""

    images: torch.Tensor
    paths: list[str]
    labels: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    root: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(
            images=self.images[idx],
            paths=[self.paths[i] for i in idx.tolist()],
            labels=None if self.labels is None else self.labels[idx],
            class_names=list(self.class_names),
            skipped=list(self.skipped),
            root=self.root,
        )

    def counts(self) -> dict[str, int]:
        return {"images": len(self), "skipped": len(self.skipped)}

