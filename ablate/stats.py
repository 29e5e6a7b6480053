"""Statistics across seeds: confidence intervals, paired differences from the baseline, convergence
and assignment summaries, one row per variant.

Seeds pair across variants (the same seed gives the same data order and initialisation), so a
variant is compared with the baseline by the per-seed differences ``variant - baseline`` of a
metric: their mean, its confidence interval (Student t, or a percentile bootstrap) and a paired
test's p-value. With one seed no interval is given (bounds NaN and a note), never a misleading one.

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
#: Interval methods: Student t, or percentile bootstrap.
METHODS = ("t", "bootstrap")
#: The note of an interval (or a difference) computed from one value.
ONE_SEED = "one seed: no interval"
#: Per-trial convergence summaries that :func:`compare` aggregates (keys of :func:`convergence`).
CONVERGENCE = ("auc", "epochs_to_90", "final_minus_best")
#: Assignment statistics (``stat/<name>`` training curves) that :func:`compare` summarises; the
#: per-level ``pos_per_gt_l<k>`` are added as present.
ASSIGNMENT = ("pos_per_gt", "gt_without_pos_frac", "ignored_per_image")
_LEVEL = re.compile(r"^stat/pos_per_gt_l(\d+)$")


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its confidence interval ``[low, high]`` (NaN when ``n < 2``).

    ``method`` is "t" or "bootstrap"; ``note`` says why there is no interval ("one seed: no
    interval", "no values"), else None.
    """

    mean: float
    low: float
    high: float
    n: int
    method: str
    note: str | None = None


@dataclass(frozen=True)
class Paired:
    """A paired comparison: ``diff`` is the mean of ``variant - baseline`` over the seeds both have,
    with its interval (``diff.n`` is the number of pairs); ``p_value`` the two-sided paired test;
    ``significant`` whether the interval excludes zero."""

    diff: Interval
    p_value: float
    significant: bool


