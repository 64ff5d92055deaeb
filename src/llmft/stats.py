"""Every difference with its uncertainty: a paired interval for base-vs-tuned, a Wilson interval for one rate.

    from llmft.stats import paired_difference, proportion_interval
    paired_difference([1, 0, 1, 1], [1, 1, 1, 1])   # {'n': 4, 'base': 0.75, 'tuned': 1.0, 'diff': 0.25, ...}
    proportion_interval(9, 11)                       # (0.523, 0.949): "kept 9/11 (82%, 95% CI 52-95%)"

The method, one for every paired difference: a seeded **paired bootstrap over items** (percentile interval of
the mean of per-item differences tuned - base, resampling items with replacement). Why this and not McNemar:
- the two models answer the *same* prompts, so the item is the unit and the pairing must be kept; resampling
  whole items keeps it, and items that both models get right (or wrong) add no spurious certainty;
- one method covers 0/1 outcomes (a fact right, a leak, a persona named) and continuous per-item scores
  (per-example val loss, ROUGE-L) alike, so every delta in eval.json, `make compare` and the report reads the
  same way. McNemar's exact test is the textbook choice for binary pairs, but it gives a p-value, not an
  interval on the difference, and says nothing about losses: two methods, two kinds of numbers to explain;
- it is deterministic: the same seed, the same lists, the same interval (DVC caches the stage; a metric that
  moved between two identical reruns would read as a change).

Its known weakness is small n: the percentile bootstrap is too narrow there, and with n = 1 any change looks
certain. So `beyond_noise` also asks that at least `min_changed(level)` items changed (6 at 95%): with fewer,
even a unanimous direction could be coin flips (two-sided sign test, 2 * 0.5**5 = 6% > 5%). That is the same
bar McNemar's exact test sets on the discordant pairs, so small binary sets are judged as it would judge them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from llmft.common import UserError

CHUNK = 1000  # resamples drawn at once: bounds memory at CHUNK * n indices for a large val split


def min_changed(level: float = 0.95) -> int:
    """Fewest items that must differ before a unanimous change can clear `level` (sign test, two-sided)."""
    return math.ceil(math.log2(2 / (1 - level)))


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise UserError(f"interval level {level} is not between 0 and 1: use e.g. 0.95")


def paired_difference(
    base: Sequence[float],
    tuned: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Mean of tuned - base over the same items, with a seeded paired-bootstrap interval.

    Args:
        base, tuned: one score per item, item i the same prompt in both (0/1 outcomes or continuous scores).
        level: coverage of the interval.
        resamples: bootstrap draws; 10,000 keeps the interval's ends stable to about 0.1 point.
        seed: the interval is a function of (lists, level, resamples, seed) only.

    Returns:
        {"n", "base", "tuned", "diff", "low", "high", "beyond_noise"}: the means of the per-item scores,
        diff = tuned - base, [low, high] bounds diff, beyond_noise = the interval excludes 0 and enough items
        changed (`min_changed`).

    Raises:
        UserError: no items, lists of different lengths, or a bad level / resamples.
    """
    if len(base) != len(tuned):
        raise UserError(
            f"paired difference needs the same items for both models: base has {len(base)} scores, tuned "
            f"{len(tuned)}; evaluate both on one set"
        )
    n = len(base)
    if n == 0:
        raise UserError("paired difference of 0 items: there is nothing to compare; evaluate on at least one item")
    _check_level(level)
    if resamples < 1:
        raise UserError(f"resamples {resamples} must be at least 1")
    b = np.asarray(base, dtype=float)
    t = np.asarray(tuned, dtype=float)
    if not (np.isfinite(b).all() and np.isfinite(t).all()):
        raise UserError("paired difference got a NaN or infinite score: drop or fix that item first")
    d = t - b
    diff = float(d.mean())
    if np.all(d == d[0]):  # every resample has the same mean: skip the draws (and their float noise)
        low = high = diff
    else:
        rng = np.random.default_rng(seed)
        means = np.empty(resamples)
        for start in range(0, resamples, CHUNK):
            size = min(CHUNK, resamples - start)
            means[start : start + size] = d[rng.integers(0, n, size=(size, n))].mean(axis=1)
        alpha = (1 - level) / 2
        low, high = (float(x) for x in np.quantile(means, [alpha, 1 - alpha]))
    changed = int(np.count_nonzero(d))
    return {
        "n": n,
        "base": round(float(b.mean()), 6),
        "tuned": round(float(t.mean()), 6),
        "diff": round(diff, 6),
        "low": round(low, 6),
        "high": round(high, 6),
        "beyond_noise": bool((low > 0 or high < 0) and changed >= min_changed(level)),
    }


def proportion_interval(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for hits/n, as fractions (0-1); sound at 0/n and n/n, unlike p +- z*se.

    Raises:
        UserError: n < 1, or hits outside 0..n.
    """
    if n < 1:
        raise UserError(f"a rate of {hits}/{n} has no interval: it needs at least one item")
    if not 0 <= hits <= n:
        raise UserError(f"a rate of {hits}/{n}: hits must be between 0 and n")
    _check_level(level)
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)
