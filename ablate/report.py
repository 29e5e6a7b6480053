"""The HTML report of one job (``ablate report JOB -o report.html``): one self-contained page.

Everything comes from the SQL results store (``Store.results``, ``Store.curves``,
``Store.trials_of`` and the job row), so a report can be made on any machine that reaches the
store; nothing reads MLflow, the dataset or the run folders. The numbers are those of
``ablate results`` (:func:`ablate.stats.compare` over the same rows), the bands those of
:func:`ablate.stats.curve_bands`, both over the trials that count (``stats.COUNTED``):
diverged, failed and unfinished trials are listed, never averaged.

The page loads nothing: the styles are inline (``ablate/templates/page.html``), the plots are inline SVG drawn with matplotlib's SVG backend
(text kept as text, element ids made unique per plot), there is no script, and a
Content-Security-Policy forbids every fetch. The only outside addresses are the links to the
MLflow runs. Every text that comes from a user (description, spec, variant and class names,
errors) is HTML-escaped; a value that cannot be computed shows as "–".

    with open_store(url, create=False) as store:
        html = build_report(store, "box_losses", metric="AP", mlflow_ui="http://127.0.0.1:5000")
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any, Iterable, Optional
from urllib.parse import quote

from . import __version__
from .evaluate import COCO_METRICS

if TYPE_CHECKING:
    import pandas as pd

    from .store import Store

#: Default address of the MLflow UI (what ``ablate ui`` serves).
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
#: Loss curves drawn, where a job recorded them.
LOSS_CURVES = ("loss/box", "loss/obj", "loss/noobj", "loss/cls", "loss/total")
#: What a value that cannot be computed shows as.
NA = "–"
#: Colours per variant, in variant order (matplotlib's tab10 then tab20's light tones).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
           "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
_SIZES = (("APs", "small"), ("APm", "medium"), ("APl", "large"))
_ASSIGNMENT_HELP = {
    "pos_per_gt": "positive anchors per ground truth (all levels)",
    "gt_without_pos_frac": "fraction of ground truths left without any positive",
    "ignored_per_image": "anchors ignored (neither positive nor negative) per image",
}
_LEVEL_COL = re.compile(r"^pos_per_gt_l(\d+)$")


class ReportError(ValueError):
    """A report that cannot be made (unknown job, no trials); ``str(e)`` is one line."""


# --------------------------------------------------------------------------- data
@dataclass
class ReportData:
    """What the page shows, read from the store once."""

    job: Any  # store.Job row (name, description, spec_yaml, state, baseline, MLflow ids, ...)
    store_url: str  # for display, password hidden
    baseline: str
    metric: str
    confidence: float
    method: str  # stats.METHODS: the paired intervals, p and stars
    adjust: str  # stats.ADJUSTMENTS over the variants
    variants: list[str]  # in the store's variant order
    results: "pd.DataFrame"  # trial_results rows of the job
    curves: "pd.DataFrame"  # metric_curves rows (eval/*, loss/*, stat/*) of the job, all trials
    table: "pd.DataFrame"  # stats.compare rows, one per variant
    trials: list[Any]  # store.Trial rows (error, config_json, ...)
    counted_ids: set[int]  # trial ids whose state counts
    overrides: dict[str, dict[str, Any]]  # variant -> dotted overrides of the base
    spec_note: Optional[str] = None  # why the spec could not be rebuilt, if it could not
    experiments: dict[int, Optional[str]] = field(default_factory=dict)  # trial id -> MLflow experiment of its run


def load_report_data(store: "Store", job_name: str, metric: str = "AP", confidence: float = 0.95,
                     method: str = "t", adjust: str = "holm") -> ReportData:
    """Read one job's rows from ``store`` and compute the comparison (ReportError when there is none)."""
    from sqlalchemy import select, text

    from .stats import COUNTED, compare
    from .store.db import display_url
    from .store.models import Job, Trial

    if metric not in COCO_METRICS:
        raise ReportError(f"unknown metric {metric!r}; choose one of {', '.join(COCO_METRICS)}")
    job = store.get_job(job_name)
    if job is None:
        names = [j["name"] for j in store.list_jobs()]
        raise ReportError(f"no job named {job_name!r} in {display_url(store.url)}"
                          + (f"; jobs: {', '.join(names)}" if names else " (it holds no jobs)"))
    results = store.results(job_name)
    if results.empty:
        raise ReportError(f"job {job_name!r} has no trials in {display_url(store.url)}")
    # only the curves the page uses: a long job logs many other points (lr, grad_norm, weighted/*)
    with store.engine.connect() as conn:
        names = [r[0] for r in conn.execute(text("SELECT DISTINCT name FROM metric_curves WHERE job = :job"),
                                            {"job": job_name})]
    wanted = sorted(n for n in names if n.startswith(("eval/", "loss/", "stat/")))
    curves = store.curves(job_name, names=wanted) if wanted else store.curves(job_name, names=["eval/AP"])
    trials = store.trials_of(job_name)
    variants = list(dict.fromkeys(results["variant"]))

    spec_note = None
    overrides: dict[str, dict[str, Any]] = {}
    spec_baseline = None
    try:
        from .spec import JobSpec

        spec = JobSpec.model_validate_json(job.spec_json)
        spec_baseline = spec.baseline_variant
        for v in variants:
            try:
                overrides[v] = spec.variant_overrides(v)
            except KeyError:
                pass
    except Exception as e:  # a spec written by another ablate version: fall back to the store's variants
        spec_note = f"the stored spec could not be rebuilt here ({type(e).__name__}); overrides are the store's"
    for t in trials:  # the variants table keeps each variant's overrides too
        if t.variant.name not in overrides:
            try:
                overrides[t.variant.name] = json.loads(t.variant.overrides_json or "{}")
            except ValueError:
                overrides[t.variant.name] = {}

    # the baseline as ``ablate results`` picks it, so that the numbers are the same
    baseline = next(b for b in (job.baseline, spec_baseline, variants[0]) if b in variants)
    table = compare(results, curves, baseline, metric=metric, confidence=confidence, method=method, adjust=adjust)
    counted_ids = set(results.loc[results["state"].isin(COUNTED), "trial_id"].astype(int))

    # the MLflow experiment of each trial's run: this job's, or for a reused trial its source's job's
    experiments: dict[int, Optional[str]] = {}
    sources = {int(r.trial_id): int(r.reused_from) for r in results.itertuples()
               if r.state == "reused" and r.reused_from is not None and not _isnan(r.reused_from)}
    if sources:
        with store.session() as s:
            rows = s.execute(select(Trial.id, Job.mlflow_experiment_id).join(Job, Job.id == Trial.job_id)
                             .where(Trial.id.in_(set(sources.values())))).all()
        source_exp = {int(i): e for i, e in rows}
    else:
        source_exp = {}
    for tid in results["trial_id"].astype(int):
        experiments[tid] = source_exp.get(sources[tid]) if tid in sources else job.mlflow_experiment_id

    return ReportData(job=job, store_url=display_url(store.url), baseline=baseline, metric=metric,
                      confidence=confidence, method=method, adjust=adjust, variants=variants, results=results, curves=curves,
                      table=table, trials=trials, counted_ids=counted_ids, overrides=overrides,
                      spec_note=spec_note, experiments=experiments)


