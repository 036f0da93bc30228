"""Bootstrap confidence intervals (Efron 1979; Efron & Tibshirani 1993, ch. 13 percentile intervals).

Accuracy: eval images are independent draws, so images are resampled with replacement (Efron's bootstrap), the
same resampled images for every model at once (a paired bootstrap), so that a difference between two models'
accuracies gets an interval that accounts for their errors falling on the same images.

Latency: timed runs are consecutive, and noise on a shared machine comes in bursts that span many of them, so
runs are resampled in blocks of consecutive runs (the moving-block bootstrap, Kuensch 1989) with the block
length n^(1/3) (Hall, Horowitz & Jing 1995); a block of 1 is Efron's bootstrap.
"""
from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000
_GATHER_LIMIT = 1 << 22  # elements gathered at once (about 4M), to bound memory on 10,000-image eval sets


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The bootstrap percentile interval: the (1-level)/2 and (1+level)/2 quantiles of the resampled statistic."""
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_bootstrap_means(indicators: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of each row of `indicators` (rows x images) over `resamples` resamplings of the images, the same
    resampled images for every row: returns (resamples, rows)."""
    rows, n = indicators.shape
    if n == 0:
        raise ValueError("cannot bootstrap an empty eval set")
    values = indicators.astype(np.float32)
    rng = np.random.default_rng(seed)
    chunk = max(1, _GATHER_LIMIT // (n * rows))
    means = np.empty((resamples, rows))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(count, n))
        means[start:start + count] = values[:, picks].mean(axis=2, dtype=np.float64).T
    return means


def block_length(runs: int) -> int:
    """Moving-block length for `runs` consecutive timings: round(n^(1/3)), at least 1."""
    return max(1, round(runs ** (1 / 3)))


def median_interval(timings: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                    block: int | None = None, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval for the median of consecutive `timings` by the moving-block bootstrap (Kuensch 1989):
    each resample joins randomly placed runs of `block` consecutive timings (default `block_length`)."""
    timings = np.asarray(timings, dtype=np.float64)
    n = len(timings)
    if n == 0:
        raise ValueError("cannot bootstrap an empty series")
    block = min(n, block or block_length(n))
    blocks_per_resample = -(-n // block)
    rng = np.random.default_rng(seed)
    chunk = max(1, _GATHER_LIMIT // n)
    medians = np.empty(resamples)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        starts = rng.integers(0, n - block + 1, size=(count, blocks_per_resample))
        picks = (starts[:, :, None] + np.arange(block)).reshape(count, -1)[:, :n]
        medians[start:start + count] = np.median(timings[picks], axis=1)
    return percentile_interval(medians, level)


def median_absolute_deviation(timings: np.ndarray) -> float:
    """MAD: the median of |t - median(t)|, a spread measure that bursts of slow runs barely move."""
    timings = np.asarray(timings, dtype=np.float64)
    return float(np.median(np.abs(timings - np.median(timings))))
