"""Label-free estimates of a model's accuracy on the target images, and a conservative deploy decision.

Every estimator is a pure function on logits (float64), one per module, registered by name:

=============  ==========================  ============================================================
estimator      module                      what it looks at
=============  ==========================  ============================================================
``atc-ne``     :mod:`.atc`                 target images above the validation-fitted negative-entropy threshold
``atc-mc``     :mod:`.atc`                 the same with the maximum softmax probability
``doc``        :mod:`.doc`                 the drop in mean confidence from validation to target
``cot``        :mod:`.cot`                 optimal transport from target softmax outputs to the label marginal
``aline-s``    :mod:`.aline`               agreement-on-the-line across models, applied to ID accuracy
``aline-d``    :mod:`.aline`               agreement-on-the-line, pairwise least squares
=============  ==========================  ============================================================

All but ALine see temperature-scaled softmax outputs (:mod:`.temperature`, fitted per model on the
labeled validation images).  :mod:`.decision` holds the deploy rule, :mod:`.bootstrap` its interval,
:mod:`.config` every knob, and :mod:`.run` the two calls a pipeline makes:

- :func:`estimate_models` ``(target_logits, validation_logits, validation_labels, config) -> dict``
- :func:`estimate_and_recommend` ``(..., deployed, config, decision) -> dict`` with ``"recommendation"``.
"""

from adaptsoup.estimate import atc, cot, doc  # noqa: F401  (registers the single-model estimators)
from adaptsoup.estimate.aline import ALineResult, aline
from adaptsoup.estimate.atc import atc as atc_estimate
from adaptsoup.estimate.config import ALineConfig, DecisionConfig, EstimateConfig
from adaptsoup.estimate.cot import cot as cot_estimate
from adaptsoup.estimate.decision import Recommendation, recommend
from adaptsoup.estimate.doc import doc as doc_estimate
from adaptsoup.estimate.run import estimate_and_recommend, estimate_models
from adaptsoup.estimate.temperature import fit_temperature

__all__ = [
    "ALineConfig", "ALineResult", "DecisionConfig", "EstimateConfig", "Recommendation", "aline", "atc_estimate", "cot_estimate",
    "doc_estimate", "estimate_and_recommend", "estimate_models", "fit_temperature", "recommend",
]