def build_report(store: "Store", job_name: str, *, metric: str = "AP", confidence: float = 0.95, method: str = "t",
                 adjust: str = "holm", mlflow_ui: Optional[str] = DEFAULT_MLFLOW_UI) -> str:
    """The report page of ``job_name`` as one HTML text (``mlflow_ui`` None or "": no run links); ``method``
    and ``adjust`` as in :func:`ablate.stats.compare`."""
    return render_report(load_report_data(store, job_name, metric, confidence, method, adjust), mlflow_ui=mlflow_ui)


def write_report(store: "Store", job_name: str, out: Path, **kw: Any) -> Path:
    """Write :func:`build_report` to ``out`` (its folder created if missing, the file replaced whole)."""
    page = build_report(store, job_name, **kw)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- formatting
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _isnan(x: Any) -> bool:
    try:
        return x is None or math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _f(x: Any) -> float:
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan


def _fmt(x: Any, digits: int = 3, sign: bool = False) -> str:
    v = _f(x)
    if math.isinf(v):  # an interval the method cannot bound (a sign-flip test on few pairs)
        return ("+∞" if sign else "∞") if v > 0 else "−∞"
    if not math.isfinite(v):
        return NA
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _fmt_p(p: Any) -> str:
    """A p-value as ``ablate results`` prints it: 3 significant digits."""
    v = _f(p)
    return f"{v:.3g}" if math.isfinite(v) else NA


def _val(col: str, x: Any, text: str) -> str:
    """A number with its exact value for machines: ``<span data-col=.. data-value=..>text</span>``."""
    v = _f(x)
    cls = "v na" if text == NA else "v"
    return f'<span class="{cls}" data-col="{_e(col)}" data-value="{_e(repr(v))}">{_e(text)}</span>'


