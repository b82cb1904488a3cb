r"""Uncertainty, the same way on every results page: three intervals and one rule that turns an interval into words.

* :func:`t_interval` — a mean over a few independent runs (seeds) with its Student-t 95 % interval. With 3 seeds
  the interval is ``mean ± 4.30 · s / sqrt(3)`` (t with 2 degrees of freedom), not ``mean ± 1.96 · SE``.
* :func:`paired_bootstrap` — the mean of paired differences (two scorers on the same pairs, two methods on the same
  seeds) with a percentile bootstrap 95 % interval that resamples the pairs together.
* :func:`wilson` — a proportion (accuracy on ``n`` independent items) with its Wilson score 95 % interval.
* :func:`slope` — the least-squares slope of a curve (per step), the per-run summary of a training trend.

The rule (:func:`verdict`), written once in ``docs/results_stats.md`` and used by every verdict in ``docs/``: a claim
predicts the sign of an effect. With the effect's 95 % interval ``[low, high]``:

* **holds** — the interval lies entirely on the predicted side of zero;
* **reversed** — the interval lies entirely on the other side;
* **not observed** — the interval contains zero: the data cannot tell the sign, whatever the point estimate.

"not observed" is not "does not hold": it says the effect was not seen at this sample size, not that it is absent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["t_interval", "paired_bootstrap", "wilson", "slope", "verdict", "fmt_interval", "VERDICTS"]

VERDICTS = ("holds", "not observed", "reversed")


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean of ``values`` (independent runs) with its Student-t interval at ``level``.

    Returns ``{"mean", "low", "high", "sd", "n"}``. One value has no interval (``low = high = nan``).
    """
    from scipy import stats as st

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not len(x) or not np.all(np.isfinite(x)):
        raise ValueError(f"values must be a non-empty 1-D sequence of finite numbers, got {values!r}")
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "sd": math.nan, "n": 1}
    sd = float(x.std(ddof=1))
    half = float(st.t.ppf(0.5 + level / 2, df=len(x) - 1)) * sd / math.sqrt(len(x))
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": len(x)}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean of ``a - b`` over paired items with a percentile bootstrap interval (items resampled together).

    Returns ``{"difference", "low", "high", "n"}``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"a and b must be paired 1-D sequences of equal length, got {a.shape} and {b.shape}")
    delta = a - b
    draws = np.random.default_rng(seed).integers(0, len(delta), size=(n_boot, len(delta)))
    boot = delta[draws].mean(1)
    tail = (1 - level) / 2
    return {"difference": float(delta.mean()), "low": float(np.quantile(boot, tail)),
            "high": float(np.quantile(boot, 1 - tail)), "n": len(delta)}


def wilson(successes: float, n: int, level: float = 0.95) -> dict:
    """Proportion ``successes / n`` with its Wilson score interval. Returns ``{"p", "low", "high", "n"}``."""
    from scipy import stats as st

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = float(st.norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"p": p, "low": min(centre - half, p), "high": max(centre + half, p), "n": n}


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` on ``x`` (finite points only)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a slope needs at least two points with different x")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def verdict(low: float, high: float, predicted_sign: int = 1) -> str:
    """The words for an effect whose 95 % interval is ``[low, high]`` when the claim predicts ``predicted_sign``
    (+1: the effect is positive, -1: negative): "holds", "reversed" or "not observed" (the rule of the module
    docstring). An interval with a nan end is "not observed"."""
    if predicted_sign not in (1, -1):
        raise ValueError(f"predicted_sign must be 1 or -1, got {predicted_sign!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return "not observed"
    if low > high:
        raise ValueError(f"low {low} > high {high}")
    lo, hi = (low, high) if predicted_sign == 1 else (-high, -low)
    if lo > 0:
        return "holds"
    if hi < 0:
        return "reversed"
    return "not observed"


def fmt_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``"+0.012 [-0.004, +0.028]"``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:+.{digits}f} [n/a]"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
