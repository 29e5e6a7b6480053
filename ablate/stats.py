"""Statistics across seeds: confidence intervals, paired differences from the baseline with one
named test, multiplicity adjustment over the variants, effect sizes, convergence and assignment
summaries, one row per variant.

Seeds pair across variants (the same seed gives the same data order and initialisation), so a
variant is compared with the baseline by the per-seed differences ``d = variant - baseline`` of a
metric. One method gives the interval of their mean, the p-value and the star, never a mix:

* ``t``: the paired t test, ``scipy.stats.ttest_rel`` (p and ``confidence_interval`` of one call).
  It has no floor on p, but assumes roughly normal differences.
* ``signflip``: the exact paired permutation (sign-flip) test of the mean difference: all ``2^n``
  sign patterns for ``n <= 16`` pairs, else ``n_boot`` random patterns from
  ``numpy.random.default_rng(seed)`` plus the observed one. Two-sided p = twice the smaller tail
  (``scipy.stats.permutation_test``'s convention). Its interval is the same test inverted: the
  shifts ``theta`` it does not reject, which are the order statistics of the subset means of ``d``
  (Hartigan 1969), so ``0`` lies outside the interval exactly when ``p < 1 - confidence``. It
  cannot go below ``p = 2/2^n``: 0.25 with 3 pairs, 0.0625 with 5, so at the 5% level it needs 6
  pairs; with fewer the interval is unbounded (``-inf, +inf``).
* ``bootstrap``: ``scipy.stats.bootstrap(..., paired=True, method="BCa")``, ``n_boot`` resamples
  from ``seed``. Its p inverts the same BCa interval: the largest ``alpha`` whose ``1 - alpha``
  interval still excludes 0 (:func:`bca_p_value`; not below ``2/(n_boot + 1)``). Below
  :data:`BOOTSTRAP_MIN_PAIRS` pairs there is an interval but no p and no star.

A job compares k variants with one baseline: k tests. :func:`compare` adjusts each metric's p over
the variants (:func:`adjust_p`: Holm by default, or Benjamini-Hochberg, or none) and stars on the
adjusted p; :func:`significance_note` says when the seed count makes a star impossible and how many
seeds one would need. With one seed no interval is given (bounds NaN and a note).

Inputs are the store's views as DataFrames: ``Store.results(job)`` (``trial_results``, one row per
trial with the final COCO numbers) and ``Store.curves(job)`` (``metric_curves``, one row per
trial, metric name and step). Only trials whose state is in :data:`COUNTED` enter a mean; diverged
and failed trials are counted per variant, never averaged.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .evaluate import COCO_METRICS

#: Trial states whose metrics count.
COUNTED = ("finished", "reused")
#: Methods of a paired comparison: Student t, exact sign-flip permutation test, BCa bootstrap.
METHODS = ("t", "signflip", "bootstrap")
#: What each method is called where results are printed.
METHOD_NAMES = {"t": "paired t test", "signflip": "exact sign-flip permutation test",
                "bootstrap": "BCa bootstrap"}
#: Multiplicity adjustments of the k variant-vs-baseline p-values: Holm (family-wise error),
#: Benjamini-Hochberg (false discovery rate), none.
ADJUSTMENTS = ("holm", "bh", "none")
ADJUST_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no adjustment"}
#: Up to this many pairs the sign-flip test enumerates every sign pattern; beyond, Monte Carlo.
EXACT_MAX_PAIRS = 16
#: The fewest pairs for which a bootstrap p (and star) is given. Below it the bootstrap has too
#: few distinct resamples (``C(2n-1, n)``: 10 for 3 pairs, 126 for 5) and its intervals are too
#: narrow: the resampled means spread like ``sd*sqrt((n-1)/n)/sqrt(n)`` with a normal quantile
#: where a t quantile is due, so a nominal 95% interval covers about ``P(|t_{n-1}| <=
#: 1.96*sqrt((n-1)/n))``: 75% at 3 pairs, 85% at 5, 89% at 8, 90% at 10 (:func:`bootstrap_coverage`).
BOOTSTRAP_MIN_PAIRS = 10
#: The note of an interval (or a difference) computed from one value.
ONE_SEED = "one seed: no interval"
#: The note of a t comparison whose differences are all equal (sd 0: t is undefined).
NO_SPREAD = "the differences do not vary: no t test"
#: Differences closer than this, relative to the compared values' magnitude, count as equal
#: (AP values read back from a store differ in the last bits).
REL_TIE = 1e-9
#: Per-trial convergence summaries that :func:`compare` aggregates (keys of :func:`convergence`).
CONVERGENCE = ("auc", "epochs_to_90", "final_minus_best")
#: Assignment statistics (``stat/<name>`` training curves) that :func:`compare` summarises; the
#: per-level ``pos_per_gt_l<k>`` are added as present.
ASSIGNMENT = ("pos_per_gt", "gt_without_pos_frac", "ignored_per_image")
_LEVEL = re.compile(r"^stat/pos_per_gt_l(\d+)$")


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its confidence interval ``[low, high]`` (NaN when ``n < 2``;
    ``-inf, +inf`` when the method cannot bound it, e.g. a sign-flip test on 5 pairs or fewer).

    ``method`` is one of :data:`METHODS`; ``note`` says why there is no interval ("one seed: no
    interval", "no values", ...), else None.
    """

    mean: float
    low: float
    high: float
    n: int
    method: str
    note: str | None = None