def _mean_ci(row: Any, col: str, digits: int = 3, sign: bool = False, block: bool = False) -> str:
    """``mean [low, high]`` of column family ``col`` (``col``, ``col_low``, ``col_high``)."""
    mean, low, high = _f(row.get(col)), _f(row.get(f"{col}_low")), _f(row.get(f"{col}_high"))
    out = _val(col, mean, _fmt(mean, digits, sign))
    if not math.isfinite(mean):
        return out
    if not (math.isnan(low) or math.isnan(high)):  # ±inf: unbounded, shown as such
        ci = (f"[{_val(col + '_low', low, _fmt(low, digits, sign))}, "
              f"{_val(col + '_high', high, _fmt(high, digits, sign))}]")
    else:
        ci = '<span class="na">no interval</span>'
    return f'{out}<span class="ci">{ci}</span>' if block else f"{out} {ci}"


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def _table(headers: Iterable[tuple[str, bool]], rows: Iterable[str], table_id: str, caption: str = "") -> str:
    """A table from ``(header, numeric)`` pairs and ready ``<tr>`` rows."""
    head = "".join(f'<th class="num">{h}</th>' if num else f"<th>{h}</th>" for h, num in headers)
    cap = f'<p class="caption">{caption}</p>' if caption else ""
    return (f'<div class="table-wrap"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>{cap}')


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------- plots
def _mpl_text(s: Any) -> str:
    """A label for matplotlib: ``$`` would start mathtext."""
    return str(s).replace("$", r"\$")


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _svg(fig: Any, key: str, label: str) -> str:
    """``fig`` as inline SVG: text kept as text, no XML prolog or metadata, ids prefixed with ``key``."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"ablate-{key}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    s = buf.getvalue()
    s = s[s.index("<svg"):]
    s = re.sub(r"<metadata>.*?</metadata>\s*", "", s, flags=re.S)
    s = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{key}-{m.group(1)}"', s)
    s = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{key}-{m.group(1)})", s)
    s = re.sub(r'(xlink:href|href)="#([^"]+)"', lambda m: f'{m.group(1)}="#{key}-{m.group(2)}"', s)
    m = re.match(r'<svg([^>]*)\swidth="([\d.]+)pt"\s+height="([\d.]+)pt"', s)
    if m:
        w = float(m.group(2))
        s = s.replace(m.group(0), f'<svg{m.group(1)} width="100%"', 1)
        s = s.replace("<svg", f'<svg class="plot-svg" data-plot="{_e(key)}" role="img" aria-label="{_e(label)}" '
                              f'style="max-width:{w / 0.75:.0f}px"', 1)
    return s.strip()


def _figure(svg: str, key: str, caption: str) -> str:
    return f'<figure class="plot" id="plot-{_e(key)}">{svg}<figcaption>{caption}</figcaption></figure>'


def _legend_below(ax: Any, n: int) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=max(1, min(n, 4)), frameon=False, fontsize=8)


def curve_plot(bands: "pd.DataFrame", name: str, colors: dict[str, str], x: str = "step") -> Any:
    """Mean line per variant with its band (where two or more seeds have the point)."""
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(8.0, 3.8)
    ax = fig.add_subplot()
    variants = list(dict.fromkeys(bands["variant"]))
    for v in variants:
        g = bands[bands["variant"] == v].sort_values("step")
        xs, mean = g[x].to_numpy(dtype=float), g["mean"].to_numpy(dtype=float)
        low, high = g["low"].to_numpy(dtype=float), g["high"].to_numpy(dtype=float)
        few = len(g) <= 25
        ax.plot(xs, mean, color=colors.get(v, "#333333"), lw=1.6, marker="o" if few else None, ms=3.5,
                label=_mpl_text(f"{v} (n={int(g['n'].max())})"))
        if (g["n"] >= 2).any():
            ax.fill_between(xs, low, high, color=colors.get(v, "#333333"), alpha=0.18, lw=0)
    ax.set_xlabel("epoch" if x == "epoch" else "step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    xs_all = sorted(set(bands[x].astype(float)))
    if len(xs_all) == 1:  # one evaluation: an integer axis around it
        ax.set_xlim(xs_all[0] - 1, xs_all[0] + 1)
        ax.set_xticks(xs_all)
    ax.set_ylabel(_mpl_text(name))
    ax.grid(True, alpha=0.3)
    _legend_below(ax, len(variants))
    return fig


def bar_plot(table: "pd.DataFrame", metric: str, baseline: str, colors: dict[str, str]) -> Any:
    """Horizontal bars of the final ``metric`` per variant with confidence-interval error bars."""
    n = len(table)
    fig = _new_figure(8.0, 0.45 * n + 1.3)
    ax = fig.add_subplot()
    ys = list(range(n))[::-1]
    top = 0.0
    for y, (_, r) in zip(ys, table.iterrows(), strict=True):
        v, mean = r["variant"], _f(r.get(metric))
        low, high = _f(r.get(f"{metric}_low")), _f(r.get(f"{metric}_high"))
        if math.isfinite(mean):
            ax.barh(y, mean, color=colors[v], height=0.6, hatch="//" if v == baseline else None,
                    edgecolor="#333333" if v == baseline else colors[v], lw=0.8)
            right = mean
            if math.isfinite(low) and math.isfinite(high):
                ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="none", ecolor="#222222",
                            capsize=4, lw=1.2)
                right = high
            ax.annotate(f"{mean:.3f}", (right, y), xytext=(6, 0), textcoords="offset points", va="center",
                        fontsize=8)
            top = max(top, right)
        else:
            ax.text(0, y, f"  {NA} (no value)", va="center", fontsize=8, color="#59636e")
    ax.set_yticks(ys, [_mpl_text(f"{v} (baseline)" if v == baseline else v) for v in table["variant"]])
    ax.set_xlim(0, max(top * 1.2, 0.05))
    ax.set_xlabel(f"final {metric} (mean over seeds, bars: CI)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def size_plot(table: "pd.DataFrame", colors: dict[str, str]) -> Any:
    """Grouped bars: APs / APm / APl per variant, with confidence-interval error bars."""
    n = len(table)
    fig = _new_figure(8.0, 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(n, 1)
    top = 0.0
    for i, (_, r) in enumerate(table.iterrows()):
        v = r["variant"]
        for j, (col, _) in enumerate(_SIZES):
            x = j - 0.4 + width * (i + 0.5)
            mean, low, high = _f(r.get(col)), _f(r.get(f"{col}_low")), _f(r.get(f"{col}_high"))
            if math.isfinite(mean):
                ax.bar(x, mean, width=width * 0.9, color=colors[v], label=_mpl_text(v) if j == 0 else None)
                if math.isfinite(low) and math.isfinite(high):
                    ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="none", ecolor="#222222",
                                capsize=2, lw=1)
                    top = max(top, high)
                top = max(top, mean)
            else:
                ax.text(x, 0, NA, ha="center", va="bottom", fontsize=12, color="#59636e")
                if j == 0:
                    ax.bar(x, 0, width=width * 0.9, color=colors[v], label=_mpl_text(v))
    ax.set_xticks(range(len(_SIZES)), [f"{c} ({name})" for c, name in _SIZES])
    ax.set_xlim(-0.5, len(_SIZES) - 0.5)
    ax.set_ylim(0, max(top * 1.15, 0.05))
    ax.set_ylabel("AP (mean over seeds, bars: CI)")
    ax.grid(True, axis="y", alpha=0.3)
    _legend_below(ax, n)
    return fig


def heatmap_plot(matrix: "pd.DataFrame") -> Any:
    """Per-class AP heatmap, variants x classes (transposed when there are many classes), annotated."""
    import numpy as np

    m = matrix if matrix.shape[1] <= 24 else matrix.T
    rows, cols = m.shape
    fig = _new_figure(min(max(0.62 * cols + 2.6, 5.0), 16.0), min(max(0.42 * rows + 1.6, 2.4), 40.0))
    ax = fig.add_subplot()
    data = m.to_numpy(dtype=float)
    masked = np.ma.masked_invalid(data)
    finite = data[np.isfinite(data)]
    vmax = max(float(finite.max()) if finite.size else 1.0, 1e-6)
    cmap = _viridis_with_bad()
    im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(cols), [_mpl_text(c) for c in m.columns], rotation=40 if cols > 4 else 0,
                  ha="right" if cols > 4 else "center", fontsize=8)
    ax.set_yticks(range(rows), [_mpl_text(r) for r in m.index], fontsize=8)
    for i in range(rows):
        for j in range(cols):
            v = data[i, j]
            if math.isfinite(v):
                dark = v < 0.6 * vmax
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
            else:
                ax.text(j, i, NA, ha="center", va="center", fontsize=8, color="#59636e")
    fig.colorbar(im, ax=ax, shrink=0.8, label="AP")
    return fig


def _viridis_with_bad() -> Any:
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")


# --------------------------------------------------------------------------- page
def _per_class(data: ReportData) -> "pd.DataFrame":
    """variants x classes: each counted trial's ``eval/AP/<class>`` at its last step, mean over seeds."""
    import pandas as pd

    c = data.curves
    c = c[c["name"].str.startswith("eval/AP/") & c["trial_id"].isin(data.counted_ids)]
    if c.empty:
        return pd.DataFrame()
    last = c.sort_values("step").groupby(["trial_id", "name"], sort=False).tail(1)
    last = last.assign(cls=last["name"].str.slice(len("eval/AP/")),
                       value=pd.to_numeric(last["value"], errors="coerce").astype(float))
    classes = list(dict.fromkeys(c.sort_values(["name"])["name"].str.slice(len("eval/AP/"))))
    mat = last.groupby(["variant", "cls"])["value"].mean().unstack("cls")  # NaN-skipping mean
    return mat.reindex(index=data.variants, columns=classes)


