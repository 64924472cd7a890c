"""Named recipes a user asks for with ``adapt --preset NAME``: settings that go under the recipe file and
the flags (defaults < preset < ``--config`` < flags), recorded in the run's manifest like any recipe.

``task-vector`` is the label-free recipe that beat its baselines on held-out CIFAR-10-C images
(benchmarks/README.md, "The paper's protocol"): the deployed model plus the mean task vector of two short
MAE inter-trainings of the pre-trained encoder on the target, with no fine-tuning back.  It can also lose
several points on a shift it was not chosen on, so, like every ``adapt`` run, it ends with the label-free
estimates and the deploy recommendation (:mod:`adaptsoup.pipeline.estimates`), and ``export RUN`` exports
what that recommends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adaptsoup.errors import AdaptsoupError


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    settings: dict[str, Any]
    requires: tuple[str, ...] = ()  # recipe keys the user must give (flags or --config)
    why: dict[str, str] = field(default_factory=dict)  # requirement -> what to give


PRESETS: dict[str, Preset] = {
    "task-vector": Preset(
        name="task-vector",
        summary="deployed + 1.5 x the mean MAE task vector of the target (2 runs x 600 steps, lr 1e-5 and 3e-5, batch 64), "
                "no fine-tuning back",
        # the scale was chosen on the tuning split (benchmarks/results/decision_c10c_full_s5_task-vector-tuning.md)
        settings={"finetune_back": False, "task_vector_scale": 1.5,
                  "inter": {"ssl": ["mae"], "lrs": [1e-5, 3e-5], "steps": [600], "batch_size": 64}},
        requires=("pretrained",),
        why={"pretrained": "--pretrained: the pre-trained checkpoint (e.g. the MAE encoder) the deployed model was fine-tuned from"},
    ),
}


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of the preset ``name`` (a copy); an unknown name is a one-line error listing the known ones."""
    if name not in PRESETS:
        raise AdaptsoupError(f"unknown --preset {name!r}; choose from: {', '.join(PRESETS)}")
    import copy

    return copy.deepcopy(PRESETS[name].settings)


def check_requirements(name: str, resolved: dict[str, Any]) -> None:
    """Refuse, in one line, a preset whose required settings were not given."""
    preset = PRESETS[name]
    missing = [preset.why.get(key, f"--{key}") for key in preset.requires if not resolved.get(key)]
    if missing:
        raise AdaptsoupError(f"--preset {name} needs {'; '.join(missing)}")