@dataclass(frozen=True)
class Paired:
    """A paired comparison by one method: ``diff`` is the mean of ``variant - baseline`` over the
    seeds both have, with the method's interval (``diff.n`` is the number of pairs); ``p_value``
    the method's two-sided p (NaN when it gives none); ``significant`` whether ``p_value < 1 -
    confidence`` before any multiplicity adjustment; ``effect`` the standardised paired effect
    ``mean(d) / sd(d)`` (Cohen's d_z; NaN with fewer than two pairs or when the differences do not vary)."""

    diff: Interval
    p_value: float
    significant: bool
    effect: float = math.nan


def _check(confidence: float, method: str, adjust: str = "none") -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of: {', '.join(METHODS)}")
    if adjust not in ADJUSTMENTS:
        raise ValueError(f"unknown adjustment {adjust!r}; one of: {', '.join(ADJUSTMENTS)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=float)
    return x[np.isfinite(x)]


def _bootstrap(data: tuple[np.ndarray, ...], confidence: float, n_boot: int, seed: int):
    """``scipy.stats.bootstrap`` of the mean of ``data[0]`` (one sample) or of ``data[0] - data[1]``
    (paired), BCa, ``n_boot`` resamples from ``seed``; degenerate-data warnings silenced (the
    callers handle values that do not vary)."""
    from scipy import stats

    def mean_diff(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(xs[0] - xs[1] if len(xs) == 2 else xs[0], axis=axis)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stats.bootstrap(data, mean_diff, paired=len(data) == 2, vectorized=True, method="BCa",
                               n_resamples=n_boot, confidence_level=confidence, rng=np.random.default_rng(seed))


def _mean_interval(x: np.ndarray, confidence: float, method: str, n_boot: int, seed: int) -> Interval:
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, method, "no values")
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, method, ONE_SEED)
    if np.ptp(x) <= REL_TIE * float(np.abs(x).max()):
        return Interval(mean, mean, mean, n, method)  # no spread: every method's interval is the point
    if method == "t":
        from scipy import stats

        low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=float(x.std(ddof=1)) / math.sqrt(n))
        return Interval(mean, float(low), float(high), n, method)
    ci = _bootstrap((x,), confidence, n_boot, seed).confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), n, method)


def mean_interval(values: Sequence[float], confidence: float = 0.95, method: str = "t", n_boot: int = 10_000,
                  seed: int = 0) -> Interval:
    """The mean of ``values`` (non-finite ones dropped) with its ``confidence`` interval.

    ``method="t"``: mean ± t(1-α/2, n-1)·sd/√n. ``method="bootstrap"``: the BCa interval of
    ``scipy.stats.bootstrap`` with ``n_boot`` resamples from ``seed`` (reproducible). The sign-flip
    test compares pairs; a mean on its own gets the t interval. Fewer than two values: bounds NaN
    and a note; values that do not vary: ``[mean, mean]``.
    """
    _check(confidence, method)
    return _mean_interval(_finite(values), confidence, "t" if method == "signflip" else method, n_boot, seed)


