"""Held-out accuracy of a mixed model on a few labeled images: how season, greedy and best compare mixes.

With the task's classes, the mixed model's own classifier scores every labeled image; without them (or on
request) k-NN accuracy does, on a seeded split of the labeled images into retrieval and evaluation parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adaptsoup.core.data import ImageSet, Preprocess
from adaptsoup.core.models import class_names
from adaptsoup.errors import AdaptsoupError
from adaptsoup.soup.knn import KNN_K, knn_accuracy, split_retrieval_eval
from adaptsoup.soup.stacked import StackedIngredients, mixed_features

ScoreKind = Literal["auto", "classifier", "knn"]


@dataclass
class ScoringOptions:
    """How a labeled method scores a mix: ``score`` auto means the classifier when the classes match."""

    score: ScoreKind = "auto"
    k: int = KNN_K
    split: float = 0.5  # fraction of the labeled images that k-NN retrieves among
    seed: int = 0


@dataclass
class Scorer:
    """Held-out accuracy (percent) of θ(α): its classifier on all labeled images, or k-NN on a split."""

    model: nn.Module
    labeled: ImageSet
    pre: Preprocess
    use_classifier: bool
    k: int = KNN_K
    split: float = 0.5
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        self.retrieval, self.evaluation = split_retrieval_eval(len(self.labeled), self.split, self.seed)
        self.num_classes = int(self.labeled.labels.max()) + 1 if not self.labeled.class_names else len(self.labeled.class_names)

    @property
    def kind(self) -> str:
        return "classifier" if self.use_classifier else f"{self.k}-NN"

    def __call__(self, stack: StackedIngredients, alpha: torch.Tensor) -> float:
        if self.use_classifier:
            logits = mixed_features(self.model, stack, alpha, self.labeled, self.pre, self.batch_size, want="logits")
            return float((logits.argmax(1) == self.labeled.labels).float().mean() * 100)
        feats = mixed_features(self.model, stack, alpha, self.labeled, self.pre, self.batch_size)
        return knn_accuracy(feats, self.labeled.labels, self.retrieval, self.evaluation, self.num_classes, self.k)


def make_scorer(model: nn.Module, labeled: ImageSet | None, pre: Preprocess, options: ScoringOptions, auto: str = "classifier") -> Scorer:
    """The scorer ``options`` ask for.  ``score="auto"`` takes the method's preference ``auto`` (classifier or
    knn); the classifier only ever scores when the labeled folder's classes are the model's."""
    if labeled is None:
        raise AdaptsoupError("this method needs a few labels: pass --labeled DIR (a class_name/<image> folder)")
    if options.score not in ("auto", "classifier", "knn"):
        raise AdaptsoupError(f"--score must be auto, classifier or knn, got {options.score!r}")
    matches = list(labeled.class_names) == class_names(model)
    if options.score == "classifier" and not matches:
        raise AdaptsoupError("--score classifier needs the labeled folder's classes to be the model's classes")
    wanted = auto if options.score == "auto" else options.score
    use_classifier = matches and wanted == "classifier"
    return Scorer(model, labeled, pre, use_classifier, k=options.k, split=options.split, seed=options.seed)


def score_each(stack: StackedIngredients, scorer: Scorer) -> list[float]:
    """Each ingredient's own held-out score."""
    return [scorer(stack, torch.eye(stack.count, dtype=torch.float64)[i]) for i in range(stack.count)]