def _mlflow_link(ui: Optional[str], experiment: Optional[str], run: Optional[str], text: str) -> str:
    if not ui or not experiment or not run or _isnan(run):
        return f'<span class="na">{NA}</span>'
    url = f"{ui.rstrip('/')}/#/experiments/{quote(str(experiment), safe='')}/runs/{quote(str(run), safe='')}"
    return f'<a class="mlflow" href="{_e(url)}">{_e(text)}</a>'


def _header(data: ReportData, ui: Optional[str]) -> str:
    job = data.job
    parent = _mlflow_link(ui, job.mlflow_experiment_id, job.mlflow_parent_run_id, "parent run")
    n_trials = len(data.results)
    counts: dict[str, int] = {}
    for s in data.results["state"]:
        counts[s] = counts.get(s, 0) + 1
    meta = [
        ("state", _e(job.state)),
        ("baseline", f"<code>{_e(data.baseline)}</code>"),
        ("headline metric", f"{_e(data.metric)} (COCO, final evaluation of each trial)"),
        ("statistics", f"differences paired by seed; their {data.confidence:.0%} intervals, p and * from one "
                       f"method: {_e(_method_text(data.method))}; p adjusted over the variants: "
                       f"{_e(_adjust_text(data.adjust))}"),
        ("trials", f"{n_trials}: " + _e(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))),
        ("created", _e(str(job.created_at)[:19])),
        ("results store", f"<code>{_e(data.store_url)}</code>"),
        ("MLflow", f"tracking <code>{_e(_display(job.tracking_uri))}</code>, experiment "
                   f"{_e(job.mlflow_experiment_id or NA)}, {parent}"),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta)
    desc = f'<p class="description">{_e(job.description)}</p>' if job.description else ""
    banner = ""
    if job.state != "finished":
        banner = (f'<p class="banner">This job is <strong>{_e(job.state)}</strong>: only trials that finished '
                  "count, so the numbers below may change.</p>")
    toc = "".join(f'<li><a href="#{k}">{t}</a></li>' for k, t in (
        ("results", "Results"), ("coco", "All COCO numbers"), ("curves", "Convergence curves"),
        ("final", "Final AP"), ("sizes", "AP by object size"), ("per-class", "Per-class AP"),
        ("assignment", "Assignment statistics"), ("trials", "Trials and MLflow runs"),
        ("spec", "Job spec and variant differences")))
    return (f"<header><h1>Ablation report: {_e(job.name)}</h1>{desc}<dl class=\"meta\">{dl}</dl></header>"
            f"{banner}<nav class=\"toc\"><ol>{toc}</ol></nav>")


