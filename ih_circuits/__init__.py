"""ih_circuits: generalized induction heads (Chen, Sheen, Wang, Yang, NeurIPS 2024) as a TransformerLens tool.

Data and Bayes baselines (``NGramTask``, ``RepeatedTokens``, ``bayes_predictive``, ``gih_predictive``), the
selection theory (``ih_circuits.theory``) and sweeps that compare it with training over a grid
(``ih_circuits.sweep``), the paper's two-layer model as a TransformerLens
``HookedRootModule``, training, probes for any TransformerLens model and views. See README.md for the tour.
"""

import importlib
from typing import Any

# Each public name and the module that defines it. They load on first use (PEP 562), so `import ih_circuits` and
# the `ih-circuits` command start without torch, and a Ctrl-C while torch loads is the command's own "interrupted".
_SUBMODULES = ("baselines", "model", "optimal", "ordinary", "probes", "sources", "sweep", "theory", "views")
_HOMES = {
    "ih_circuits.checkpoint": ("SaveError",),
    "ih_circuits.memory": ("MemoryBudgetError", "memory_limit", "set_memory_limit"),
    "ih_circuits.model": ("IHActivationCache", "IHConfig", "IHTransformer", "get_act_patch_stage_out", "ideal_model"),
    "ih_circuits.predictors": (
        "ModelAveraging",
        "accuracy",
        "bayes_predictive",
        "candidate_parent_sets",
        "gih_predictive",
        "kl_divergence",
        "last_position_nll",
        "model_averaging",
        "model_averaging_predictive",
        "next_token_nll",
        "oracle_predictive",
        "unigram_predictive",
    ),
    "ih_circuits.presets": ("PRESETS", "train_preset"),
    "ih_circuits.priors": ("DirichletPrior", "KernelPrior", "SparseSupportPrior", "register_prior"),
    "ih_circuits.reporting": ("report",),
    "ih_circuits.sources": ("DataSource", "RepeatedTokens"),
    "ih_circuits.task": ("NGramBatch", "NGramTask"),
    "ih_circuits.training": ("Stage", "TrainConfig", "TrainingDiverged", "TrainingRun", "train"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here."""
    if name in _SUBMODULES:
        value = importlib.import_module(f"ih_circuits.{name}")
    elif name in _HOME_OF:
        value = getattr(importlib.import_module(_HOME_OF[name]), name)
    else:
        raise AttributeError(f"module 'ih_circuits' has no attribute {name!r}")
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "DataSource",
    "DirichletPrior",
    "IHActivationCache",
    "IHConfig",
    "IHTransformer",
    "KernelPrior",
    "MemoryBudgetError",
    "ModelAveraging",
    "NGramBatch",
    "NGramTask",
    "PRESETS",
    "RepeatedTokens",
    "SaveError",
    "SparseSupportPrior",
    "Stage",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingRun",
    "__version__",
    "accuracy",
    "baselines",
    "bayes_predictive",
    "candidate_parent_sets",
    "get_act_patch_stage_out",
    "gih_predictive",
    "ideal_model",
    "kl_divergence",
    "last_position_nll",
    "memory_limit",
    "model",
    "model_averaging",
    "model_averaging_predictive",
    "next_token_nll",
    "optimal",
    "ordinary",
    "oracle_predictive",
    "probes",
    "register_prior",
    "report",
    "set_memory_limit",
    "sources",
    "sweep",
    "theory",
    "train",
    "train_preset",
    "unigram_predictive",
    "views",
]


def __dir__() -> list[str]:
    """The public names only: submodules loaded as a side effect of imports (``task``, ``chain``, ...) stay out."""
    return sorted(__all__)