def _check(confidence: float, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; one of: {', '.join(METHODS)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=float)
    return x[np.isfinite(x)]


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of resamples (with replacement) of ``x``: Float[n_boot]."""
    rng = np.random.default_rng(seed)
    return x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # [n_boot, n] -> [n_boot]


def _interval(x: np.ndarray, confidence: float, method: str, boot: np.ndarray | None) -> Interval:
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, method, "no values")
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, method, ONE_SEED)
    if method == "t":
        from scipy import stats

        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
        return Interval(mean, mean - half, mean + half, n, method)
    alpha = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [alpha, 100 - alpha])
    return Interval(mean, float(low), float(high), n, method)


def mean_interval(values: Sequence[float], confidence: float = 0.95, method: str = "t", n_boot: int = 10_000,
                  seed: int = 0) -> Interval:
    """The mean of ``values`` (non-finite ones dropped) with its ``confidence`` interval.

    ``method="t"``: mean ± t(1-α/2, n-1)·sd/√n. ``method="bootstrap"``: the percentile interval
    of ``n_boot`` resampled means, drawn with ``numpy.random.default_rng(seed)`` (reproducible).
    Fewer than two values: bounds NaN and a note.
    """
    _check(confidence, method)
    x = _finite(values)
    boot = _boot_means(x, n_boot, seed) if method == "bootstrap" and len(x) > 1 else None
    return _interval(x, confidence, method, boot)


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95,
                      method: str = "t", n_boot: int = 10_000, seed: int = 0) -> Paired:
    """Compare ``variant`` with ``baseline``, both ``{seed: value}``, over the seeds both have with
    finite values (the others are unpaired and left out; ``diff.n`` counts the pairs).

    p-value: ``scipy.stats.ttest_rel`` for "t"; for "bootstrap" twice the fraction of resampled
    mean differences on the other side of zero from the observed mean (capped at 1). It is 1.0
    when every difference is exactly zero, NaN with fewer than two pairs.
    """
    _check(confidence, method)
    seeds = [s for s in variant if s in baseline
             and math.isfinite(float(variant[s])) and math.isfinite(float(baseline[s]))]
    v = np.asarray([float(variant[s]) for s in seeds], dtype=float)
    b = np.asarray([float(baseline[s]) for s in seeds], dtype=float)
    d = v - b  # [pairs]
    boot = _boot_means(d, n_boot, seed) if method == "bootstrap" and len(d) > 1 else None
    diff = _interval(d, confidence, method, boot)
    if len(d) < 2:
        p = math.nan
    elif np.all(d == 0):
        p = 1.0
    elif method == "t":
        from scipy import stats

        with warnings.catch_warnings():  # constant differences: scipy warns, t = ±inf, p = 0
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_rel(v, b).pvalue)
    else:
        other = (boot <= 0).mean() if diff.mean > 0 else (boot >= 0).mean() if diff.mean < 0 else 0.5
        p = min(1.0, 2.0 * float(other))
    significant = bool(diff.low > 0 or diff.high < 0)  # False when the bounds are NaN
    return Paired(diff, p, significant)


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
    ``paired`` also ``_diff``, ``_diff_low``, ``_diff_high``, ``_p``, ``_sig`` against ``base``
    ({seed: value}; None for the baseline row itself: NaN and False)."""
    iv = mean_interval(list(values.values()), confidence, method, n_boot, seed)
    x = _finite(list(values.values()))
    out = {prefix: iv.mean, f"{prefix}_low": iv.low, f"{prefix}_high": iv.high,
           f"{prefix}_std": float(x.std(ddof=1)) if len(x) > 1 else math.nan}
    if paired:
        if base is None:
            diff, p, sig = Interval(math.nan, math.nan, math.nan, 0, method), math.nan, False
        else:
            pr = paired_difference(values, base, confidence, method, n_boot, seed)
            diff, p, sig = pr.diff, pr.p_value, pr.significant
        out.update({f"{prefix}_diff": diff.mean, f"{prefix}_diff_low": diff.low, f"{prefix}_diff_high": diff.high,
                    f"{prefix}_p": p, f"{prefix}_sig": sig})
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
            confidence: float = 0.95, method: str = "t", *, n_boot: int = 10_000, seed: int = 0,
            metrics: Sequence[str] = COCO_METRICS) -> pd.DataFrame:
    """One row per variant (first-appearance order in ``results``) comparing it with ``baseline``.

    ``results``: the ``trial_results`` view (columns job, variant, seed, trial_id, state, and the
    COCO metrics); ``curves``: the ``metric_curves`` view (at least ``eval/AP`` and ``stat/*``
    rows; None leaves the convergence and assignment columns NaN). Columns:

    * ``variant``, ``is_baseline``, ``seeds`` (counted trials), ``pairs`` (seeds shared with the
      baseline that enter the ``metric`` difference; 0 for the baseline), ``diverged``, ``failed``;
    * per COCO metric ``m``: ``m`` (mean over seeds), ``m_low``/``m_high`` (CI), ``m_std``
      (sample sd), ``m_diff``/``m_diff_low``/``m_diff_high`` (paired difference from the baseline
      and its CI; NaN on the baseline row), ``m_p`` (paired p), ``m_sig`` (CI excludes 0);
    * convergence of each trial's ``eval/AP`` by epoch (see :func:`convergence`), averaged over
      seeds with the same column family: ``auc*``, ``epochs_to_90*``, ``final_minus_best*``;
    * assignment: per trial the mean of ``stat/<name>`` over its training steps, then mean,
      ``_low``, ``_high``, ``_std`` over seeds, for ``pos_per_gt``, ``pos_per_gt_l<k>`` (as
      present), ``gt_without_pos_frac``, ``ignored_per_image``;
    * ``note``: why an interval is missing or seeds were unpaired, else None.

    Units are those of the inputs (AP in [0, 1], epochs, counts).
    """
    _check(confidence, method)
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
        for m in metrics:
            base = None if is_base else metric_values(baseline, m)
            row.update(_columns(m, metric_values(v, m), base, confidence, method, n_boot, seed))
        for k in CONVERGENCE:
            base = None if is_base else by_seed(baseline, per_trial[k])
            row.update(_columns(k, by_seed(v, per_trial[k]), base, confidence, method, n_boot, seed))
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
        row["note"] = "; ".join(notes) or None
        rows.append(row)
    return pd.DataFrame(rows)


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
