"""Memory budgets: estimate a large allocation before making it, and refuse it with a message that says what to change.

Two numbers govern memory:

- the **limit** (``memory_limit()``): the most one allocation-heavy step (drawing kernels, the theory's
  enumeration, the selector's subset products) may need. Above it the step raises ``MemoryBudgetError`` (a
  ``ValueError``) before allocating, saying how much it needs and which argument to change. The default is half
  of this machine's memory; ``set_memory_limit("2GB")`` or the environment variable
  ``IH_CIRCUITS_MEMORY_LIMIT`` overrides it.
- the **chunk size** (``CHUNK_BYTES``, 64 MiB): work that splits over sequences or kernels (evaluation, Bayes
  counts, the theory) runs in pieces of about this much working memory, whatever the total.
"""

from __future__ import annotations

import os
import re

from ih_circuits.checks import check_real

CHUNK_BYTES = 2**26
DEFAULT_FRACTION = 0.5
ENVIRONMENT_VARIABLE = "IH_CIRCUITS_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_explicit_limit: int | None = None


class MemoryBudgetError(ValueError):
    """A step would need more memory than ``memory_limit()`` allows; nothing was allocated."""


def format_bytes(n_bytes: int | float) -> str:
    """``1.5 GB`` style (powers of 1000)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"


def parse_bytes(value: int | float | str, name: str = "limit") -> int:
    """A byte count from a number or a string such as ``"2GB"``, ``"512 MiB"``; must be positive."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(f"{name} must be a byte count such as 2000000000, '2GB' or '512MiB'; got {value!r}")
        value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    return int(check_real(value, f"{name} (a byte count)", 1))


def machine_memory() -> int:
    """Physical memory of this machine in bytes (8 GB where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 * 10**9


def memory_limit() -> int:
    """The limit in bytes: ``set_memory_limit``'s value, else ``IH_CIRCUITS_MEMORY_LIMIT``, else half the machine."""
    if _explicit_limit is not None:
        return _explicit_limit
    if os.environ.get(ENVIRONMENT_VARIABLE):
        return parse_bytes(os.environ[ENVIRONMENT_VARIABLE], ENVIRONMENT_VARIABLE)
    return int(DEFAULT_FRACTION * machine_memory())


def set_memory_limit(limit: int | float | str | None) -> int | None:
    """Set the limit (bytes, or a string like ``"2GB"``); ``None`` restores the default.

    Returns the previous explicit setting (None if there was none), so a caller can restore it.
    """
    global _explicit_limit
    previous = _explicit_limit
    _explicit_limit = None if limit is None else parse_bytes(limit)
    return previous


def check_memory(n_bytes: int | float, what: str, change: str) -> None:
    """Raise ``MemoryBudgetError`` if ``n_bytes`` exceeds the limit.

    Args:
        n_bytes: the estimate.
        what: the step, e.g. ``"sampling 2048 kernels of 1000 x 1000"``.
        change: the arguments that shrink it, e.g. ``"batch_size or vocab_size"``.
    """
    limit = memory_limit()
    if n_bytes > limit:
        raise MemoryBudgetError(
            f"{what} needs about {format_bytes(n_bytes)}, above the memory limit of {format_bytes(limit)}; "
            f"lower {change}, or raise the limit with ih_circuits.set_memory_limit(...) or {ENVIRONMENT_VARIABLE}"
        )


def items_per_chunk(n_items: int, bytes_per_item: int | float) -> int:
    """How many items to process at once so that a chunk needs about ``CHUNK_BYTES``, or a quarter of the limit
    if that is smaller (at least 1)."""
    budget = min(CHUNK_BYTES, memory_limit() // 4)
    return max(1, min(n_items, int(budget // max(bytes_per_item, 1))))
