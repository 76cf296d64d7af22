"""The paper's model (PAPER.md §2): config, copier, selector, classifier, the hooked transformer, its cache and
its stage-patching sweep."""

from ih_circuits.model.cache import IHActivationCache
from ih_circuits.model.config import IHConfig
from ih_circuits.model.patching import STAGES, get_act_patch_stage_out
from ih_circuits.model.transformer import IHTransformer, ideal_model

__all__ = ["STAGES", "IHActivationCache", "IHConfig", "IHTransformer", "get_act_patch_stage_out", "ideal_model"]
