"""ih_circuits: generalized induction heads (Chen, Sheen, Wang, Yang, NeurIPS 2024) as a TransformerLens tool.

Data and Bayes baselines (``NGramTask``, ``RepeatedTokens``, ``bayes_predictive``, ``gih_predictive``), the
selection theory (``ih_circuits.theory``) and sweeps that compare it with training over a grid
(``ih_circuits.sweep``), the paper's two-layer model as a TransformerLens
``HookedRootModule``, training, probes for any TransformerLens model and views. See README.md for the tour.
"""

from ih_circuits import baselines, model, probes, sources, sweep, theory, views
from ih_circuits.memory import MemoryBudgetError, memory_limit, set_memory_limit
from ih_circuits.model import IHActivationCache, IHConfig, IHTransformer, get_act_patch_stage_out, ideal_model
from ih_circuits.predictors import (
    ModelAveraging,
    accuracy,
    bayes_predictive,
    candidate_parent_sets,
    gih_predictive,
    kl_divergence,
    last_position_nll,
    model_averaging,
    model_averaging_predictive,
    next_token_nll,
    oracle_predictive,
    unigram_predictive,
)
from ih_circuits.presets import PRESETS, train_preset
from ih_circuits.priors import DirichletPrior, KernelPrior, SparseSupportPrior, register_prior
from ih_circuits.reporting import report
from ih_circuits.sources import DataSource, RepeatedTokens
from ih_circuits.task import NGramBatch, NGramTask
from ih_circuits.training import Stage, TrainConfig, TrainingDiverged, TrainingRun, train

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
