"""The score threshold of a screen: set on known non-memorized captions at a chosen false-positive rate."""

from __future__ import annotations

import math

import numpy as np


def threshold_at_fpr(calibration_scores, fpr: float) -> float:
    """The smallest calibration score t with #{s > t} ≤ ⌊fpr·n⌋: flagging s > t keeps the calibration FPR ≤ fpr.

    Sorted descending, it is the (⌊fpr·n⌋+1)-th largest score; with fewer than 1/fpr captions that is the
    largest, so the empirical FPR is 0 and the requested rate is not resolved (:func:`resolved_fpr` says so).
    """
    scores = np.sort(np.asarray(calibration_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise ValueError("the threshold needs at least one calibration score")
    if not np.all(np.isfinite(scores)):
        raise ValueError("calibration scores must be finite")
    return float(scores[math.floor(fpr * scores.size)])


def resolved_fpr(n: int) -> float:
    """The smallest non-zero FPR n calibration captions can measure: 1/n."""
    return 1.0 / n


def empirical_fpr(calibration_scores, threshold: float) -> float:
    """The share of calibration scores strictly above the threshold."""
    scores = np.asarray(calibration_scores, dtype=np.float64)
    return float((scores > threshold).mean())
