"""A label-free safety reset for test-time adaptation: :class:`DriftGuard` compares, batch by batch, the adapted
model's predictions (made before the batch's update) with those of a frozen copy of the unadapted model on the
same images, and asks for a reset when, over a moving window of batches,

* the two agree on fewer than ``min_agreement`` of the window's images, or
* the entropy of the adapted model's mean prediction over the window (its *marginal entropy*) falls below
  ``min_marginal_ratio`` times the unadapted model's (class collapse).

Why these signals: adaptation that helps changes a minority of the predictions, whereas collapse, the known
failure of entropy minimisation (Tent, SAR) over long continual streams (e.g. DeYO's collapse in CoLA's
Table 1), moves most predictions onto a few classes, which drives both the agreement with the unadapted model
and the marginal entropy down.  The entropy of the predictions themselves cannot tell collapse from
confidence, since collapse lowers it too.  Agreement with a fixed reference model is the signal
agreement-based label-free accuracy estimators build on; here the reference is the model the stream started
from.  What the rule bounds: on every window that passes, the adapted model's accuracy is at most
``1 - min_agreement`` below the unadapted model's on those images (they differ only where they disagree).

The guard costs one extra forward pass of the unadapted model per batch, without gradients.  It fires only
on a full window, and its window restarts after every reset.
"""

from __future__ import annotations

import copy
import math
from collections import deque

import torch
from torch import nn

from adaptsoup.errors import AdaptsoupError


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of rows of two ``[N, C]`` logit tensors with the same argmax."""
    return float((a.argmax(dim=1) == b.argmax(dim=1)).float().mean())


def entropy_of(p: torch.Tensor) -> float:
    """The entropy (nats) of one probability vector; 0·log 0 = 0."""
    return float(-torch.special.xlogy(p, p).sum())


def marginal_entropy(logits: torch.Tensor) -> float:
    """The entropy of the batch's mean softmax: ln C for a uniform mean prediction, 0 when every image puts
    all its probability on the same class."""
    return entropy_of(logits.float().softmax(dim=1).mean(dim=0))


def check_guard_settings(window: int, min_agreement: float, min_marginal_ratio: float) -> None:
    """Refuse a window below 1 and thresholds outside [0, 1]."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise AdaptsoupError(f"guard_window must be an integer >= 1, got {window!r}")
    for name, value in (("guard_min_agreement", min_agreement), ("guard_min_marginal_ratio", min_marginal_ratio)):
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise AdaptsoupError(f"{name} must be in [0, 1], got {value!r}")


def floor2(value: float) -> str:
    """``value`` rounded down to two decimals, so that a value below a threshold never reads as equal to it."""
    return f"{math.floor(value * 100) / 100:.2f}"


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that never trains: eval mode, no gradients, on the same device and in the same dtype."""
    anchor = copy.deepcopy(model).eval()
    for p in anchor.parameters():
        p.requires_grad_(False)
        p.grad = None
    return anchor


class DriftGuard:
    """A moving window of both models' logits on the last ``window`` batches; :meth:`observe` adds one batch and
    returns why to reset (and restarts the window), or None.  A threshold of 0 turns its signal off."""

    def __init__(self, window: int = 8, min_agreement: float = 0.5, min_marginal_ratio: float = 0.5) -> None:
        check_guard_settings(window, min_agreement, min_marginal_ratio)
        self.window = window
        self.min_agreement = min_agreement
        self.min_marginal_ratio = min_marginal_ratio
        self.signals: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window)  # (adapted, unadapted) logits

    def restart(self) -> None:
        self.signals.clear()

    def observe(self, adapted_logits: torch.Tensor, anchor_logits: torch.Tensor) -> str | None:
        """Add a batch (the adapted model's logits before its update, the unadapted model's on the same images);
        on a full window whose signals cross a threshold, restart the window and return the reason."""
        adapted, anchor = adapted_logits.detach().float().cpu(), anchor_logits.detach().float().cpu()
        if adapted.shape != anchor.shape:
            raise AdaptsoupError(f"guard: the adapted and unadapted logits differ in shape: {tuple(adapted.shape)} vs {tuple(anchor.shape)}")
        self.signals.append((adapted, anchor))
        if len(self.signals) < self.window:
            return None
        reasons = []
        window_adapted, window_anchor = (torch.cat(side) for side in zip(*self.signals))
        agree = agreement(window_adapted, window_anchor)
        if agree < self.min_agreement:
            reasons.append(f"agreement {floor2(agree)} < {self.min_agreement:g}")
        adapted_h, anchor_h = marginal_entropy(window_adapted), marginal_entropy(window_anchor)
        if adapted_h < self.min_marginal_ratio * anchor_h:
            reasons.append(f"marginal entropy ratio {floor2(adapted_h / anchor_h)} < {self.min_marginal_ratio:g}")
        if not reasons:
            return None
        self.restart()
        return "; ".join(reasons) + f" over {self.window} batches"
