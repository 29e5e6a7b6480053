"""The HTML report (``ablate report``): numbers equal to ``stats.compare``, escaping, plots, MLflow
links, no outside resource; end to end on a real job; and rendered in a real headless browser."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import ablate.cli_report  # noqa: F401  (registers ``report`` on the app)
from ablate.cli import app
from ablate.report import NA, build_report
from ablate.spec import JobSpec
from ablate.stats import compare
from ablate.store import open_store

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "tri<angle>")
DESCRIPTION = 'Box losses <script>alert("x")</script> & "quotes"'
LOSSES = ("loss/box", "loss/obj", "loss/noobj", "loss/cls", "loss/total")


# --------------------------------------------------------------------------- a store by hand
def _spec_doc(tmp: Path, name: str, variants: dict, seeds: list[int]) -> dict:
    return {
        "name": name,
        "description": DESCRIPTION,
        "dataset": {"synthetic": {"root": str(tmp / "synth"), "train": 24, "val": 8, "size": 64}, "image_size": 64},
        "base": {"preset": "yolov3", "train": {"epochs": 3}},
        "variants": variants,
        "seeds": seeds,
        "baseline": next(iter(variants)),
    }


def _ap(variant_shift: float, seed: int, epoch: int) -> float:
    return 0.1 * epoch + variant_shift + 0.01 * seed


def make_store(tmp: Path, name: str = "hand", seeds=(0, 1, 2), diverged=("ciou", 2), empty_variant: bool = False,
               url: str | None = None):
    """A job as the recorder would leave it: mse (baseline) and ciou x ``seeds``, 3 epochs each, one
    trial of ciou diverged at step 5; optionally a variant ``giou`` whose only trial failed."""
    variants = {"mse": {"recipe.box_loss": "mse"}, "ciou": {"recipe.box_loss": "ciou"}}
    if empty_variant:
        variants["giou"] = {"recipe": {"box_loss": "giou"}}
    doc = _spec_doc(tmp, name, variants, list(seeds))
    spec = JobSpec.model_validate(doc)
    store = open_store(url or f"sqlite:///{tmp / 'ablate.db'}")
    store.create_or_get_job(name, description=DESCRIPTION, spec_yaml=yaml.safe_dump(doc, sort_keys=False),
                            spec_json=spec.model_dump_json(), baseline="mse", tracking_uri="sqlite:///mlflow.db")
    store.set_job(name, state="finished", mlflow_experiment_id="7", mlflow_parent_run_id="parent0123")
    trials = [{"variant": v, "overrides": spec.variant_overrides(v), "seed": s, "hash": f"h-{v}-{s}",
               "config": {"preset": "yolov3", "recipe": {"box_loss": v, "lambda_box": 1.0},
                          "train": {"epochs": 3}, "name": f"{name}/{v}/{s}", "seed": s}}
              for v in variants for s in seeds]
    rows = store.ensure_trials(name, trials)
    shift = {"mse": 0.0, "ciou": 0.05, "giou": 0.02}
    for t, row in zip(trials, rows, strict=True):
        v, s = t["variant"], t["seed"]
        if empty_variant and v == "giou":
            store.update_trial(row.id, state="failed", attempts=3, error="worker died\nTraceback: boom")
            continue
        points = []
        last_epoch = 3
        if (v, s) == tuple(diverged):
            last_epoch = 1
        for step in range(1, 3 * last_epoch + 1):
            epoch = (step - 1) // 3 + 1
            for i, n in enumerate(LOSSES):
                points.append((n, step, epoch, (1.0 + i) / step + 0.01 * s))
            points += [("stat/pos_per_gt", step, epoch, 3.0 + shift[v] * 10), ("stat/pos_per_gt_l0", step, epoch, 1.0),
                       ("stat/pos_per_gt_l1", step, epoch, 2.0 + s), ("stat/gt_without_pos_frac", step, epoch, 0.05),
                       ("stat/ignored_per_image", step, epoch, 12.0 + s)]
            if step % 3 == 0:
                ap = _ap(shift[v], s, epoch)
                for m, val in (("AP", ap), ("AP50", ap + 0.2), ("AP75", ap - 0.05), ("APs", ap / 2), ("APm", ap),
                               ("APl", math.nan), ("AR1", ap), ("AR10", ap + 0.1), ("AR100", ap + 0.15),
                               ("ARs", ap / 2), ("ARm", ap), ("ARl", math.nan)):
                    points.append((f"eval/{m}", step, epoch, val))
                for k, c in enumerate(CLASSES):
                    points.append((f"eval/AP/{c}", step, epoch, math.nan if k == 2 and v == "mse" else ap + 0.1 * k))
        if (v, s) == tuple(diverged):
            points.append(("loss/box", 5, 2, math.nan))
            store.add_metrics(row.id, points)
            store.update_trial(row.id, state="diverged", epoch=1, attempts=1, mlflow_run_id=f"run-{v}-{s}",
                               error="diverged at step 5 (epoch 2): box nan")
            continue
        store.add_metrics(row.id, points)
        store.update_trial(row.id, state="finished", epoch=3, attempts=1, wall_seconds=12.5,
                           mlflow_run_id=f"run-{v}-{s}")
    return spec, store


# --------------------------------------------------------------------------- reading the page back
def table_values(page: str, table_id: str) -> dict[str, dict[str, float | str]]:
    """``{variant: {data-col: data-value}}`` of a table of the page."""
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert m, f"no table {table_id}"
    out = {}
    for variant, body in re.findall(r'<tr data-variant="([^"]*)">(.*?)</tr>', m.group(1), re.S):
        cells = {}
        for col, val in re.findall(r'data-col="([^"]*)" data-value="([^"]*)"', body):
            cells[html.unescape(col)] = val if val in ("True", "False") else float(val)
        out[html.unescape(variant)] = cells
    return out


def same(a: float, b) -> bool:
    """Equal, both NaN, or within the 10 decimals that ``ablate results --format json`` keeps (null: NaN)."""
    b = math.nan if b is None else float(b)
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=0, abs=1e-9)


def check_table_matches(page: str, rows: list[dict], metric: str = "AP") -> None:
    """The results table shows exactly ``rows`` (compare's, or ``ablate results --format json``'s)."""
    got = table_values(page, "results-table")
    assert list(got) == [r["variant"] for r in rows]
    for r in rows:
        cells = got[r["variant"]]
        for col in ("seeds", metric, f"{metric}_low", f"{metric}_high", "auc", "auc_low", "auc_high",
                    "epochs_to_90", "final_minus_best"):
            if col in cells:
                assert same(cells[col], r[col]), (r["variant"], col, cells[col], r[col])
        assert same(cells[metric], r[metric])
        if r[f"{metric}_std"] is not None:
            assert same(cells[f"{metric}_std"], r[f"{metric}_std"])  # the seed-to-seed sd beside the mean
        if not r["is_baseline"]:
            for col in (f"{metric}_diff", f"{metric}_p", f"{metric}_p_adj", f"{metric}_dz"):
                assert same(cells[col], r[col]), (r["variant"], col)
            assert cells[f"{metric}_sig"] == str(bool(r[f"{metric}_sig"]))  # the star: adjusted p
            if r[f"{metric}_diff_low"] is not None and not math.isnan(float(r[f"{metric}_diff_low"])):
                assert same(cells[f"{metric}_diff_low"], r[f"{metric}_diff_low"])
                assert same(cells[f"{metric}_diff_high"], r[f"{metric}_diff_high"])
    # and the formatted text: the mean with three decimals in the variant's row
    m = re.search(r'<table id="results-table">(.*?)</table>', page, re.S).group(1)
    for r in rows:
        row_html = re.search(rf'<tr data-variant="{re.escape(html.escape(r["variant"]))}">(.*?)</tr>', m, re.S).group(1)
        text = re.sub(r"<[^>]+>", " ", row_html)
        if r[metric] is not None and not math.isnan(float(r[metric])):
            assert f"{float(r[metric]):.3f}" in text
        else:
            assert NA in text


def external_loads(page: str) -> list[str]:
    """Every src=/href=/url() in the page that points outside it, except MLflow run links."""
    refs = re.findall(r'\b(?:src|href|xlink:href|action|poster|data)\s*=\s*"([^"]*)"', page)
    refs += re.findall(r"url\(\s*['\"]?([^)'\"]+)", page)
    refs += re.findall(r"@import\s+['\"]?([^'\";]+)", page)
    bad = []
    for ref in refs:
        ref = html.unescape(ref)
        if ref.startswith(("#", "data:")):
            continue
        if re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/\w+/runs/[\w-]+", ref):
            continue
        bad.append(ref)
    return bad


# --------------------------------------------------------------------------- unit
def test_report_shows_compare_numbers_plots_links_and_escapes(tmp_path):
    spec, store = make_store(tmp_path)
    page = build_report(store, "hand", mlflow_ui="http://127.0.0.1:5000")
    (tmp_path / "report.html").write_text(page)

    rows = compare(store.results("hand"), store.curves("hand"), "mse", metric="AP").to_dict("records")
    check_table_matches(page, rows)
    ciou = next(r for r in rows if r["variant"] == "ciou")
    assert ciou["seeds"] == 2 and ciou["diverged"] == 1
    assert "<ul id=\"not-averaged\">" in page
    assert re.search(r"<code>ciou/2</code>: diverged — .*diverged at step 5", page)

    # all-NaN APl: no crash, shown as a dash in the COCO table
    coco = table_values(page, "coco-table")
    assert math.isnan(coco["mse"]["APl"]) and coco["mse"]["AP50"] == pytest.approx(rows[0]["AP50"])

    # escaping: the description and a class name, never raw
    assert "<script>" not in page and html.escape(DESCRIPTION) in page
    assert "tri&lt;angle&gt;" in page and "tri<angle>" not in page
    assert html.escape(store.get_job("hand").spec_yaml) in page  # the spec, escaped
    assert '<pre class="yaml" id="spec-yaml">' in page

    # variant differences: overrides of the base and resolved differences from the baseline
    variants = re.search(r'<table id="variants-table">(.*?)</table>', page, re.S).group(1)
    assert "<code>recipe.box_loss</code> = <code>ciou</code>" in variants
    assert "<code>recipe.box_loss</code>: <code>mse</code> → <code>ciou</code>" in variants

    # plots: eval/AP + 5 loss curves, final bars, sizes, heatmap; each inline SVG with drawn paths
    svgs = re.findall(r'<svg class="plot-svg" data-plot="([^"]+)"(.*?)</svg>', page, re.S)
    keys = [k for k, _ in svgs]
    assert keys == ["curve-eval-AP", "curve-loss-box", "curve-loss-obj", "curve-loss-noobj", "curve-loss-cls",
                    "curve-loss-total", "final-bars", "sizes", "per-class"]
    for key, body in svgs:
        assert "<path" in body, key
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "element ids repeat across plots"

    # the per-class heatmap: a value per variant and class (mean over counted seeds), NaN as a dash
    per_class = table_values(page, "per-class-table")
    ap_mse = sum(_ap(0.0, s, 3) for s in (0, 1, 2)) / 3
    assert per_class["mse"]["AP/circle"] == pytest.approx(ap_mse)
    assert per_class["ciou"]["AP/square"] == pytest.approx(sum(_ap(0.05, s, 3) + 0.1 for s in (0, 1)) / 2)
    assert math.isnan(per_class["mse"]["AP/tri<angle>"])
    heat = dict(svgs)["per-class"]
    assert f"{ap_mse:.2f}" in heat and NA in heat

    # the assignment table
    assign = table_values(page, "assignment-table")
    assert assign["ciou"]["pos_per_gt"] == pytest.approx(3.5)
    assert {"pos_per_gt_l0", "pos_per_gt_l1", "gt_without_pos_frac", "ignored_per_image"} <= set(assign["mse"])

    # MLflow: one link per trial with a run, and the parent run
    links = re.findall(r'<a class="mlflow" href="([^"]+)">', page)
    assert "http://127.0.0.1:5000/#/experiments/7/runs/parent0123" in links
    for v in ("mse", "ciou"):
        for s in (0, 1, 2):
            assert f"http://127.0.0.1:5000/#/experiments/7/runs/run-{v}-{s}" in links

    # nothing is fetched from anywhere
    assert external_loads(page) == []
    assert "Content-Security-Policy" in page and "<script" not in page


def test_one_seed_and_a_variant_without_finished_trials(tmp_path):
    _, store = make_store(tmp_path, name="single", seeds=(0,), diverged=("none", -1), empty_variant=True)
    page = build_report(store, "single", mlflow_ui=None)
    rows = compare(store.results("single"), store.curves("single"), "mse").to_dict("records")
    check_table_matches(page, rows)
    results = re.search(r'<table id="results-table">(.*?)</table>', page, re.S).group(1)
    assert "no interval" in results and "one seed" in results
    giou = table_values(page, "results-table")["giou"]
    assert giou["seeds"] == 0 and math.isnan(giou["AP"])
    assert "no finished trial" in results
    assert "worker died" in page  # the failed trial is listed with its error
    assert '<a class="mlflow"' not in page  # no MLflow UI: no links
    assert "fill-opacity" not in re.search(r'data-plot="curve-eval-AP"(.*?)</svg>', page, re.S).group(1)  # no band
    assert external_loads(page) == []


def test_a_reused_trial_links_to_the_run_it_reuses(tmp_path):
    spec, store = make_store(tmp_path)
    store.create_or_get_job("again", description="", spec_yaml="name: again\n", spec_json=spec.model_dump_json(),
                            baseline="mse", tracking_uri="sqlite:///mlflow.db")
    store.set_job("again", state="finished", mlflow_experiment_id="9", mlflow_parent_run_id="parent9")
    rows = store.ensure_trials("again", [{"variant": v, "overrides": {}, "seed": 0, "hash": f"h-{v}-0", "config": {}}
                                         for v in ("mse", "ciou")])
    source = {t.variant.name: t.id for t in store.trials_of("hand") if t.seed == 0}
    for row, v in zip(rows, ("mse", "ciou"), strict=True):
        store.mark_reused(row.id, source[v])
    page = build_report(store, "again")
    links = re.findall(r'<a class="mlflow" href="([^"]+)">', page)
    assert "http://127.0.0.1:5000/#/experiments/7/runs/run-ciou-0" in links  # the source job's experiment
    assert "http://127.0.0.1:5000/#/experiments/9/runs/parent9" in links
    assert "reused run" in page
    got = table_values(page, "results-table")
    assert got["ciou"]["AP"] == pytest.approx(_ap(0.05, 0, 3)) and got["ciou"]["seeds"] == 1


def test_cli_writes_the_file_creating_folders_and_fails_in_one_line(tmp_path):
    _, store = make_store(tmp_path)
    runner = CliRunner()
    out = tmp_path / "deep" / "er" / "report.html"
    res = runner.invoke(app, ["report", "hand", "-o", str(out), "--store", store.url, "--metric", "AP50"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output and out.exists()
    page = out.read_text()
    rows = compare(store.results("hand"), store.curves("hand"), "mse", metric="AP50").to_dict("records")
    check_table_matches(page, rows, metric="AP50")
    boot = tmp_path / "boot.html"
    res = runner.invoke(app, ["report", "hand", "-o", str(boot), "--store", store.url, "--bootstrap"])
    assert res.exit_code == 0, res.output
    rows = compare(store.results("hand"), store.curves("hand"), "mse", method="bootstrap").to_dict("records")
    check_table_matches(boot.read_text(), rows)
    for args in (["report", "nope", "--store", store.url],
                 ["report", "hand", "--store", store.url, "--metric", "mAP"],
                 ["report", "hand", "--store", store.url, "--mlflow-ui", "javascript:alert(1)"],
                 ["report", "hand", "--store", f"sqlite:///{tmp_path / 'missing.db'}"]):
        res = runner.invoke(app, [*args, "-o", str(tmp_path / "x.html")])
        assert res.exit_code == 2, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error:"), res.output
    assert "no job named 'nope'" in runner.invoke(app, ["report", "nope", "--store", store.url]).output


def test_report_on_two_seeds_names_the_method_stars_nothing_and_says_the_seeds_needed(tmp_path):
    _, store = make_store(tmp_path, name="two", seeds=(0, 1), diverged=("none", -1))
    runner = CliRunner()
    for args, need, name in ((["--bootstrap"], 10, "BCa bootstrap"), (["--method", "signflip"], 6,
                                                                       "exact sign-flip permutation test")):
        out = tmp_path / f"{args[-1]}.html"
        res = runner.invoke(app, ["report", "two", "-o", str(out), "--store", store.url, *args])
        assert res.exit_code == 0, res.output
        page = out.read_text()
        method = "bootstrap" if "--bootstrap" in args else "signflip"
        rows = compare(store.results("two"), store.curves("two"), "mse", method=method).to_dict("records")
        check_table_matches(page, rows)
        # ciou is +0.05 on both seeds: every difference has one sign, yet no star
        assert table_values(page, "results-table")["ciou"]["AP_sig"] == "False" and 'class="sig"' not in page
        note = re.search(r'<p class="banner" id="significance-note">(.*?)</p>', page, re.S).group(1)
        assert f"a significant result needs at least {need} seeds" in note
        assert name in page and "Holm" in page
    res = runner.invoke(app, ["report", "two", "-o", str(tmp_path / "x.html"), "--store", store.url,
                              "--method", "wilcoxon"])
    assert res.exit_code == 2 and "--method" in res.output and len(res.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- dashboards/README.md
PG_ADMIN_URL = os.environ.get("ABLATE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """MLflow puts artifacts under ./mlruns: keep every test's side effects in its own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """An empty store database: a SQLite file, or a fresh schema in the PostgreSQL test database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ablate.db'}"
        return
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    schema = f"report_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError as e:
        admin.dispose()
        reason = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {str(e.orig).strip().splitlines()[0]}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set: the README's SQL must be checked on PostgreSQL)")
        pytest.skip(reason)
    try:
        yield sa.make_url(PG_ADMIN_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


def test_readme_sql_and_the_report_on_sqlite_and_postgresql(tmp_path, store_url):
    """Every ```sql block of dashboards/README.md runs, read-only, on SQLite and PostgreSQL and returns rows;
    the report reads either store the same way."""
    # the page's examples name the quickstart's baseline; the hand-made store's baseline is mse
    text = (REPO / "dashboards" / "README.md").read_text().replace("'yolov3'", "'mse'")
    assert "'mse'" in text
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    assert len(blocks) >= 6
    _, store = make_store(tmp_path, name="quickstart", url=store_url)
    try:
        for sql in blocks:
            _, rows = store.query(sql)
            assert rows, sql
        # the pandas example of the page, on the same store
        import pandas as pd
        import sqlalchemy as sa

        curves = pd.read_sql(sa.text("select c.variant, c.seed, c.epoch, c.value from metric_curves c "
                                     "join trial_results r on r.trial_id = c.trial_id "
                                     "where c.job = :job and c.name = 'eval/AP' and r.state in ('finished', 'reused')"),
                             store.engine, params={"job": "quickstart"})
        by_epoch = curves.pivot_table(index="epoch", columns="variant", values="value", aggfunc="mean")
        assert by_epoch.loc[3, "mse"] == pytest.approx(sum(_ap(0.0, s, 3) for s in (0, 1, 2)) / 3)
        page = build_report(store, "quickstart")
        check_table_matches(page, compare(store.results("quickstart"), store.curves("quickstart"), "mse")
                            .to_dict("records"))
        assert 'data-plot="per-class"' in page and external_loads(page) == []
        # the unquoted spelling fails on PostgreSQL, as the page says
        if store.engine.dialect.name == "postgresql":
            from ablate.store import StoreError

            with pytest.raises(StoreError, match="does not exist"):
                store.query("select AP from trial_results")
    finally:
        store.close()


# --------------------------------------------------------------------------- browser
def browser_check(report: Path, screenshot: Path) -> None:
    """Open ``report`` in headless Chromium: no SEVERE console entry, every plot drawn, a screenshot."""
    chromium, driver_path = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (Path(chromium).exists() and Path(driver_path).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing (apt-get install -y chromium chromium-driver)")
        pytest.skip("no headless browser: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("selenium is not installed (the test extra)")
        pytest.skip("selenium is not installed (pip install selenium)")

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(report.resolve().as_uri())
        assert driver.title.startswith("ablate report")
        plots = driver.execute_script("""
            return Array.from(document.querySelectorAll('svg.plot-svg')).map(s => {
                const r = s.getBoundingClientRect();
                return {key: s.dataset.plot, width: r.width, height: r.height,
                        paths: s.querySelectorAll('path').length,
                        drawn: Array.from(s.querySelectorAll('path')).filter(p => {
                            const b = p.getBBox(); return b.width > 0 || b.height > 0; }).length};
            });""")
        assert len(plots) >= 8, plots
        for p in plots:
            assert p["width"] > 0 and p["height"] > 0, p
            assert p["paths"] > 0 and p["drawn"] > 0, p
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert screenshot.exists() and screenshot.stat().st_size > 10_000


def test_report_renders_in_a_headless_browser(tmp_path):
    _, store = make_store(tmp_path)
    report = tmp_path / "report.html"
    report.write_text(build_report(store, "hand"))
    browser_check(report, tmp_path / "report.png")


# --------------------------------------------------------------------------- end to end
@pytest.fixture
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_of_a_real_job_matches_results_and_renders(tmp_path, ray_local):
    from ablate.runner import run_job
    from ablate.spec import load_job_spec
    from test_jobs import job_yaml

    path = job_yaml(tmp_path, name="e2e-report", seeds=(0, 1, 2), epochs=1)
    spec = load_job_spec(path)
    out = run_job(spec, path.read_text(), workdir=tmp_path / "runs", live=False)
    assert out.state == "finished", out

    runner = CliRunner()
    report = tmp_path / "out" / "report.html"
    res = runner.invoke(app, ["report", spec.name, "-o", str(report), "--store", spec.store])
    assert res.exit_code == 0, res.output
    js = runner.invoke(app, ["results", spec.name, "--format", "json", "--store", spec.store])
    assert js.exit_code == 0, js.output
    doc = json.loads(js.stdout)
    rows = doc["variants"] if isinstance(doc, dict) else doc
    page = report.read_text()
    check_table_matches(page, rows)
    assert len(rows) == 2 and all(r["seeds"] == 3 for r in rows)
    job = open_store(spec.store, create=False).get_job(spec.name)
    assert f"/#/experiments/{job.mlflow_experiment_id}/runs/{job.mlflow_parent_run_id}" in page
    links = set(re.findall(r'<a class="mlflow" href="([^"]+)">', page))
    assert len(links) == 6 + 1  # every trial and the parent run
    assert external_loads(page) == []
    browser_check(report, tmp_path / "report.png")
