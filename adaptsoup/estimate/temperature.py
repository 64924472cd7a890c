"""Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017).

One scalar T per model, fitted on its labeled validation logits z (labels y) by minimising the negative
log-likelihood

    NLL(T) = mean_i [ logsumexp_k(z_ik / T) - z_{i,y_i} / T ].

With beta = 1/T the NLL is convex in beta (a log-sum-exp of a linear function minus a linear function),
and its derivative

    dNLL/dbeta = mean_i [ sum_k p_ik z_ik - z_{i,y_i} ],   p_i = softmax(beta * z_i),

rises with beta.  The optimum is where it crosses zero: found by bisection on log(beta) within
[1/T_MAX, 1/T_MIN] (60 halvings: float64 precision, no step size to tune).  When the derivative keeps
one sign over the bracket the optimum lies outside it and T is clamped: a model that is right on every
validation image wants T -> 0 and gets T_MIN.
"""

from __future__ import annotations

import math

import torch

from adaptsoup.estimate.checks import as_labels, as_logits

T_MIN, T_MAX = 0.01, 100.0
HALVINGS = 60


def temperature_nll(validation_logits: torch.Tensor, validation_labels, temperature: float) -> float:
    """NLL(T) above: the mean negative log-likelihood of the labels under softmax(z / T)."""
    logits = as_logits(validation_logits, "validation")
    labels = as_labels(validation_labels, logits.shape[0], logits.shape[1])
    scaled = logits / temperature
    return float((torch.logsumexp(scaled, dim=1) - scaled.gather(1, labels[:, None]).squeeze(1)).mean())


def fit_temperature(validation_logits: torch.Tensor, validation_labels) -> float:
    """The temperature T in [T_MIN, T_MAX] that minimises the validation NLL (see the module docstring)."""
    logits = as_logits(validation_logits, "validation")
    labels = as_labels(validation_labels, logits.shape[0], logits.shape[1])
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)

    def slope(log_beta: float) -> float:  # dNLL/dbeta at beta = exp(log_beta); its sign is all bisection needs
        p = torch.softmax(logits * math.exp(log_beta), dim=1)
        return float(((p * logits).sum(dim=1) - true_logit).mean())

    low, high = math.log(1.0 / T_MAX), math.log(1.0 / T_MIN)
    if slope(low) >= 0:
        return T_MAX  # the NLL still falls as beta shrinks below 1/T_MAX
    if slope(high) <= 0:
        return T_MIN  # the NLL still falls as beta grows past 1/T_MIN
    for _ in range(HALVINGS):
        middle = (low + high) / 2
        if slope(middle) < 0:
            low = middle
        else:
            high = middle
    return 1.0 / math.exp((low + high) / 2)
