"""Builders for small models with overrides."""

import torch

from ih_circuits import IHConfig, IHTransformer


def tiny_config(**overrides) -> IHConfig:
    base = {"d_vocab": 3, "n_ctx": 24, "n_heads": 3, "window": 3, "max_degree": 2}
    return IHConfig(**{**base, **overrides})


def randomized(model: IHTransformer, seed: int = 0) -> IHTransformer:
    """Give every parameter a random value so that no path hides behind the symmetric initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        model.classifier.a.fill_(3.0)
    return model


def random_tokens(batch: int, pos: int, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d, (batch, pos), generator=torch.Generator().manual_seed(seed))


def identity_hooks(model: IHTransformer) -> list:
    """A no-op forward hook on every hook point: the model then builds every dense activation."""
    return [(name, lambda x, hook: x) for name in model.hook_dict]
