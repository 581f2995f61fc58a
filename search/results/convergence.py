"""Had a run finished learning? A convergence check from its learning curve.

Attention modules start by scaling their residual branch down (CBAM's gates start near
0.5 x 0.5), so under a short schedule they train more slowly, and a comparison at a short
schedule ranks training speed, not the accuracy the user will get after training properly.

A run counts as converged when its validation accuracy rose by less than one run's noise (the
half-width of the 95% Wilson interval on the validation split, or one image's worth of accuracy
where the split size is unknown) over its last quarter of epochs (at least the last two). Where
it had not, an exponential approach ``acc(e) = a - b * exp(-e / tau)`` is fitted to the curve
(scipy's ``curve_fit``) and ``by_epoch`` is the epoch at which the remaining gain ``b * exp(-e /
tau)`` falls below that noise: when the run would likely have converged (None when the fit
fails or says nothing usable).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from search.stats import wilson_interval

MAX_PROJECTED_EPOCHS = 10_000


def _noise(accuracy: float, val_images: int | None) -> float:
    if not val_images:
        return 0.01
    bounds = wilson_interval(accuracy, val_images).bounds
    return 0.01 if bounds is None else (bounds[1] - bounds[0]) / 2


def _approach(epoch: np.ndarray, a: float, b: float, tau: float) -> np.ndarray:
    return a - b * np.exp(-epoch / tau)


def convergence(curve: Sequence[Mapping[str, Any]], val_images: int | None) -> dict[str, Any]:
    """``converged`` (None without at least three epochs), ``last_gain_pp`` (the rise over the
    window, in points), ``window`` (its epochs), ``noise_pp`` and ``by_epoch``."""
    accuracy = [
        float(point["val_accuracy"]) for point in curve if point.get("val_accuracy") is not None
    ]
    n = len(accuracy)
    out: dict[str, Any] = {"converged": None, "last_gain_pp": None, "window": None}
    out.update(noise_pp=None, by_epoch=None)
    if n < 3:
        return out
    window = max(2, n // 4)
    start = n - 1 - window
    gain = accuracy[-1] - max(accuracy[: start + 1])
    noise = _noise(accuracy[-1], val_images)
    out.update(
        converged=gain < noise,
        last_gain_pp=100 * gain,
        window=window,
        noise_pp=100 * noise,
    )
    if not out["converged"]:
        out["by_epoch"] = _projected(accuracy, noise)
    return out


def _projected(accuracy: list[float], noise: float) -> int | None:
    from scipy.optimize import curve_fit  # imported on first use, as search.stats does scipy.stats

    epochs = np.arange(1, len(accuracy) + 1, dtype=float)
    values = np.asarray(accuracy)
    start = (min(1.0, values.max() + 0.05), max(1e-3, values.max() - values[0]), len(values) / 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (_, b, tau), _ = curve_fit(
                _approach,
                epochs,
                values,
                p0=start,
                bounds=([0.0, 0.0, 0.1], [1.0, 10.0, 1e4]),
                maxfev=5000,
            )
    except (RuntimeError, ValueError):
        return None
    if b <= noise:
        return len(accuracy)
    epoch = tau * math.log(b / noise)
    if not math.isfinite(epoch) or epoch > MAX_PROJECTED_EPOCHS:
        return None
    return max(len(accuracy), math.ceil(epoch))
