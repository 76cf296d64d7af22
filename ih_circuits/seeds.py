"""Random streams: one generator per seed, and independent seeds derived from a run seed for each purpose."""

from __future__ import annotations

import hashlib

import torch

from ih_circuits.checks import check_generator, check_int


def make_generator(seed: int | None = None, generator: torch.Generator | None = None) -> torch.Generator:
    """One random stream: from ``generator`` if given, else a CPU generator seeded with ``seed``.

    With neither, a fresh nondeterministic seed is used. Giving both is an error.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        return check_generator(generator)
    fresh = torch.Generator()
    if seed is None:
        fresh.seed()
    else:
        fresh.manual_seed(check_int(seed, "seed", 0, 2**63 - 1, high_text="2**63 - 1"))
    return fresh


def derive_seed(seed: int, *purpose: object) -> int:
    """An independent 63-bit seed for one purpose (data at a step, evaluation, ...) of a run seed.

    >>> derive_seed(0, "eval") == derive_seed(0, "eval") != derive_seed(1, "eval")
    True
    """
    digest = hashlib.sha256(":".join(map(str, (seed, *purpose))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
