"""Argument checks shared by every module, written once: each names the argument and its allowed range.

This is the bottom layer of the package: it imports nothing from ``ih_circuits``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def is_int(value: Any) -> bool:
    """True for a Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """True for a Python ``int`` or ``float`` that is not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(low: Any, high: Any, low_text: str | None, high_text: str | None, strict: tuple[bool, bool]) -> str:
    low_shown = low_text or repr(low)
    high_shown = high_text or repr(high)
    if low is not None and high is not None:
        return f" in {'(' if strict[0] else '['}{low_shown}, {high_shown}{')' if strict[1] else ']'}"
    if low is not None:
        return f" {'>' if strict[0] else '>='} {low_shown}"
    if high is not None:
        return f" {'<' if strict[1] else '<='} {high_shown}"
    return ""


def check_int(
    value: Any,
    name: str,
    low: int | None = None,
    high: int | None = None,
    *,
    low_text: str | None = None,
    high_text: str | None = None,
) -> int:
    """Return ``value`` if it is an integer (not a bool) with low <= value <= high, else raise ``ValueError``.

    ``low_text`` / ``high_text`` say where a bound comes from, e.g. ``"max(parents) + 1 = 3"``.

    >>> check_int(3, "window", 1)
    3
    >>> check_int(0, "window", 1)
    Traceback (most recent call last):
    ...
    ValueError: window must be an integer >= 1; got 0
    """
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = _bounds(low, high, low_text, high_text, (False, False))
        raise ValueError(f"{name} must be an integer{bounds}; got {value!r}")
    return value


def check_real(
    value: Any,
    name: str,
    low: float | int | None = None,
    high: float | int | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    low_text: str | None = None,
) -> float:
    """Return ``value`` as a float if it is a real number (not a bool, not NaN) inside the bounds, else raise.

    Bounds are closed unless ``low_open`` / ``high_open``; ``finite=False`` also admits +-inf (still bounded).

    >>> check_real(0.5, "lr", 0.0, low_open=True)
    0.5
    >>> check_real(float("nan"), "lr", 0.0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: lr must be a finite number > 0.0; got nan
    """
    ok = is_real(value) and not math.isnan(value) and (not finite or math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "a finite number" if finite else "a number"
        bounds = _bounds(low, high, low_text, None, (low_open, high_open))
        raise ValueError(f"{name} must be {kind}{bounds}; got {value!r}")
    return float(value)


def check_tokens(tokens: Any, d_vocab: int | None, name: str = "tokens") -> int:
    """Validate a ``[batch, pos]`` integer token batch before any computation; return the vocabulary size used.

    ``d_vocab=None`` infers d as max(tokens) + 1 (pass it whenever a token may be absent).
    """
    if d_vocab is not None:
        check_int(d_vocab, "d_vocab", 2)
    if not isinstance(tokens, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids; got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype; got {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, pos]; got {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"{name} must be non-empty; got shape {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if d_vocab is None:
        d_vocab = max(high + 1, 2)
    if low < 0 or high >= d_vocab:
        raise ValueError(f"{name} must be integers in [0, d_vocab={d_vocab}); got min {low}, max {high}")
    return d_vocab


def parse_device(device: Any, name: str = "device") -> torch.device:
    """Return ``torch.device(device)`` for a device that can hold values, else raise ``ValueError``: an unparsable
    string, or ``"meta"`` (tensors without values: nothing to train or probe). Whether this machine has it is
    ``check_device``'s question: a config naming ``"cuda"`` stays valid data on a CPU machine.

    >>> parse_device("cuda:1")
    device(type='cuda', index=1)
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda'; got {device!r} ({error})") from None
    if parsed.type == "meta":
        raise ValueError(
            f"{name}='meta' holds no values, so nothing can be trained or probed there; use 'cpu' or 'cuda'"
        )
    return parsed


def check_device(device: Any, name: str = "device") -> torch.device:
    """``parse_device``, and refuse a device this torch build or machine lacks (``"cuda"`` on a CPU build is an
    ``AssertionError`` deep inside torch otherwise).

    >>> check_device("cpu")
    device(type='cpu')
    """
    parsed = parse_device(device, name)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(parsed.type, False):
        raise ValueError(
            f"{name}={device!r} is not available here (torch {torch.__version__}, CUDA available: "
            f"{torch.cuda.is_available()}); use 'cpu' or a device this machine has (a model saved elsewhere: "
            "IHTransformer.from_pretrained(directory, device='cpu'))"
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"{name}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def check_generator(generator: Any, name: str = "generator") -> torch.Generator:
    """Return ``generator`` if it is a ``torch.Generator``, else raise ``ValueError`` naming the argument."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"{name} must be a torch.Generator (or pass seed=); got {type(generator).__name__}")
    return generator