def _display(uri: Optional[str]) -> str:
    if not uri:
        return NA
    from .store.db import display_url

    return display_url(uri) if "://" in uri else uri


def _method_text(method: str) -> str:
    from .stats import METHOD_NAMES

    return METHOD_NAMES[method] + (" (10,000 resamples, fixed seed)" if method == "bootstrap" else "")


def _adjust_text(adjust: str) -> str:
    from .stats import ADJUST_NAMES

    return ADJUST_NAMES[adjust]


def _results_section(data: ReportData, colors: dict[str, str]) -> str:
    from .stats import significance_note

    m, conf = data.metric, f"{data.confidence:.0%}"
    alpha = f"{1 - data.confidence:.2g}"
    adj = data.adjust != "none"
    headers = [("variant", False), ("seeds", True), ("not averaged", True), (f"{_e(m)} mean [{conf} CI]", True),
               (f"sd of {_e(m)}", True), (f"Δ{_e(m)} vs {_e(data.baseline)} [{conf} CI]", True), ("d<sub>z</sub>", True),
               ("p", True)] + ([("p adj.", True)] if adj else []) + [
               ("sig.", True), ("AUC of AP [CI]", True), ("epochs to 90%", True), ("final − best", True),
               ("note", False)]
    rows = []
    notes = []
    for _, r in data.table.iterrows():
        v = r["variant"]
        base = bool(r.get("is_baseline"))
        name = f'{_swatch(colors[v])}<code>{_e(v)}</code>' + ('<span class="badge">baseline</span>' if base else "")
        seeds = _val("seeds", r["seeds"], str(int(r["seeds"])))
        if not base:
            seeds += f' <span class="ci">{_val("pairs", r["pairs"], str(int(r["pairs"])))} paired</span>'
        bad = []
        if int(r.get("diverged", 0)):
            bad.append(_val("diverged", r["diverged"], f"{int(r['diverged'])} diverged"))
        if int(r.get("failed", 0)):
            bad.append(_val("failed", r["failed"], f"{int(r['failed'])} failed"))
        bad_html = "<br>".join(bad) or '<span class="na">0</span>'
        sd = _val(f"{m}_std", r.get(f"{m}_std"), _fmt(r.get(f"{m}_std")))
        if base:
            diff = '<span class="na">baseline</span>'
            dz = p = p_adj = sig = f'<span class="na">{NA}</span>'
        else:
            diff = _mean_ci(r, f"{m}_diff", sign=True, block=True)
            dz = _val(f"{m}_dz", r.get(f"{m}_dz"), _fmt(r.get(f"{m}_dz"), 2, True))
            p = _val(f"{m}_p", r.get(f"{m}_p"), _fmt_p(r.get(f"{m}_p")))
            p_adj = _val(f"{m}_p_adj", r.get(f"{m}_p_adj"), _fmt_p(r.get(f"{m}_p_adj")))
            if _isnan(r.get(f"{m}_p_adj")):
                sig = f'<span class="na" data-col="{_e(m)}_sig" data-value="False" title="no p">{NA}</span>'
            elif bool(r.get(f"{m}_sig")):
                sig = (f'<span class="sig" data-col="{_e(m)}_sig" data-value="True" '
                       f'title="{"adjusted " if adj else ""}p &lt; {alpha}">*</span>')
            else:
                sig = f'<span data-col="{_e(m)}_sig" data-value="False" title="not significant">no</span>'
        fmb = r.get("final_minus_best")
        note = r.get("note")
        note_html = "" if note is None or _isnan(note) else _e(note)
        rows.append(
            f'<tr data-variant="{_e(v)}"><td>{name}</td><td class="num">{seeds}</td><td class="num">{bad_html}</td>'
            f'<td class="num">{_mean_ci(r, m, block=True)}</td><td class="num">{sd}</td><td class="num">{diff}</td>'
            f'<td class="num">{dz}</td><td class="num">{p}</td>'
            + (f'<td class="num">{p_adj}</td>' if adj else "") + f'<td class="num">{sig}</td>'
            f'<td class="num">{_mean_ci(r, "auc", block=True)}</td>'
            f'<td class="num">{_val("epochs_to_90", r.get("epochs_to_90"), _fmt(r.get("epochs_to_90"), 1))}</td>'
            f'<td class="num">{_val("final_minus_best", fmb, _fmt(fmb, 3, True))}</td>'
            f"<td>{note_html}</td></tr>")
        if note_html:
            notes.append(f"<li><code>{_e(v)}</code>: {note_html}</li>")
    excluded = [t for t in data.results.itertuples() if int(t.trial_id) not in data.counted_ids]
    errors = {t.id: t.error for t in data.trials}
    ex_html = ""
    if excluded:
        items = "".join(
            f"<li><code>{_e(t.variant)}/{_e(t.seed)}</code>: {_e(t.state)}"
            + (f" — <span class=\"mono\">{_e(_one_line(errors.get(int(t.trial_id))))}</span>"
               if errors.get(int(t.trial_id)) else "") + "</li>"
            for t in excluded)
        ex_html = f"<h3>Trials not averaged</h3><ul id=\"not-averaged\">{items}</ul>"
    others = data.table[~data.table["is_baseline"].astype(bool)]
    warn = significance_note([int(x) for x in others["pairs"]], data.method, data.confidence, data.adjust, m)
    warn_html = f'<p class="banner" id="significance-note">{_e(warn)}</p>' if warn else ""
    k = len(others)
    caption = (f"Mean over the seeds whose trial finished, with its {conf} interval across seeds "
               f"({'BCa bootstrap' if data.method == 'bootstrap' else 'Student t'}); sd: the seed-to-seed standard "
               f"deviation, the noise a Δ should be compared with. Δ is the mean of the per-seed differences from "
               f"the baseline (seeds pair: same data order and initialisation); its interval, p and * all come from "
               f"one method, the {_e(_method_text(data.method))}. d<sub>z</sub>: mean / sd of the differences. "
               + (f"The p of the {k} variant(s) against the baseline are adjusted for multiplicity "
                  f"({_e(_adjust_text(data.adjust))}); * where the adjusted p &lt; {alpha}. " if adj else
                  f"No multiplicity adjustment: * where p &lt; {alpha}. ")
               + "AUC: area under each trial's eval/AP curve over epochs divided by the epoch span; epochs to 90%: "
               "first epoch reaching 90% of the final AP; final − best: how much AP the last evaluation lost against "
               f"the best one. With one seed there is no interval; ±∞: the method cannot bound it. {NA}: no value.")
    return ('<section id="results"><h2>Results</h2>' + warn_html
            + _table(headers, rows, "results-table", caption)
            + (f"<ul class=\"notes\">{''.join(notes)}</ul>" if notes else "") + ex_html + "</section>")