def signflip_patterns(n: int, n_boot: int = 10_000, seed: int = 0) -> np.ndarray:
    """The sign patterns of the sign-flip test on ``n`` pairs, ``Bool[P, n]`` (True: that pair's
    difference flipped): all ``2^n`` for ``n <= EXACT_MAX_PAIRS``, else the identity and ``n_boot``
    random patterns from ``numpy.random.default_rng(seed)``."""
    if n <= EXACT_MAX_PAIRS:
        return ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)  # [2^n, n]
    rng = np.random.default_rng(seed)
    return np.vstack([np.zeros((1, n), dtype=bool), rng.integers(0, 2, size=(n_boot, n)).astype(bool)])


def signflip_test(d: Sequence[float], confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0,
                  tol: float = 0.0) -> tuple[float, float, float]:
    """The two-sided sign-flip test of ``mean(d) = 0`` and its inversion: ``(p, low, high)``.

    For a pattern that flips the set A of pairs, the flipped sum is at least the observed one
    exactly when ``sum(d_A) <= 0``; so the upper-tail p is ``#{A empty or mean(d_A) <= 0} / P`` and
    the lower-tail p the mirror; ``p = min(1, 2 * min(tails))``. The interval is every shift
    ``theta`` whose p (for ``d - theta``) is at least ``alpha = 1 - confidence``: with ``k =
    ceil(alpha/2 * P - #identity patterns)``, ``[k-th smallest, k-th largest]`` subset mean
    (``-inf, +inf`` when ``k <= 0``). Subset sums within ``tol`` of 0 count as 0 (float ties).
    """
    d = np.asarray(d, dtype=float)
    n = len(d)
    flips = signflip_patterns(n, n_boot, seed)
    sums = flips.astype(float) @ d  # [P]: sum of the flipped differences
    sums[np.abs(sums) <= tol] = 0.0
    count = flips.sum(axis=1)  # [P]
    n_patterns, identity = len(flips), int((count == 0).sum())
    p = min(1.0, 2.0 * min(float((sums <= 0).sum()), float((sums >= 0).sum())) / n_patterns)
    means = np.sort(sums[count > 0] / count[count > 0])
    k = math.ceil((1.0 - confidence) / 2.0 * n_patterns - identity - 1e-9)
    if k <= 0:
        return p, -math.inf, math.inf
    return p, float(means[k - 1]), float(means[len(means) - k])


def bca_p_value(d: np.ndarray, theta_b: np.ndarray) -> float:
    """The two-sided p of a BCa bootstrap of ``mean(d)`` whose resampled means are ``theta_b``:
    twice the tail probability ``alpha/2`` at which an endpoint of the BCa ``1 - alpha`` interval
    reaches 0, so that 0 is outside that interval exactly for confidence levels below ``1 - p``.

    With ``z0 = Φ⁻¹(mid-rank of mean(d) among theta_b)`` and the jackknife acceleration ``a =
    Σu³ / (6 (Σu²)^1.5)``, ``u = d - mean(d)`` (both as ``scipy.stats.bootstrap`` computes them),
    and ``q`` the quantile level at which ``theta_b`` (linearly interpolated) crosses 0, the BCa
    tail level ``Φ(z0 + (z0 + z)/(1 - a(z0 + z)))`` equals ``q`` at ``z = r/(1 + a r) - z0``, ``r =
    Φ⁻¹(q) - z0``; ``p = 2Φ(-|z|)``. Not below ``2/(len(theta_b) + 1)``: B resamples cannot tell
    smaller p apart.
    """
    from scipy.special import ndtr, ndtri

    theta_b = np.sort(np.asarray(theta_b, dtype=float))
    b = len(theta_b)
    floor = 2.0 / (b + 1)
    mean = float(d.mean())
    z0 = float(ndtri(((theta_b < mean).sum() + (theta_b <= mean).sum()) / (2 * b)))
    u = d - mean
    a = float((u ** 3).sum() / (6.0 * (u ** 2).sum() ** 1.5))
    if theta_b[0] > 0 or theta_b[-1] < 0:
        return floor  # 0 lies beyond every resample: outside every interval
    q = float(np.interp(0.0, theta_b, np.linspace(0.0, 1.0, b)))
    r = float(ndtri(q)) - z0
    if not math.isfinite(r) or 1.0 + a * r <= 0:  # beyond the reach of BCa's endpoints
        return floor
    z = r / (1.0 + a * r) - z0
    return float(min(1.0, max(floor, 2.0 * float(ndtr(-abs(z))))))


