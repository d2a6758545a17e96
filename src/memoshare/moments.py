"""Running moments of a stochastic function: mean, variance and count (Welford's update)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Moments"]


@dataclass(frozen=True)
class Moments:
    """Mean, sum of squared deviations (``m2``) and count of the values seen for one key.

    Works for scalars and numpy arrays (element-wise). ``variance`` is the unbiased sample
    variance ``m2 / (count - 1)`` (0 for a single value); ``stderr`` is ``sqrt(variance /
    count)``, the standard error of the mean.
    """

    mean: Any
    m2: Any
    count: int

    @classmethod
    def first(cls, value: Any) -> Moments:
        """The moments of a single observation."""
        m2 = (
            np.zeros(np.shape(value))
            if _is_array(value) or isinstance(value, list | tuple)
            else 0.0
        )
        return cls(mean=_as_float(value), m2=m2, count=1)

    def add(self, value: Any) -> Moments:
        """The moments after one more observation (Welford's numerically stable update)."""
        count = self.count + 1
        delta = _as_float(value) - self.mean
        mean = self.mean + delta / count
        m2 = self.m2 + delta * (_as_float(value) - mean)
        return Moments(mean=mean, m2=m2, count=count)

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of observations (Chan et al.'s parallel formula)."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / count
        return Moments(mean=mean, m2=m2, count=count)

    @property
    def variance(self) -> Any:
        """Unbiased sample variance (0 while ``count < 2``)."""
        if self.count < 2:
            return self.m2 * 0.0
        return self.m2 / (self.count - 1)

    @property
    def stderr(self) -> Any:
        """Standard error of the mean: ``sqrt(variance / count)``."""
        return np.sqrt(self.variance / self.count)

    def converged(self, rtol_stderr: float, min_repetitions: int) -> bool:
        """Whether to stop re-evaluating.

        pyDVL's rule: re-evaluate while ``count <= min_repetitions`` or ``stderr > rtol_stderr
        * |mean|``. (pyDVL compares with the signed mean, so a negative mean never converges;
        memoshare takes its absolute value.) For arrays the rule must hold for *every*
        element; an element whose mean stays at 0 with a non-zero spread therefore keeps the
        function being re-evaluated.
        """
        if self.count <= min_repetitions:
            return False
        return bool(np.all(self.stderr <= rtol_stderr * np.abs(self.mean)))


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray)


def _as_float(value: Any) -> Any:
    if isinstance(value, list | tuple):  # sequences of numbers: averaged element-wise
        return np.asarray(value, dtype=float)
    return value.astype(float) if _is_array(value) and value.dtype.kind in "biu" else value