def _one_line(s: Optional[str], limit: int = 300) -> str:
    s = " ".join(str(s or "").split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _coco_section(data: ReportData, colors: dict[str, str]) -> str:
    headers = [("variant", False)] + [(m, True) for m in COCO_METRICS]
    rows = []
    for _, r in data.table.iterrows():
        v = r["variant"]
        cells = "".join(f'<td class="num">{_mean_ci(r, m, block=True)}</td>' for m in COCO_METRICS)
        rows.append(f'<tr data-variant="{_e(v)}"><td>{_swatch(colors[v])}<code>{_e(v)}</code></td>{cells}</tr>')
    caption = (f"The twelve COCO numbers of each variant's final evaluation: mean over seeds and "
               f"{data.confidence:.0%} interval. {NA} where no trial has the value (APl when the validation set has "
               "no large objects, for instance).")
    return ('<section id="coco"><h2>All COCO numbers</h2>'
            + _table(headers, rows, "coco-table", caption) + "</section>")


def _curves_section(data: ReportData, colors: dict[str, str]) -> str:
    from .stats import curve_bands

    counted = data.curves[data.curves["trial_id"].isin(data.counted_ids)]
    present = set(counted["name"])
    names = ["eval/AP"] + ([f"eval/{data.metric}"] if data.metric != "AP" else [])
    names += [n for n in LOSS_CURVES if n in present]
    parts = []
    for name in names:
        key = "curve-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        if name not in present:
            parts.append(f'<p class="na" id="plot-{key}">No finished trial recorded <code>{_e(name)}</code>.</p>')
            continue
        bands = curve_bands(counted, name, data.confidence)
        bands = bands[bands["mean"].notna() | bands["n"].gt(0)]
        if bands.empty:
            parts.append(f'<p class="na" id="plot-{key}">No finite value of <code>{_e(name)}</code>.</p>')
            continue
        x = "epoch" if name.startswith("eval/") else "step"
        fig = curve_plot(bands, name, colors, x=x)
        one_seed = bool((bands.groupby("variant")["n"].max() < 2).any())
        cap = (f"<code>{_e(name)}</code> by {x}: mean over the finished seeds of each variant, band: "
               f"{data.confidence:.0%} interval across seeds"
               + (" (variants with one seed have no band)" if one_seed else "") + ".")
        parts.append(_figure(_svg(fig, key, f"{name} by {x}"), key, cap))
    return '<section id="curves"><h2>Convergence curves</h2>' + "".join(parts) + "</section>"


def _final_section(data: ReportData, colors: dict[str, str]) -> str:
    m = data.metric
    fig = bar_plot(data.table, m, data.baseline, colors)
    cap = (f"Final {_e(m)} per variant: mean over the finished seeds; error bars: {data.confidence:.0%} interval "
           f"(none with one seed); hatched: the baseline.")
    return (f'<section id="final"><h2>Final {_e(m)}</h2>'
            + _figure(_svg(fig, "final-bars", f"final {m} per variant"), "final-bars", cap) + "</section>")


def _sizes_section(data: ReportData, colors: dict[str, str]) -> str:
    fig = size_plot(data.table, colors)
    cap = (f"COCO AP for small (< 32² px), medium and large (> 96² px) objects; error bars: {data.confidence:.0%} "
           f"interval. {NA}: no value (no objects of that size in the validation set, or no finished trial).")
    return ('<section id="sizes"><h2>AP by object size</h2>'
            + _figure(_svg(fig, "sizes", "AP by object size per variant"), "sizes", cap) + "</section>")


def _per_class_section(data: ReportData) -> str:
    mat = _per_class(data)
    if mat.empty or mat.shape[1] == 0:
        body = '<p class="na" id="plot-per-class">No per-class AP recorded (<code>eval/AP/&lt;class&gt;</code>).</p>'
    else:
        fig = heatmap_plot(mat)
        cap = ("AP per class at each trial's last evaluation, mean over the finished seeds. "
               f"{NA}: no value (a class without ground truth in the validation set).")
        body = _figure(_svg(fig, "per-class", "per-class AP heatmap"), "per-class", cap)
        classes = "".join(f"<th class=\"num\">{_e(c)}</th>" for c in mat.columns)
        rows = "".join(
            f'<tr data-variant="{_e(v)}"><td><code>{_e(v)}</code></td>'
            + "".join(f'<td class="num">{_val("AP/" + str(c), mat.loc[v, c], _fmt(mat.loc[v, c]))}</td>'
                      for c in mat.columns) + "</tr>"
            for v in mat.index)
        body += (f'<details><summary>the numbers</summary><div class="table-wrap"><table id="per-class-table">'
                 f"<thead><tr><th>variant</th>{classes}</tr></thead><tbody>{rows}</tbody></table></div></details>")
    return '<section id="per-class"><h2>Per-class AP</h2>' + body + "</section>"


def _assignment_section(data: ReportData, colors: dict[str, str]) -> str:
    t = data.table
    levels = sorted((c for c in t.columns if _LEVEL_COL.match(c)), key=lambda c: int(_LEVEL_COL.match(c).group(1)))
    cols = [c for c in ("pos_per_gt", *levels, "gt_without_pos_frac", "ignored_per_image") if c in t.columns]
    if not cols:
        return ('<section id="assignment"><h2>Assignment statistics</h2>'
                '<p class="na">No assignment statistics recorded.</p></section>')
    headers = [("variant", False)] + [(_e(c), True) for c in cols]
    rows = []
    for _, r in t.iterrows():
        v = r["variant"]
        digits = {"gt_without_pos_frac": 3, "ignored_per_image": 1}
        cells = "".join(f'<td class="num">{_mean_ci(r, c, digits.get(c, 2), block=True)}</td>' for c in cols)
        rows.append(f'<tr data-variant="{_e(v)}"><td>{_swatch(colors[v])}<code>{_e(v)}</code></td>{cells}</tr>')
    helps = [f"<code>{c}</code>: {_ASSIGNMENT_HELP[c]}" for c in cols if c in _ASSIGNMENT_HELP]
    if levels:
        helps.insert(1, "<code>pos_per_gt_l&lt;k&gt;</code>: positives per ground truth on output level k")
    caption = ("Who the assigner made positive, per trial averaged over its training steps (the "
               "<code>stat/*</code> curves), then mean over seeds with the "
               f"{data.confidence:.0%} interval. " + "; ".join(helps) + ".")
    return ('<section id="assignment"><h2>Assignment statistics</h2>'
            + _table(headers, rows, "assignment-table", caption) + "</section>")


def _trials_section(data: ReportData, ui: Optional[str]) -> str:
    job = data.job
    m = data.metric
    errors = {t.id: t.error for t in data.trials}
    headers = [("variant", False), ("seed", True), ("state", False), ("attempts", True), ("epoch", True),
               ("wall s", True), (f"final {_e(m)}", True), ("hash", False), ("MLflow run", False), ("error", False)]
    rows = []
    for t in data.results.itertuples():
        tid = int(t.trial_id)
        counted = tid in data.counted_ids
        exp = data.experiments.get(tid)
        run = t.mlflow_run_id if isinstance(t.mlflow_run_id, str) else None
        link = _mlflow_link(ui, exp, run, f"{t.variant}/{t.seed}")
        if t.state == "reused" and run:
            link += ' <span class="badge">reused run</span>'
        err = errors.get(tid)
        err_html = (f'<span class="mono" title="{_e(err)}">{_e(_one_line(err, 120))}</span>' if err else "")
        wall = _f(t.wall_seconds)
        rows.append(
            f'<tr data-trial="{tid}" class="{"counted" if counted else "not-counted"}">'
            f"<td><code>{_e(t.variant)}</code></td><td class=\"num\">{_e(t.seed)}</td><td>{_e(t.state)}</td>"
            f'<td class="num">{_e(t.attempts)}</td><td class="num">{_e(t.epoch)}</td>'
            f'<td class="num">{_fmt(wall, 0)}</td>'
            f'<td class="num">{_val(m, getattr(t, m), _fmt(getattr(t, m)))}</td>'
            f'<td><code>{_e(t.hash)}</code></td><td>{link}</td><td>{err_html}</td></tr>')
    parent = _mlflow_link(ui, job.mlflow_experiment_id, job.mlflow_parent_run_id,
                          f"parent run of {job.name}")
    if not job.mlflow_experiment_id:
        intro = "<p>This job was not recorded to MLflow.</p>"
    elif not ui:
        intro = "<p>No MLflow UI address given: no run links.</p>"
    else:
        intro = (f"<p>The job's MLflow experiment is {_e(job.mlflow_experiment_id)} at "
                 f"<code>{_e(_display(job.tracking_uri))}</code>; {parent} (the latest submission). The links open "
                 f"the MLflow UI at <code>{_e(ui)}</code> (start it with <code>ablate ui {_e(job.name)}</code>).</p>")
    caption = ("Every trial of the job; rows in red do not count in the means (diverged, failed, or not finished). "
               "A reused trial did not train: its numbers and run are those of an earlier trial with the same hash.")
    return ('<section id="trials"><h2>Trials and MLflow runs</h2>' + intro
            + _table(headers, rows, "trials-table", caption) + "</section>")


def _spec_section(data: ReportData) -> str:
    configs: dict[str, dict[str, Any]] = {}
    for t in data.trials:
        if t.variant.name not in configs:
            try:
                cfg = json.loads(t.config_json or "{}")
            except ValueError:
                cfg = {}
            configs[t.variant.name] = {k: v for k, v in _flatten(cfg).items() if k not in ("name", "seed")}
    base_cfg = configs.get(data.baseline, {})
    rows = []
    for v in data.variants:
        ov = data.overrides.get(v, {})
        ov_html = ("<ul class=\"overrides\">" + "".join(
            f"<li><code>{_e(k)}</code> = <code>{_e(_short(x))}</code></li>" for k, x in ov.items()) + "</ul>"
                   if ov else '<span class="na">none (the base)</span>')
        if v == data.baseline:
            diff_html = '<span class="na">this is the baseline</span>'
        else:
            cfg = configs.get(v, {})
            keys = sorted(k for k in set(cfg) | set(base_cfg) if cfg.get(k, NA) != base_cfg.get(k, NA))
            diff_html = ("<ul class=\"overrides\">" + "".join(
                f"<li><code>{_e(k)}</code>: <code>{_e(_short(base_cfg.get(k, NA)))}</code> → "
                f"<code>{_e(_short(cfg.get(k, NA)))}</code></li>" for k in keys) + "</ul>"
                         if keys else '<span class="na">identical resolved configuration</span>')
        rows.append(f'<tr data-variant="{_e(v)}"><td><code>{_e(v)}</code></td><td>{ov_html}</td>'
                    f"<td>{diff_html}</td></tr>")
    headers = [("variant", False), ("overrides of the base (job file)", False),
               (f"resolved differences from the baseline <code>{_e(data.baseline)}</code>", False)]
    caption = ("Overrides: what the job file sets for the variant (dotted keys, grid point included). Resolved "
               "differences: every field of the trial configuration (preset expanded) whose value differs from the "
               "baseline's, as stored with the trials." + (f" Note: {_e(data.spec_note)}." if data.spec_note else ""))
    return ('<section id="spec"><h2>Job spec and variant differences</h2>'
            + _table(headers, rows, "variants-table", caption)
            + f'<h3>The job file as submitted</h3><pre class="yaml" id="spec-yaml">{_e(data.job.spec_yaml)}</pre>'
            + "</section>")


def render_report(data: ReportData, mlflow_ui: Optional[str] = DEFAULT_MLFLOW_UI) -> str:
    """The page for ``data`` (see the module docstring)."""
    colors = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(data.variants)}
    for v in data.table["variant"]:
        colors.setdefault(v, PALETTE[len(colors) % len(PALETTE)])
    body = "\n".join([
        _header(data, mlflow_ui),
        _results_section(data, colors),
        _coco_section(data, colors),
        _curves_section(data, colors),
        _final_section(data, colors),
        _sizes_section(data, colors),
        _per_class_section(data),
        _assignment_section(data, colors),
        _trials_section(data, mlflow_ui),
        _spec_section(data),
        f"<footer>Made by ablate {_e(__version__)} on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the results store; "
        "the same numbers as <code>ablate results</code>.</footer>",
    ])
    template = (resources.files("ablate") / "templates" / "page.html").read_text(encoding="utf-8")
    return Template(template).substitute(title=_e(f"ablate report: {data.job.name}"), version=_e(__version__),
                                         body=body)
