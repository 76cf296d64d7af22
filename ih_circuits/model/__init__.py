"""The paper's model (PAPER.md §2): config, copier, selector, classifier and the hooked transformer."""

from ih_circuits.model.config import IHConfig
from ih_circuits.model.transformer import IHTransformer, ideal_model

__all__ = ["IHConfig", "IHTransformer", "ideal_model"]
