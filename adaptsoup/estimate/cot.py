"""COT, Confidence Optimal Transport (Lu et al., "Characterizing Out-of-Distribution Error via Optimal
Transport", NeurIPS 2023).

The estimated target error is the optimal-transport cost between the model's softmax outputs on the
target images and the source label marginal, both as distributions on the probability simplex:

    error = W( (1/N) sum_i delta_{p_i},  sum_k pi_k delta_{e_k} ),     cost c(p, e_k) = ||p - e_k||_1 / 2,

with pi_k the class proportions of the labeled validation images and e_k the one-hot vector of class k.
For a softmax vector the total-variation cost to a one-hot is simply c(p, e_k) = 1 - p_k.  A confident
model whose predicted classes come in the source proportions moves no mass (error 0); a model that
predicts one class for everything must move mass to the other classes even if it is confident.

Solving it: the marginal is written as N one-hot vectors, ``round(N * pi_k)`` of class k (largest
remainders, so the counts sum to N), and the uniform-weight transport becomes an N x N assignment, solved
exactly (``scipy.optimize.linear_sum_assignment``, O(N^3)).  Above ``exact_max`` target images (default
2048: about 0.4 s on one core) the images are split into seeded random batches of at most ``exact_max``,
each assigned exactly to its own one-hot set; this is the official implementation's remedy too (it
subsamples 10,000).  A batched plan is a feasible plan for the whole set, so batching can only raise the
cost: it slightly underestimates accuracy, less so with larger batches.

    COT = 100 * (1 - error)        (estimated accuracy, percent)

Per target image the score is ``100 * (1 - c(p_i, e_{assigned(i)}))``, its cost under the optimal plan;
:mod:`adaptsoup.estimate.bootstrap` resamples these with the plan held fixed (re-solving the assignment
for every resample would cost minutes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptsoup.estimate.checks import check_single, probabilities
from adaptsoup.estimate.registry import register
from adaptsoup.estimate.temperature import fit_temperature

EXACT_MAX = 2048


def class_counts(marginal: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` split into per-class counts proportional to ``marginal`` (largest remainders; ties: lower class)."""
    raw = marginal.to(torch.float64) * n
    counts = raw.floor().to(torch.int64)
    short = n - int(counts.sum())
    if short > 0:
        remainders = raw - counts
        order = sorted(range(len(raw)), key=lambda k: (-float(remainders[k]), k))
        counts[order[:short]] += 1
    return counts


def assignment_costs(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each row's cost 1 - p_{i,k} in the cheapest assignment of the rows to ``counts[k]`` one-hots of class k."""
    from scipy.optimize import linear_sum_assignment

    columns = torch.repeat_interleave(torch.arange(len(counts)), counts)
    cost = 1.0 - probs[:, columns]  # [n, n]: image i to the j-th one-hot
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty(probs.shape[0], dtype=torch.float64)
    out[torch.as_tensor(rows)] = cost[torch.as_tensor(rows), torch.as_tensor(cols)]
    return out


def transport_costs(probs: torch.Tensor, marginal: torch.Tensor, exact_max: int = EXACT_MAX, seed: int = 0) -> torch.Tensor:
    """Per-image transport cost to the label marginal: one exact assignment, or seeded batches above ``exact_max``."""
    n = probs.shape[0]
    if n <= exact_max:
        return assignment_costs(probs, class_counts(marginal, n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    costs = torch.empty(n, dtype=torch.float64)
    for batch in order.tensor_split(math.ceil(n / exact_max)):
        costs[batch] = assignment_costs(probs[batch], class_counts(marginal, len(batch)))
    return costs


@dataclass(frozen=True)
class COTState:
    marginal: torch.Tensor  # [C] source class proportions


def fit(validation_probs: torch.Tensor, validation_labels: torch.Tensor, config=None) -> COTState:
    counts = torch.bincount(validation_labels, minlength=validation_probs.shape[1]).to(torch.float64)
    return COTState(counts / counts.sum())


def image_scores(target_probs: torch.Tensor, state: COTState, config=None) -> torch.Tensor:
    exact_max = getattr(config, "cot_exact_max", EXACT_MAX)
    seed = getattr(config, "seed", 0)
    return (1.0 - transport_costs(target_probs, state.marginal, exact_max, seed)) * 100.0


ESTIMATOR = register("cot", fit, image_scores)


def cot(target_logits: torch.Tensor, validation_logits: torch.Tensor, validation_labels, *,
        temperature: float | None = None, exact_max: int = EXACT_MAX, seed: int = 0) -> float:
    """COT's estimated target accuracy in percent (``temperature``: fitted on validation when None, 1.0 for none)."""
    target, validation, labels = check_single(target_logits, validation_logits, validation_labels)
    t = fit_temperature(validation, labels) if temperature is None else temperature
    state = fit(probabilities(validation, t), labels)
    return float((1.0 - transport_costs(probabilities(target, t), state.marginal, exact_max, seed)).mean() * 100.0)