def bootstrap_coverage(n: int, confidence: float = 0.95) -> float:
    """The normal-theory coverage of a percentile bootstrap interval of a mean over ``n`` values:
    ``P(|t_{n-1}| <= z·sqrt((n-1)/n))`` with ``z`` the normal quantile (the figures behind
    :data:`BOOTSTRAP_MIN_PAIRS`)."""
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + confidence / 2)) * math.sqrt((n - 1) / n)
    return float(1.0 - 2.0 * stats.t.sf(z, n - 1))


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95,
                      method: str = "t", n_boot: int = 10_000, seed: int = 0) -> Paired:
    """Compare ``variant`` with ``baseline``, both ``{seed: value}``, over the seeds both have with
    finite values (the others are unpaired and left out; ``diff.n`` counts the pairs).

    The interval, p and ``significant`` come from ``method`` (module docstring). Fewer than two
    pairs: no interval, p NaN. Every difference zero: interval ``[0, 0]`` (unbounded for a
    sign-flip test on 5 pairs or fewer), p 1. Differences that are equal but not zero: for "t" no
    interval and p NaN (sd 0: the t statistic is undefined, note :data:`NO_SPREAD`); the sign-flip
    test gives its floor ``2/2^n``; the bootstrap ``[mean, mean]`` and its floor ``2/(n_boot+1)``.
    The bootstrap gives p NaN below :data:`BOOTSTRAP_MIN_PAIRS` pairs (its interval still shows).
    """
    _check(confidence, method)
    seeds = [s for s in variant if s in baseline
             and math.isfinite(float(variant[s])) and math.isfinite(float(baseline[s]))]
    v = np.asarray([float(variant[s]) for s in seeds], dtype=float)
    b = np.asarray([float(baseline[s]) for s in seeds], dtype=float)
    d = v - b  # [pairs]
    n = len(d)
    alpha = 1.0 - confidence
    if n < 2:
        diff = _mean_interval(d, confidence, method, n_boot, seed)
        return Paired(diff, math.nan, False)
    tol = REL_TIE * max(float(np.abs(np.concatenate([v, b])).max()), 1e-300)
    d = np.where(np.abs(d) <= tol, 0.0, d)
    constant = float(np.ptp(d)) <= tol
    if constant:
        d = np.full(n, float(d.mean()))
    mean = float(d.mean())
    effect = math.nan if constant else mean / float(d.std(ddof=1))
    note = None
    if method == "signflip":
        p, low, high = signflip_test(d, confidence, n_boot, seed, tol=tol)
    elif constant and mean == 0.0:
        p, low, high = 1.0, 0.0, 0.0
    elif method == "t":
        if constant:
            p, low, high, note = math.nan, math.nan, math.nan, NO_SPREAD
        else:
            from scipy import stats

            res = stats.ttest_rel(v, b)
            ci = res.confidence_interval(confidence)
            p, low, high = float(res.pvalue), float(ci.low), float(ci.high)
    elif constant:  # bootstrap: every resample has the same mean
        p, low, high = 2.0 / (n_boot + 1), mean, mean
    else:
        res = _bootstrap((v, b), confidence, n_boot, seed)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        p = bca_p_value(d, res.bootstrap_distribution)
    if method == "bootstrap" and n < BOOTSTRAP_MIN_PAIRS:
        p, note = math.nan, f"no bootstrap p below {BOOTSTRAP_MIN_PAIRS} pairs"
    return Paired(Interval(mean, low, high, n, method, note), p, bool(p < alpha), effect)


