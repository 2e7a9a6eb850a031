r"""Paired comparison of two models' robust accuracy on the same test points.

Each point of each seed pair is one pair of outcomes (robust under the model, under the
baseline). Of the n pairs, b are robust under the model only and c under the baseline
only; the difference in robust accuracy is

    d = (b - c) / n.

**McNemar's exact test**: with no difference, each of the m = b + c discordant pairs
favours the model with probability 1/2, so min(b, c) ~ Binomial(m, 1/2) and the two-sided
p-value is

    p = min(1, 2 P[X <= min(b, c)]),   X ~ Binomial(m, 1/2)    (p = 1 when m = 0).

**The interval** is the exact one given the discordant pairs: [pi_lo, pi_hi], the
Clopper-Pearson interval of the proportion b / m at level 1 - alpha,

    pi_lo = Beta^{-1}(alpha / 2; b, m - b + 1),   pi_hi = Beta^{-1}(1 - alpha / 2; b + 1, m - b),

maps to d in [(m / n)(2 pi_lo - 1), (m / n)(2 pi_hi - 1)]. It excludes 0 exactly when
p < alpha: the test and the interval never disagree. Both are conditional on m and account
for the sampling of test points, not for the training's randomness, which the seeds' spread
shows beside them (docs/report.md).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Comparison:
  pairs: int        # n: point pairs, pooled over the seed pairs.
  better: int       # b: robust under the model only.
  worse: int        # c: robust under the baseline only.
  difference: float  # d = (b - c) / n.
  low: float        # The interval of d at `confidence`.
  high: float
  p_value: float
  confidence: float


def mcnemar_exact(better: int, worse: int) -> float:
  """The exact two-sided McNemar p-value of b = `better`, c = `worse` discordant pairs."""
  m = better + worse
  if m == 0:
    return 1.0
  return float(min(1.0, 2.0 * stats.binom.cdf(min(better, worse), m, 0.5)))


def difference_interval(better: int, worse: int, pairs: int, confidence: float
                        ) -> tuple[float, float]:
  """The exact interval of d = (b - c) / n given the m = b + c discordant pairs."""
  m = better + worse
  if m == 0:
    return 0.0, 0.0
  alpha = 1.0 - confidence
  low = 0.0 if better == 0 else stats.beta.ppf(alpha / 2, better, m - better + 1)
  high = 1.0 if better == m else stats.beta.ppf(1 - alpha / 2, better + 1, m - better)
  scale = m / pairs
  return float(scale * (2 * low - 1)), float(scale * (2 * high - 1))


def compare(model: list[np.ndarray], baseline: list[np.ndarray], confidence: float = 0.95
            ) -> Comparison:
  """`model[i]` against `baseline[i]` (per point robust, the same points), pooled over i."""
  if len(model) != len(baseline) or not model:
    raise ValueError(f"compare needs as many model runs as baseline runs, at least one; "
                     f"got {len(model)} and {len(baseline)}")
  a, b = np.concatenate(model).astype(bool), np.concatenate(baseline).astype(bool)
  if a.shape != b.shape:
    raise ValueError(f"the runs compared hold {a.size} and {b.size} points")
  better, worse = int(np.sum(a & ~b)), int(np.sum(~a & b))
  low, high = difference_interval(better, worse, a.size, confidence)
  return Comparison(pairs=int(a.size), better=better, worse=worse,
                    difference=(better - worse) / a.size, low=low, high=high,
                    p_value=mcnemar_exact(better, worse), confidence=confidence)
