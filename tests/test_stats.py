"""Statistics across seeds (ablate.stats) and ``ablate results``: hand-made numbers checked against scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from ablate.cli import app
from ablate.evaluate import COCO_METRICS
import ablate.stats as S  # the names added for issue 11 are read as S.<name>, so each test fails on its own
from ablate.stats import ONE_SEED, compare, convergence, curve_bands, mean_interval, paired_difference

T_975_2 = 4.302652729911275  # t(0.975, 2 degrees of freedom), as tables print it (exact to 2e-10)
VAR = {0: 0.30, 1: 0.32, 2: 0.35}
BASE = {0: 0.28, 1: 0.29, 2: 0.31}


# --------------------------------------------------------------------------- intervals and paired tests
def test_known_paired_difference_gives_known_interval_and_p():
    t = sps.t.ppf(0.975, 2)
    # closed form for 2 degrees of freedom: (2p - 1) * sqrt(2 / (4p(1 - p)))
    assert t == pytest.approx(0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), abs=1e-12)
    assert t == pytest.approx(T_975_2, abs=1e-9)
    half = t * 0.01 / math.sqrt(3)  # diffs [.02, .03, .04]: mean .03, sd .01
    r = paired_difference(VAR, BASE)
    assert r.diff.mean == pytest.approx(0.03, abs=1e-12)
    assert (r.diff.low, r.diff.high) == pytest.approx((0.03 - half, 0.03 + half), abs=1e-12)
    assert (r.diff.n, r.diff.method, r.diff.note) == (3, "t", None)
    assert r.p_value == pytest.approx(sps.ttest_rel([.30, .32, .35], [.28, .29, .31]).pvalue, rel=1e-12)
    assert r.significant and r.diff.low > 0


def test_mean_interval_t_matches_scipy():
    x = [0.31, 0.29, 0.35, 0.33]
    iv = mean_interval(x, confidence=0.9)
    low, high = sps.t.interval(0.9, 3, loc=np.mean(x), scale=sps.sem(x))
    assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((np.mean(x), low, high, 4), abs=1e-12)
    assert mean_interval([0.3, float("nan"), 0.5]).n == 2  # non-finite values dropped


def test_interval_including_zero_is_not_significant():
    r = paired_difference({0: 0.30, 1: 0.28, 2: 0.33}, {0: 0.29, 1: 0.30, 2: 0.31})  # diffs .01, -.02, .02
    assert r.diff.low < 0 < r.diff.high and not r.significant
    assert r.p_value == pytest.approx(sps.ttest_rel([.30, .28, .33], [.29, .30, .31]).pvalue)
    same = paired_difference({0: 0.3, 1: 0.4}, {0: 0.3, 1: 0.4})
    assert same.p_value == 1.0 and not same.significant


def test_one_seed_gives_no_interval_and_a_note():
    iv = mean_interval([0.31])
    assert iv.mean == 0.31 and iv.n == 1 and math.isnan(iv.low) and math.isnan(iv.high) and iv.note == ONE_SEED
    for method in ("t", "bootstrap"):
        r = paired_difference({0: 0.31}, {0: 0.30}, method=method)
        assert r.diff.mean == pytest.approx(0.01) and math.isnan(r.diff.low) and math.isnan(r.p_value)
        assert r.diff.note == ONE_SEED and not r.significant


def test_unpaired_seeds_are_dropped_and_pairs_counted():
    r = paired_difference({**VAR, 7: 0.9}, {**BASE, 8: 0.0, 2: BASE[2]})
    assert r.diff.n == 3 and r.diff.mean == pytest.approx(0.03)
    assert paired_difference({0: 0.3, 1: float("nan")}, {0: 0.2, 1: 0.2}).diff.n == 1  # NaN: no pair


def test_bootstrap_contains_mean_is_reproducible_and_narrows_with_spread():
    wide = [0.20, 0.35, 0.28, 0.41, 0.25]
    a = mean_interval(wide, method="bootstrap", seed=3)
    assert a.method == "bootstrap" and a.low <= a.mean <= a.high
    assert a == mean_interval(wide, method="bootstrap", seed=3)  # fixed seed: same interval
    m = np.mean(wide)
    narrow = mean_interval([m + (x - m) / 4 for x in wide], method="bootstrap", seed=3)
    assert narrow.high - narrow.low == pytest.approx((a.high - a.low) / 4, rel=0.05)  # BCa: equivariant up to ties
    # the BCa interval of scipy.stats.bootstrap, within the data's range
    ci = sps.bootstrap((np.asarray(wide),), np.mean, method="BCa", n_resamples=10_000,
                       rng=np.random.default_rng(3)).confidence_interval
    assert (a.low, a.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert min(wide) <= a.low and a.high <= max(wide)
    # 3 pairs all of one sign: the bootstrap interval excludes 0, but 3 pairs carry no bootstrap p or star
    r = paired_difference(VAR, BASE, method="bootstrap")
    assert r == paired_difference(VAR, BASE, method="bootstrap") and r.diff.low > 0
    assert math.isnan(r.p_value) and not r.significant and "bootstrap p" in r.diff.note


def test_bad_method_or_confidence_is_refused():
    with pytest.raises(ValueError, match="method"):
        mean_interval([1, 2], method="jackknife")
    with pytest.raises(ValueError, match="adjustment"):
        S.adjust_p([0.1], "bonferroni")
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1, 2], confidence=95)


# --------------------------------------------------------------------------- convergence
@pytest.mark.parametrize(("curve", "auc", "to90", "gap"), [
    ([(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)], 0.75 / 3, 4.0, 0.0),           # linear rise; 0.9*0.4 = 0.36
    ([(2, 0.2), (4, 0.4), (6, 0.4), (8, 0.4)], 2.2 / 6, 4.0, 0.0),            # plateau
    ([(3, 0.4), (1, 0.3), (2, 0.5)], 0.85 / 2, 2.0, -0.1),                    # overshoot, then drop (any order)
    ([(1, 0.25), (5, 0.25)], 0.25, 1.0, 0.0),                                 # constant a -> a
    ([(3, 0.2)], 0.2, 3.0, 0.0),                                              # one evaluation
])
def test_convergence_hand_curves(curve, auc, to90, gap):
    c = convergence(curve)
    assert c["auc"] == pytest.approx(auc, abs=1e-12)
    assert c["epochs_to_90"] == to90
    assert c["final_minus_best"] == pytest.approx(gap, abs=1e-12)


def test_convergence_edge_cases():
    assert math.isnan(convergence([(1, 0.0), (2, 0.0)])["epochs_to_90"])  # final <= 0
    assert all(math.isnan(v) for v in convergence([]).values())
    assert convergence([(1, 0.2), (2, float("nan"))])["final"] == 0.2  # non-finite points dropped


# --------------------------------------------------------------------------- compare
def _results() -> pd.DataFrame:
    rows, tid = [], 0
    ap = {"base": [0.28, 0.29, 0.31], "ciou": [0.30, 0.32, 0.35], "diou": [0.27, 0.33, float("nan")]}
    for v in ap:
        for seed in range(3):
            tid += 1
            state = "diverged" if (v, seed) == ("diou", 2) else "finished"
            row = {"job": "j", "variant": v, "seed": seed, "trial_id": tid, "state": state}
            row.update({m: ap[v][seed] + 0.1 * i for i, m in enumerate(COCO_METRICS)})
            rows.append(row)
    rows.append({"job": "j", "variant": "diou", "seed": 3, "trial_id": 99, "state": "failed"})
    return pd.DataFrame(rows)


def _curves(results: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in results.itertuples():
        if r.state == "failed":
            continue
        final = r.AP if r.state == "finished" else 0.1
        for e, frac in ((1, 0.5), (2, 0.9), (3, 1.0)):
            rows.append((r.variant, r.seed, r.trial_id, "eval/AP", 10 * e, e, final * frac))
        for step, pos in ((1, 2.0), (2, 3.0), (3, 4.0)):  # mean per trial: 3 + seed
            rows.append((r.variant, r.seed, r.trial_id, "stat/pos_per_gt", step, 1, pos + r.seed))
            rows.append((r.variant, r.seed, r.trial_id, "stat/pos_per_gt_l1", step, 1, pos / 2))
            rows.append((r.variant, r.seed, r.trial_id, "stat/pos_per_gt_l0", step, 1, 1.0))
            rows.append((r.variant, r.seed, r.trial_id, "stat/ignored_per_image", step, 1, 100.0 * step))
        rows.append((r.variant, r.seed, r.trial_id, "stat/gt_without_pos_frac", 1, 1, float("nan")))
        rows.append((r.variant, r.seed, r.trial_id, "stat/gt_without_pos_frac", 2, 1, 0.1 * (r.seed + 1)))
    df = pd.DataFrame(rows, columns=["variant", "seed", "trial_id", "name", "step", "epoch", "value"])
    return df.assign(job="j", is_nan=df["value"].isna())


def test_compare_rows_diffs_convergence_and_assignment():
    res = _results()
    out = compare(res, _curves(res), "base", adjust="none")
    assert list(out["variant"]) == ["base", "ciou", "diou"]
    b, c, d = (out.iloc[i] for i in range(3))
    assert b["is_baseline"] and not c["is_baseline"]
    assert all(math.isnan(b[f"{m}_diff"]) and math.isnan(b[f"{m}_p"]) and not b[f"{m}_sig"] for m in COCO_METRICS)
    assert b["pairs"] == 0 and c["pairs"] == 3 and d["pairs"] == 2
    # ciou: the known difference, for AP and (shifted equally) every other metric
    half = sps.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    for m in COCO_METRICS:
        assert c[f"{m}_diff"] == pytest.approx(0.03)
        assert (c[f"{m}_diff_low"], c[f"{m}_diff_high"]) == pytest.approx((0.03 - half, 0.03 + half))
        assert c[f"{m}_sig"]
    assert c["AP"] == pytest.approx(np.mean([.30, .32, .35]))
    assert c["AP_std"] == pytest.approx(np.std([.30, .32, .35], ddof=1))
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean([.30, .32, .35]), scale=sps.sem([.30, .32, .35]))
    assert (c["AP_low"], c["AP_high"]) == pytest.approx((lo, hi))
    assert c["AP_p"] == pytest.approx(sps.ttest_rel([.30, .32, .35], [.28, .29, .31]).pvalue)
    # diou: the diverged trial is counted, never averaged; the failed one too
    assert (d["seeds"], d["diverged"], d["failed"]) == (2, 1, 1)
    assert d["AP"] == pytest.approx(0.30) and d["AP_diff"] == pytest.approx(np.mean([-.01, .04]))
    assert not d["AP_sig"] and d["note"] is None
    # convergence: curves are final*(.5, .9, 1) over epochs 1..3 -> auc = final*(0.7+0.95)/2, 90% at epoch 2
    assert c["auc"] == pytest.approx(np.mean([.30, .32, .35]) * 0.825)
    assert c["auc_diff"] == pytest.approx(0.03 * 0.825)
    assert c["epochs_to_90"] == 2.0 and c["final_minus_best"] == pytest.approx(0.0)
    assert d["auc"] == pytest.approx(0.30 * 0.825)  # the diverged trial's curve is left out
    # assignment: per-trial mean over steps, then mean over seeds
    assert b["pos_per_gt"] == pytest.approx(np.mean([3, 4, 5])) and b["pos_per_gt_std"] == pytest.approx(1.0)
    assert d["pos_per_gt"] == pytest.approx(np.mean([3, 4]))  # seed 2 diverged
    assert c["pos_per_gt_l0"] == 1.0 and c["pos_per_gt_l1"] == pytest.approx(1.5)
    assert c["ignored_per_image"] == pytest.approx(200.0)
    assert c["gt_without_pos_frac"] == pytest.approx(0.2)  # the NaN step is left out
    cols = list(out.columns)
    assert cols.index("pos_per_gt") < cols.index("pos_per_gt_l0") < cols.index("pos_per_gt_l1") < cols.index(
        "gt_without_pos_frac")


def test_compare_notes_unpaired_and_one_seed():
    res = _results()
    res = res[~((res["variant"] == "base") & (res["seed"] == 0))]  # ciou seed 0 has no baseline pair
    out = compare(res, None, "base").set_index("variant")
    assert out.loc["ciou", "pairs"] == 2 and out.loc["ciou", "AP_diff"] == pytest.approx(0.035)
    assert "1 seed(s) without a baseline pair" in out.loc["ciou", "note"]
    assert math.isnan(out.loc["ciou", "auc"]) and math.isnan(out.loc["ciou", "pos_per_gt"])  # no curves
    one = compare(res[res["seed"] == 1], None, "base").set_index("variant")
    assert one.loc["base", "note"] == ONE_SEED and math.isnan(one.loc["base", "AP_low"])
    assert one.loc["ciou", "pairs"] == 1 and math.isnan(one.loc["ciou", "AP_diff_low"])
    with pytest.raises(ValueError, match="metric"):
        compare(res, None, "base", metric="mAP")
    with pytest.raises(ValueError, match="baseline"):
        compare(res, None, "nope")


def test_compare_without_curves_has_the_summary_columns():
    out = compare(_results(), None, "base")
    assert {"variant", "seeds", "diverged", "failed", "AP", "AP_std", "AP_diff", "ARl_diff"} <= set(out.columns)
    assert out.set_index("variant").loc["ciou", "AP_diff"] == pytest.approx(0.03)


def test_curve_bands():
    res = _results()
    bands = curve_bands(_curves(res), "eval/AP")
    assert list(bands.columns) == ["variant", "step", "epoch", "mean", "low", "high", "n"]
    assert list(bands["variant"].drop_duplicates()) == ["base", "ciou", "diou"]
    c3 = bands[(bands["variant"] == "ciou") & (bands["step"] == 30)].iloc[0]
    assert (c3["epoch"], c3["n"], c3["mean"]) == (3, 3, pytest.approx(np.mean([.30, .32, .35])))
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean([.30, .32, .35]), scale=sps.sem([.30, .32, .35]))
    assert (c3["low"], c3["high"]) == pytest.approx((lo, hi))
    one = curve_bands(_curves(res)[lambda d: d["seed"] == 0], "eval/AP")
    assert one["n"].eq(1).all() and one["low"].isna().all()
    assert curve_bands(_curves(res), "nothing").empty


# --------------------------------------------------------------------------- ablate results
def _store(tmp_path, seeds=(0, 1, 2), name="j"):
    from ablate.store import open_store

    url = f"sqlite:///{tmp_path / 'ablate.db'}"
    st = open_store(url)
    st.create_or_get_job(name, spec_yaml="", spec_json={}, baseline="base")
    aps = {"base": [0.28, 0.29, 0.31], "ciou": [0.30, 0.32, 0.35], "diou": [0.20, 0.40, 0.0]}
    trials = st.ensure_trials(name, [{"variant": v, "overrides": {}, "seed": s, "hash": f"{v}{s}", "config": {}}
                                     for v in aps for s in seeds])
    for t in trials:
        v, s = t.variant.name, t.seed
        diverged = (v, s) == ("diou", 2)
        st.update_trial(t.id, state="diverged" if diverged else "finished")
        ap = aps[v][s]
        rows = [("eval/AP", 10 * e, e, ap * f) for e, f in ((1, 0.5), (2, 0.9), (3, 1.0))]
        rows += [(f"eval/{m}", 30, 3, ap + 0.01 * i) for i, m in enumerate(COCO_METRICS) if m != "AP"]
        rows += [("stat/pos_per_gt", k, 1, 2.0 + k) for k in (1, 2, 3)] + [("loss/box", 1, 1, 0.5)]
        if diverged:
            rows += [("loss/box", 2, 1, float("nan"))]
        st.add_metrics(t.id, rows)
    return st, url


def _invoke(*args):
    return CliRunner().invoke(app, ["results", *args])


def test_results_csv_and_json_match_compare(tmp_path):
    st, url = _store(tmp_path)
    expected = compare(st.results("j"), st.curves("j"), "base")
    r = _invoke("j", "--store", url, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["baseline"], doc["metric"], doc["method"]) == ("base", "AP", "t")
    got = pd.DataFrame(doc["variants"])
    assert list(got["variant"]) == ["base", "ciou", "diou"]
    for col in ("seeds", "pairs", "diverged", "failed", "AP", "AP_low", "AP_diff", "AP_diff_high", "AP_p", "AP_sig",
                "ARl_diff", "auc", "epochs_to_90", "pos_per_gt"):
        pd.testing.assert_series_equal(got[col], expected[col], check_dtype=False, check_names=False)
    assert doc["ap_by_epoch"][0]["variant"] == "base" and doc["ap_by_epoch"][0]["n"] == 3
    r = _invoke("j", "--store", url, "--format", "csv")
    assert r.exit_code == 0, r.output
    header = r.stdout.splitlines()[0].split(",")
    assert {"AP_diff_low", "AP_p", "AR100_sig", "auc_high", "final_minus_best", "pos_per_gt", "note"} <= set(header)
    assert len(r.stdout.splitlines()) == 4


def test_results_markdown_and_table_show_ci_and_mark(tmp_path):
    _, url = _store(tmp_path)
    half = T_975_2 * 0.01 / math.sqrt(3)
    ci = f"+0.030 [{0.03 - half:+.3f}, {0.03 + half:+.3f}] *"
    for fmt in ("markdown", "table"):
        r = _invoke("j", "--store", url, "--format", fmt, "--adjust", "none")
        assert r.exit_code == 0, r.output
        ciou = next(line for line in r.stdout.splitlines() if "ciou" in line)
        assert ci in ciou, r.stdout
        diou = next(line for line in r.stdout.splitlines() if "diou" in line)
        assert "*" not in diou and "base (baseline)" in r.stdout
    md = _invoke("j", "--store", url, "--format", "markdown").stdout
    assert md.splitlines()[0].startswith(
        "| variant | seeds | pairs | AP [95% CI] | sd | ΔAP vs base [95% CI] | dz | p | p Holm |")
    ciou_cells = [c.strip() for c in next(line for line in md.splitlines() if "ciou" in line).split("|")]
    assert ciou_cells[2:4] == ["3", "3"]
    p = sps.ttest_rel([.30, .32, .35], [.28, .29, .31]).pvalue
    # raw p, Holm's over the 2 variants (ciou's is the smaller: 2p), dz = .03/.01, sd of ciou's AP; no star
    assert ciou_cells[7:10] == ["3.00", f"{p:.3g}", f"{2 * p:.3g}"] and 2 * p > 0.05
    assert ciou_cells[5] == f"{np.std([.30, .32, .35], ddof=1):.3f}" and "*" not in ciou_cells[6]
    assert "paired t test" in md and "Holm over 2 variant(s)" in md


def test_results_bootstrap_changes_intervals(tmp_path):
    _, url = _store(tmp_path)
    t = json.loads(_invoke("j", "--store", url, "--format", "json").stdout)["variants"][1]
    b1 = json.loads(_invoke("j", "--store", url, "--format", "json", "--bootstrap").stdout)
    b2 = json.loads(_invoke("j", "--store", url, "--format", "json", "--bootstrap").stdout)
    assert b1 == b2 and b1["method"] == "bootstrap"  # reproducible
    b = b1["variants"][1]
    assert b["AP_diff"] == pytest.approx(t["AP_diff"])
    assert (b["AP_diff_low"], b["AP_diff_high"]) != pytest.approx((t["AP_diff_low"], t["AP_diff_high"]))
    assert b["AP_diff_low"] <= b["AP_diff"] <= b["AP_diff_high"]
    r = _invoke("j", "--store", url, "--format", "markdown", "--bootstrap")
    assert r.exit_code == 0 and "bootstrap" in r.stdout


def test_results_one_seed_says_no_interval(tmp_path):
    _, url = _store(tmp_path, seeds=(0,))
    for fmt in ("table", "markdown"):
        r = _invoke("j", "--store", url, "--format", fmt)
        assert r.exit_code == 0, r.output
        assert ONE_SEED in r.stdout and "[" not in next(ln for ln in r.stdout.splitlines() if "ciou" in ln)


def test_results_errors_are_one_line(tmp_path):
    _, url = _store(tmp_path)
    for args, what in ((["--metric", "mAP"], "--metric"), (["--format", "xml"], "--format")):
        r = _invoke("j", "--store", url, *args)
        assert r.exit_code == 2 and what in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = _invoke("nope", "--store", url)
    assert r.exit_code == 2 and "no job named 'nope'" in r.output
    r = _invoke("j", "--store", url, "--metric", "AP50", "--format", "markdown")
    assert r.exit_code == 0 and "ΔAP50 vs base" in r.stdout


# --------------------------------------------------------------------------- issue 11: small samples, many variants
def _scipy_signflip(d) -> float:
    """The exact sign-flip p by scipy: paired samples (d, 0), every one of the 2^n swaps."""
    d = np.asarray(d, dtype=float)
    return sps.permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.mean(x - y, axis=axis),
                                permutation_type="samples", n_resamples=np.inf, vectorized=True).pvalue


@pytest.mark.parametrize(("d", "p"), [
    ([0.01, 0.02], 2 / 4),                                    # n=2, same sign: only the identity is as extreme
    ([0.02, 0.03, 0.04], 2 / 8),                              # n=3, same sign: the floor 2/2^3
    ([0.03, -0.01, 0.02], 2 * 2 / 8),                         # n=3 mixed: subsets {}, {-0.01} have sum <= 0
    ([0.05, 0.04, 0.03, 0.02, 0.01], 2 / 32),                 # n=5, same sign: 0.0625, never below 0.05
    ([0.05, 0.04, 0.03, 0.02, -0.01], 2 * 2 / 32),            # n=5 mixed
    ([0.01 * k for k in range(1, 9)], 2 / 256),               # n=8, same sign
    ([0.01 * k for k in range(1, 8)] + [-0.01], 2 * 3 / 256),  # n=8 mixed: {}, {-.01}, {.01, -.01} (a tie counts)
    ([0.02] * 6, 2 / 64),                                     # zero variance, not zero
    ([0.0] * 4, 1.0),                                         # every difference zero
])
def test_signflip_exact_p_by_hand_and_scipy(d, p):
    got, low, high = S.signflip_test(d)
    assert got == pytest.approx(p, abs=1e-15)
    assert got == pytest.approx(_scipy_signflip(d), abs=1e-12)
    assert (got < 0.05) == (not low <= 0 <= high)  # the star and the interval agree
    r = paired_difference(dict(enumerate(np.asarray(d) + 0.3)), dict(enumerate([0.3] * len(d))), method="signflip")
    assert r.p_value == pytest.approx(p) and r.diff.method == "signflip"


def test_signflip_interval_inverts_the_test():
    assert S.signflip_test([0.01 * k for k in range(1, 7)])[1:] == pytest.approx((0.01, 0.06))  # k=1: min, max
    assert S.signflip_test([0.02, 0.03, 0.04])[1:] == (-math.inf, math.inf)  # 3 pairs cannot bound a 95% interval
    rng = np.random.default_rng(5)
    for n in (6, 9, 12):
        d = rng.normal(0.01, 0.02, n)
        p, low, high = S.signflip_test(d)
        eps = 1e-9
        # at an endpoint a subset sum is 0 up to float rounding: tol makes it the tie it is
        assert S.signflip_test(d - low, tol=1e-12)[0] >= 0.05 and S.signflip_test(d - (low - eps))[0] < 0.05
        assert S.signflip_test(d - high, tol=1e-12)[0] >= 0.05 and S.signflip_test(d - (high + eps))[0] < 0.05
        assert (p < 0.05) == (low > 0 or high < 0)


def test_signflip_beyond_16_pairs_is_monte_carlo_with_a_fixed_seed():
    d = np.random.default_rng(2).normal(0.004, 0.02, 20)
    a, b = S.signflip_test(d, seed=1), S.signflip_test(d, seed=1)
    assert a == b and S.signflip_patterns(20).shape == (10_001, 20) and S.signflip_patterns(16).shape == (65536, 16)
    ref = sps.permutation_test((d, np.zeros(20)), lambda x, y, axis: np.mean(x - y, axis=axis),
                               permutation_type="samples", n_resamples=99_999, vectorized=True, rng=0).pvalue
    assert a[0] == pytest.approx(ref, abs=0.02)


def test_three_pairs_of_one_sign_get_no_star_but_t_may():
    assert paired_difference(VAR, BASE).significant  # t: p = 0.035
    for method in ("signflip", "bootstrap"):
        r = paired_difference(VAR, BASE, method=method)
        assert not r.significant and not (r.p_value < 0.05)
    assert paired_difference(VAR, BASE, method="signflip").p_value == pytest.approx(0.25)


def test_t_uses_scipy_ttest_rel_and_zero_variance_gives_no_star():
    r = paired_difference(VAR, BASE)
    res = sps.ttest_rel([.30, .32, .35], [.28, .29, .31])
    assert (r.diff.low, r.diff.high) == pytest.approx(tuple(res.confidence_interval(0.95)), abs=1e-15)
    assert r.effect == pytest.approx(3.0)  # dz = mean .03 / sd .01
    # equal differences up to float rounding (.3-.28 and .31-.29): scipy gives p ~1e-15; no t test here
    flat = paired_difference({0: 0.30, 1: 0.31}, {0: 0.28, 1: 0.29})
    assert math.isnan(flat.p_value) and not flat.significant and flat.diff.note == S.NO_SPREAD
    assert math.isnan(flat.effect)
    for method in S.METHODS:
        same = {s: 0.3 + 0.01 * s for s in range(12)}
        zero = paired_difference(same, dict(same), method=method)
        assert zero.p_value == 1.0 and not zero.significant and zero.diff.mean == 0.0
        const = paired_difference({s: 0.32 for s in range(12)}, {s: 0.30 for s in range(12)}, method=method)
        assert not math.isnan(const.diff.mean)  # no crash; a NaN p is never a star
        assert const.significant == (const.p_value < 0.05)


def test_bootstrap_is_scipy_bca_and_its_p_inverts_the_same_interval():
    d = np.random.default_rng(0).normal(0.008, 0.02, 12)
    v, b = 0.3 + d, np.full(12, 0.3)
    r = paired_difference(dict(enumerate(v)), dict(enumerate(b)), method="bootstrap")

    def boot(conf):
        return sps.bootstrap((v, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                             method="BCa", n_resamples=10_000, confidence_level=conf,
                             rng=np.random.default_rng(0)).confidence_interval

    ci = boot(0.95)
    assert (r.diff.low, r.diff.high) == pytest.approx((ci.low, ci.high), abs=1e-15)
    assert 0.01 < r.p_value < 0.99
    wider, narrower = boot(1 - 0.98 * r.p_value), boot(1 - 1.02 * r.p_value)
    assert wider.low <= 0 <= wider.high and not narrower.low <= 0 <= narrower.high
    assert r.significant == (r.p_value < 0.05) == (not ci.low <= 0 <= ci.high)
    # 12 pairs all of one sign: the floor 2/(B+1), never 0
    one_sign = paired_difference({s: 0.3 + 0.01 * (s + 1) for s in range(12)}, {s: 0.3 for s in range(12)},
                                 method="bootstrap")
    assert one_sign.p_value == pytest.approx(2 / 10_001) and one_sign.significant
    # below the minimum: an interval, no p, no star
    few = paired_difference({s: v[s] for s in range(S.BOOTSTRAP_MIN_PAIRS - 1)},
                            {s: b[s] for s in range(S.BOOTSTRAP_MIN_PAIRS - 1)}, method="bootstrap")
    assert math.isnan(few.p_value) and not few.significant and few.diff.low < few.diff.high


def test_bootstrap_minimum_pairs_rests_on_the_documented_coverage():
    cov = {n: S.bootstrap_coverage(n) for n in (3, 5, 8, 9, 10)}
    assert [round(cov[n], 2) for n in (3, 5, 8, 10)] == [0.75, 0.85, 0.89, 0.90]
    assert cov[S.BOOTSTRAP_MIN_PAIRS] >= 0.9 > cov[S.BOOTSTRAP_MIN_PAIRS - 1]
    assert math.comb(2 * 3 - 1, 3) == 10  # 3 pairs: 10 distinct resamples, as the docstring says


def test_holm_and_bh_by_hand_and_scipy():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted .005 .01 .03 .04 times 4 3 2 1 = .02 .03 .06 .04, running max .02 .03 .06 .06
    assert S.adjust_p(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted times 4/i = .02 .02 .04 .04, running min from the top: the same
    assert S.adjust_p(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert S.adjust_p(p, "bh") == pytest.approx(sps.false_discovery_control(p, method="bh"))
    assert S.adjust_p(p, "none") == pytest.approx(p)
    got = S.adjust_p([0.2, float("nan"), 0.6], "holm")  # NaN: no test, not in the family
    assert got[0] == pytest.approx(0.4) and math.isnan(got[1]) and got[2] == pytest.approx(0.6)
    assert S.adjust_p([0.9, 0.8], "holm") == pytest.approx([1.0, 1.0])  # capped at 1
    rng = np.random.default_rng(3)
    for _ in range(20):
        q = rng.uniform(0, 0.2, 7)
        assert S.adjust_p(q, "bh") == pytest.approx(sps.false_discovery_control(q, method="bh"))


def test_compare_adjusts_over_the_variants_and_stars_on_the_adjusted_p():
    res = _results()
    raw = compare(res, None, "base", adjust="none").set_index("variant")
    holm = compare(res, None, "base").set_index("variant")
    bh = compare(res, None, "base", adjust="bh").set_index("variant")
    pc, pd_ = raw.loc["ciou", "AP_p"], raw.loc["diou", "AP_p"]
    assert pc < 0.05 < 2 * pc < pd_ and raw.loc["ciou", "AP_sig"]
    assert holm.loc["ciou", "AP_p"] == pc and holm.loc["ciou", "AP_p_adj"] == pytest.approx(2 * pc)
    assert holm.loc["diou", "AP_p_adj"] == pytest.approx(pd_) and not holm.loc["ciou", "AP_sig"]
    assert bh.loc["ciou", "AP_p_adj"] == pytest.approx(sps.false_discovery_control([pc, pd_])[0])
    assert math.isnan(holm.loc["base", "AP_p_adj"]) and not holm.loc["base", "AP_sig"]
    # effect sizes: dz of the differences, the seed-to-seed sd of each variant
    assert holm.loc["ciou", "AP_dz"] == pytest.approx(3.0) and holm.loc["base", "AP_std"] == pytest.approx(
        np.std([.28, .29, .31], ddof=1))
    assert {"AP_dz", "AP_p_adj", "auc_p_adj", "ARl_dz"} <= set(holm.columns)


def test_seeds_needed_and_the_note():
    assert [S.pairs_needed("signflip", k) for k in (1, 2, 3, 10)] == [6, 7, 7, 9]  # 2/2^n < 0.05/k
    assert S.pairs_needed("signflip", 10, adjust="bh") == 6 and S.pairs_needed("signflip", 10, adjust="none") == 6
    assert S.pairs_needed("bootstrap", 4) == S.BOOTSTRAP_MIN_PAIRS and S.pairs_needed("t", 9) == 2
    assert S.smallest_p("signflip", 3) == 0.25 and S.smallest_p("t", 3) == 0.0
    assert math.isnan(S.smallest_p("bootstrap", 3))
    note = S.significance_note([3], "signflip")
    assert "0.25" in note and "at least 6 seeds" in note and len(note.splitlines()) == 1
    assert "at least 7 seeds" in S.significance_note([3, 3], "signflip") and "Holm over 2" in S.significance_note(
        [3, 3], "signflip")
    assert "at least 10 seeds" in S.significance_note([2], "bootstrap")
    assert S.significance_note([3], "t") is None and S.significance_note([6], "signflip") is None


def test_results_on_three_and_two_seeds_print_no_star_and_the_seeds_needed(tmp_path):
    _, url = _store(tmp_path)  # ciou: 3 pairs, differences .02 .03 .04, all positive
    for args, need in ((["--bootstrap"], 10), (["--method", "signflip"], 7), (["--method", "bootstrap"], 10)):
        for fmt in ("table", "markdown"):
            r = _invoke("j", "--store", url, "--format", fmt, *args)
            assert r.exit_code == 0, r.output
            ciou = next(line for line in r.stdout.splitlines() if "ciou" in line)
            assert "*" not in ciou, r.stdout
            assert f"a significant result needs at least {need} seeds" in r.stdout
    doc = json.loads(_invoke("j", "--store", url, "--format", "json", "--method", "signflip").stdout)
    assert doc["method"] == "signflip" and doc["adjust"] == "holm" and "at least 7" in doc["significance_note"]
    assert doc["variants"][1]["AP_p"] == pytest.approx(0.25) and doc["variants"][1]["AP_sig"] is False
    two = tmp_path / "two"
    two.mkdir()
    _, url2 = _store(two, seeds=(0, 1))
    r = _invoke("j", "--store", url2, "--bootstrap")
    assert r.exit_code == 0 and "*" not in r.stdout.split("ciou")[1].splitlines()[0]
    assert "at least 10 seeds" in r.stdout


def test_results_method_flags_are_checked(tmp_path):
    _, url = _store(tmp_path)
    for args, what in ((["--method", "wilcoxon"], "--method"), (["--adjust", "bonferroni"], "--adjust"),
                       (["--method", "t", "--bootstrap"], "--bootstrap")):
        r = _invoke("j", "--store", url, *args)
        assert r.exit_code == 2 and what in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert json.loads(_invoke("j", "--store", url, "--format", "json", "--method", "bootstrap", "--bootstrap")
                      .stdout)["method"] == "bootstrap"
