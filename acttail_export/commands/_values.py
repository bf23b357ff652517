"""Flag values the commands parse themselves (argparse gives strings), with one-line errors naming the flag."""

from __future__ import annotations

import math

from ..errors import ActTailError


def finite_float(value: str, flag: str) -> float:
    """``value`` as a finite float, else ActTailError naming ``flag``."""
    try:
        number = float(value)
    except ValueError:
        raise ActTailError(f"{flag} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ActTailError(f"{flag} must be finite, got {value!r}")
    return number


def epsilon_flag(value: str | None) -> float | None:
    """``--epsilon`` as given (a string, or None when not passed): a number in [0, 1), else a one-line ActTailError."""
    from ..config import check_epsilon

    return None if value is None else check_epsilon(finite_float(value, "--epsilon"), "--epsilon")