def adjust_p(p_values: Sequence[float], adjust: str = "holm") -> np.ndarray:
    """The p-values of a family of tests adjusted for multiplicity, ``Float[k]``; NaN entries (no
    test) stay NaN and are not counted in the family.

    ``holm``: Holm's step-down (family-wise error): sorted ascending, ``p_(i)`` becomes
    ``max_{j<=i} min(1, (k - j + 1) p_(j))``. ``bh``: Benjamini-Hochberg (false discovery rate),
    ``scipy.stats.false_discovery_control``. ``none``: unchanged.
    """
    _check(0.5, "t", adjust)
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.isfinite(p)
    q = p[ok]
    if len(q) == 0 or adjust == "none":
        out[ok] = q
        return out
    if adjust == "bh":
        from scipy import stats

        out[ok] = stats.false_discovery_control(q, method="bh")
        return out
    order = np.argsort(q, kind="stable")
    steps = (len(q) - np.arange(len(q))) * q[order]  # [k]: (k - j + 1) p_(j), j = 1..k
    held = np.empty(len(q))
    held[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    out[ok] = held
    return out


def smallest_p(method: str, pairs: int, n_boot: int = 10_000) -> float:
    """The smallest two-sided p that ``method`` can give with ``pairs`` pairs: ``2/2^n`` for the
    exact sign-flip test (``2/(n_boot+1)`` when Monte Carlo), ``2/(n_boot+1)`` for the bootstrap
    from :data:`BOOTSTRAP_MIN_PAIRS` pairs (NaN below: no p), 0 for t; NaN with fewer than 2 pairs."""
    _check(0.5, method)
    if pairs < 2:
        return math.nan
    if method == "signflip":
        return 2.0 / 2 ** pairs if pairs <= EXACT_MAX_PAIRS else 2.0 / (n_boot + 1)
    if method == "bootstrap":
        return 2.0 / (n_boot + 1) if pairs >= BOOTSTRAP_MIN_PAIRS else math.nan
    return 0.0


def pairs_needed(method: str, tests: int = 1, confidence: float = 0.95, adjust: str = "holm") -> int:
    """The fewest pairs with which ``method`` can give a significant result (adjusted ``p < 1 -
    confidence``) among ``tests`` comparisons adjusted by ``adjust``: necessary, not sufficient.

    Sign-flip: the smallest n with ``2/2^n < alpha/tests`` under Holm (its adjusted p is at least
    ``tests`` times the smallest raw p), ``< alpha`` under BH or none (a BH-adjusted p is at least
    the raw one). Bootstrap: :data:`BOOTSTRAP_MIN_PAIRS`. t: 2 (no floor on p beyond that).
    """
    _check(confidence, method, adjust)
    if method == "t":
        return 2
    if method == "bootstrap":
        return BOOTSTRAP_MIN_PAIRS
    level = (1.0 - confidence) / (max(tests, 1) if adjust == "holm" else 1)
    n = 2
    while 2.0 / 2 ** n >= level:
        n += 1
    return n


def significance_note(pairs: Sequence[int], method: str, confidence: float = 0.95, adjust: str = "holm",
                      metric: str = "AP") -> str | None:
    """One line saying that no variant can be significant with the seeds at hand and how many
    seeds would be needed, or None when that is not so. ``pairs``: the pair count of each
    variant compared with the baseline (``len(pairs)`` is the number of tests)."""
    _check(confidence, method, adjust)
    alpha = 1.0 - confidence
    need = pairs_needed(method, len(pairs), confidence, adjust)
    short = sorted({int(p) for p in pairs if 0 < int(p) < need})
    if not short or method == "t":
        return None
    seeds = f"{short[0]}" if len(short) == 1 else f"{short[0]}-{short[-1]}"
    if method == "bootstrap":
        why = (f"{seeds} paired seeds are fewer than the {BOOTSTRAP_MIN_PAIRS} a bootstrap p needs "
               f"({short[0]} pairs have {math.comb(2 * short[0] - 1, short[0])} distinct resamples): no p, no star")
    else:
        why = (f"with {seeds} paired seeds p cannot go below 2/2^{short[0]} = {2.0 / 2 ** short[0]:.3g}, "
               f"so Δ{metric} cannot reach p < {alpha:.3g}")
        if adjust == "holm" and len(pairs) > 1:
            why += f" (Holm over {len(pairs)} variants: raw p < {alpha / len(pairs):.3g})"
    return f"{method}: {why}; a significant result needs at least {need} seeds per variant."


def convergence(curve: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Summaries of one trial's AP-by-epoch curve, ``[(epoch, AP), ...]`` (any order; non-finite
    points dropped; for an epoch given twice the later point counts).

    Returns ``final`` (AP at the last epoch), ``best`` (max AP), ``final_minus_best`` (≤ 0),
    ``auc`` (trapezoid area over epochs divided by the epoch span: a constant curve at a gives
    a; one evaluation gives its AP) and ``epochs_to_90`` (first epoch whose AP ≥ 0.9·final;
    NaN when final ≤ 0). All NaN for an empty curve.
    """
    points = {int(e): float(a) for e, a in curve if a is not None and math.isfinite(float(a))}
    if not points:
        return dict.fromkeys(("auc", "epochs_to_90", "final_minus_best", "final", "best"), math.nan)
    epochs = np.asarray(sorted(points), dtype=float)
    ap = np.asarray([points[int(e)] for e in epochs])
    final, best = float(ap[-1]), float(ap.max())
    span = epochs[-1] - epochs[0]
    auc = float(np.trapezoid(ap, epochs) / span) if span > 0 else final
    to90 = float(epochs[np.argmax(ap >= 0.9 * final)]) if final > 0 else math.nan
    return {"auc": auc, "epochs_to_90": to90, "final_minus_best": final - best, "final": final, "best": best}


def _columns(prefix: str, values: Mapping[int, float], base: Mapping[int, float] | None, confidence: float,
             method: str, n_boot: int, seed: int, paired: bool = True) -> dict:
    """Columns ``prefix``, ``_low``, ``_high``, ``_std`` over ``values`` ({seed: value}); when
    ``paired`` also ``_diff``, ``_diff_low``, ``_diff_high``, ``_dz``, ``_p``, ``_sig`` (unadjusted
    here; :func:`compare` adjusts) against ``base`` ({seed: value}; None for the baseline row
    itself: NaN and False)."""
    iv = mean_interval(list(values.values()), confidence, method, n_boot, seed)
    x = _finite(list(values.values()))
    out = {prefix: iv.mean, f"{prefix}_low": iv.low, f"{prefix}_high": iv.high,
           f"{prefix}_std": float(x.std(ddof=1)) if len(x) > 1 else math.nan}
    if paired:
        if base is None:
            pr = Paired(Interval(math.nan, math.nan, math.nan, 0, method), math.nan, False)
        else:
            pr = paired_difference(values, base, confidence, method, n_boot, seed)
        out.update({f"{prefix}_diff": pr.diff.mean, f"{prefix}_diff_low": pr.diff.low,
                    f"{prefix}_diff_high": pr.diff.high, f"{prefix}_dz": pr.effect, f"{prefix}_p": pr.p_value,
                    f"{prefix}_p_adj": math.nan, f"{prefix}_sig": pr.significant, "_diff_note": pr.diff.note})
    return out


def _step_means(curves: pd.DataFrame | None, trial_ids: set[int]) -> dict[str, dict[int, float]]:
    """``{assignment column: {trial_id: mean of its stat/<column> over its logged steps}}`` for
    :data:`ASSIGNMENT` plus the ``pos_per_gt_l<k>`` present (non-finite points dropped)."""
    names = [f"stat/{n}" for n in ASSIGNMENT]
    if curves is None or curves.empty:
        return {n[5:]: {} for n in names}
    stat = curves[curves["name"].str.startswith("stat/") & curves["trial_id"].isin(trial_ids)]
    stat = stat.assign(value=pd.to_numeric(stat["value"], errors="coerce").astype(float))
    stat = stat[np.isfinite(stat["value"])]
    levels = sorted({n for n in stat["name"] if _LEVEL.match(n)}, key=lambda n: int(_LEVEL.match(n).group(1)))
    names[1:1] = levels
    means = stat.groupby(["name", "trial_id"])["value"].mean()
    out: dict[str, dict[int, float]] = {}
    for n in names:
        got = means.xs(n, level="name") if n in means.index.get_level_values("name") else pd.Series(dtype=float)
        out[n[5:]] = {int(t): float(v) for t, v in got.items()}
    return out


def compare(results: pd.DataFrame, curves: pd.DataFrame | None, baseline: str, metric: str = "AP",
            confidence: float = 0.95, method: str = "t", *, adjust: str = "holm", n_boot: int = 10_000,
            seed: int = 0, metrics: Sequence[str] = COCO_METRICS) -> pd.DataFrame:
    """One row per variant (first-appearance order in ``results``) comparing it with ``baseline``.

    ``results``: the ``trial_results`` view (columns job, variant, seed, trial_id, state, and the
    COCO metrics); ``curves``: the ``metric_curves`` view (at least ``eval/AP`` and ``stat/*``
    rows; None leaves the convergence and assignment columns NaN). Columns:

    * ``variant``, ``is_baseline``, ``seeds`` (counted trials), ``pairs`` (seeds shared with the
      baseline that enter the ``metric`` difference; 0 for the baseline), ``diverged``, ``failed``;
    * per COCO metric ``m``: ``m`` (mean over seeds), ``m_low``/``m_high`` (CI: t, or BCa for
      ``method="bootstrap"``), ``m_std`` (seed-to-seed sample sd), ``m_diff``/``m_diff_low``/
      ``m_diff_high`` (paired difference from the baseline and the ``method``'s interval; NaN on the
      baseline row), ``m_dz`` (standardised paired effect mean/sd of the differences), ``m_p``
      (the ``method``'s raw two-sided p), ``m_p_adj`` (adjusted by ``adjust`` over the variants
      compared with the baseline: each column is its own family of k tests), ``m_sig``
      (``m_p_adj < 1 - confidence``: the star);
    * convergence of each trial's ``eval/AP`` by epoch (see :func:`convergence`), averaged over
      seeds with the same column family: ``auc*``, ``epochs_to_90*``, ``final_minus_best*``;
    * assignment: per trial the mean of ``stat/<name>`` over its training steps, then mean,
      ``_low``, ``_high``, ``_std`` over seeds, for ``pos_per_gt``, ``pos_per_gt_l<k>`` (as
      present), ``gt_without_pos_frac``, ``ignored_per_image``;
    * ``note``: why an interval or a p is missing or seeds were unpaired, else None.

    ``method`` (:data:`METHODS`) makes every paired interval, p and star; a mean on its own gets the
    t interval unless ``method="bootstrap"``. Units are those of the inputs (AP in [0, 1], epochs, counts).
    """
    _check(confidence, method, adjust)
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r}; one of: {', '.join(metrics)}")
    order = list(dict.fromkeys(results["variant"]))
    if baseline not in order:
        raise ValueError(f"baseline {baseline!r} is not a variant here; variants: {', '.join(map(str, order))}")
    counted = results[results["state"].isin(COUNTED)]
    seeds_of = {v: dict(zip(counted.loc[counted["variant"] == v, "trial_id"].astype(int),
                            counted.loc[counted["variant"] == v, "seed"].astype(int))) for v in order}
    ids = set(counted["trial_id"].astype(int))

    per_trial: dict[str, dict[int, float]] = {k: {} for k in CONVERGENCE}
    if curves is not None and not curves.empty:
        ap = curves[(curves["name"] == "eval/AP") & curves["trial_id"].isin(ids)]
        for tid, g in ap.groupby("trial_id"):
            g = g.sort_values("step")
            summary = convergence(list(zip(g["epoch"], pd.to_numeric(g["value"], errors="coerce"))))
            for k in CONVERGENCE:
                per_trial[k][int(tid)] = summary[k]
    assignment = _step_means(curves, ids)

    def by_seed(v: str, values: Mapping[int, float]) -> dict[int, float]:
        return {s: values[t] for t, s in seeds_of[v].items() if t in values}

    def metric_values(v: str, m: str) -> dict[int, float]:
        sub = counted[counted["variant"] == v]
        vals = pd.to_numeric(sub[m], errors="coerce") if m in sub else pd.Series(math.nan, index=sub.index)
        return dict(zip(sub["seed"].astype(int), vals.astype(float)))

    rows = []
    for v in order:
        states = results.loc[results["variant"] == v, "state"]
        is_base = v == baseline
        row: dict = {"variant": v, "is_baseline": is_base, "seeds": len(seeds_of[v]), "pairs": 0,
                     "diverged": int((states == "diverged").sum()), "failed": int((states == "failed").sum())}
        diff_note = None
        for m in metrics:
            base = None if is_base else metric_values(baseline, m)
            row.update(_columns(m, metric_values(v, m), base, confidence, method, n_boot, seed))
            note = row.pop("_diff_note")
            diff_note = note if m == metric else diff_note
        for k in CONVERGENCE:
            base = None if is_base else by_seed(baseline, per_trial[k])
            row.update(_columns(k, by_seed(v, per_trial[k]), base, confidence, method, n_boot, seed))
            row.pop("_diff_note")
        for name, values in assignment.items():
            row.update(_columns(name, by_seed(v, values), None, confidence, method, n_boot, seed, paired=False))
        notes = []
        mine = {s: x for s, x in metric_values(v, metric).items() if math.isfinite(x)}
        if not mine:
            notes.append("no finished trial" if not seeds_of[v] else f"no {metric} value")
        elif len(mine) == 1:
            notes.append(ONE_SEED)
        if not is_base and mine:
            theirs = {s for s, x in metric_values(baseline, metric).items() if math.isfinite(x)}
            row["pairs"] = len(set(mine) & theirs)
            unpaired = len(set(mine) - theirs)
            if unpaired:
                notes.append(f"{unpaired} seed(s) without a baseline pair left out of the difference")
            if row["pairs"] == 1 and len(mine) > 1:
                notes.append("one pair: no interval for the difference")
            elif row["pairs"] == 0:
                notes.append("no seed shared with the baseline")
            if diff_note and diff_note != ONE_SEED:
                notes.append(f"Δ{metric}: {diff_note}")
        row["note"] = "; ".join(notes) or None
        rows.append(row)
    table = pd.DataFrame(rows)
    # k variants against one baseline are k tests: adjust each paired column over the variants
    alpha = 1.0 - confidence
    others = ~table["is_baseline"].astype(bool)
    for prefix in (*metrics, *CONVERGENCE):
        adjusted = adjust_p(table.loc[others, f"{prefix}_p"].to_numpy(dtype=float), adjust)
        table[f"{prefix}_p_adj"] = math.nan
        table.loc[others, f"{prefix}_p_adj"] = adjusted
        table[f"{prefix}_sig"] = (table[f"{prefix}_p_adj"] < alpha) & others  # NaN compares False
    return table


def curve_bands(curves: pd.DataFrame, name: str, confidence: float = 0.95) -> pd.DataFrame:
    """The curve ``name`` (e.g. ``eval/AP``, ``loss/box``) averaged across seeds, for plots.

    ``curves``: ``metric_curves`` rows (filter out trials that should not count first). Returns one
    row per variant (first-appearance order) and step (ascending): ``variant, step, epoch, mean,
    low, high, n``, where n counts the seeds with a finite value and low/high is the t interval
    (NaN with one seed).
    """
    _check(confidence, "t")
    cols = ["variant", "step", "epoch", "mean", "low", "high", "n"]
    sub = curves[curves["name"] == name]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    order = {v: i for i, v in enumerate(dict.fromkeys(sub["variant"]))}
    rows = []
    for (v, step), g in sub.groupby(["variant", "step"], sort=False):
        iv = mean_interval(pd.to_numeric(g["value"], errors="coerce").tolist(), confidence)
        rows.append({"variant": v, "step": int(step), "epoch": int(g["epoch"].max()), "mean": iv.mean,
                     "low": iv.low, "high": iv.high, "n": iv.n})
    out = pd.DataFrame(rows, columns=cols)
    out = out.assign(_o=out["variant"].map(order)).sort_values(["_o", "step"], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)


def cli_method(method: str | None, bootstrap: bool, adjust: str) -> str:
    """The method that ``--method`` and its alias ``--bootstrap`` name (default "t"); ValueError, one
    line naming the flag, for an unknown method or adjustment or ``--bootstrap`` with another method."""
    if method is not None and method not in METHODS:
        raise ValueError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if adjust not in ADJUSTMENTS:
        raise ValueError(f"--adjust: unknown adjustment {adjust!r}; choose one of {', '.join(ADJUSTMENTS)}")
    if bootstrap and method not in (None, "bootstrap"):
        raise ValueError(f"--bootstrap is --method bootstrap; it cannot go with --method {method}")
    return "bootstrap" if bootstrap else method or "t"
