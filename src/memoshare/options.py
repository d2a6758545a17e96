"""Checking options once, where they are given: helpers shared by the option dataclasses."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_bool", "check_int", "check_seconds", "check_real"]


def check_real(owner: str, name: str, value: Any, *, minimum: float, inclusive: bool) -> float:
    """``value`` as a finite real number above ``minimum`` (or at it, if ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__qualname__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    if value < minimum or (value == minimum and not inclusive):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{owner}: {name} must be {relation} {minimum:g}, got {value!r}")
    return value


def check_seconds(owner: str, name: str, value: Any, *, zero: bool = False) -> float:
    """A finite duration in seconds: > 0 (or >= 0 if ``zero`` is allowed)."""
    return check_real(owner, name, value, minimum=0.0, inclusive=zero)


def check_int(owner: str, name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int of at least ``minimum`` (``True`` is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool (``0``/``1`` and other truthy values are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return value
