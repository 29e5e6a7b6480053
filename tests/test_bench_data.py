"""``ablate bench data`` and ``ablate bench cache`` on a tiny synthetic set."""

import json

import pytest
from typer.testing import CliRunner

from ablate.bench_data import bench_cache, bench_config, bench_data
from ablate.cli import app
from ablate.config import TrialConfig
from ablate.data.synth import generate_synthetic


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchdata")
    generate_synthetic(root / "s", num_train=40, num_val=4, image_size=64, seed=0)
    path = root / "trial.yaml"
    path.write_text(f"preset: yolov3\nmodel: {{width: 0.25, depth: 0.33}}\nthreads: 1\n"
                    f"data: {{synthetic: {{root: {root / 's'}, train: 40, val: 4, size: 64}}, image_size: 64, "
                    f"cache_dir: {root / 'cache'}}}\ntrain: {{batch_size: 4}}\n")
    return path


def _config(path) -> TrialConfig:
    from ablate.config import load_trial_config

    return load_trial_config(path)


def test_bench_data_rows_and_ratios(config_file):
    rows = bench_data(_config(config_file), [64], [0, 1], ["none", "disk", "auto"], batches=2, repeats=2)
    assert [(r.cache, r.workers) for r in rows] == [(c, w) for c in ("none", "disk", "auto") for w in (0, 1)]
    assert {r.cache_used for r in rows if r.cache == "auto"} == {"disk"}  # a small set
    for r in rows:
        assert r.images_per_second > 0 and r.model_images_per_second > 0 and r.size == 64
        assert r.ratio == pytest.approx(r.images_per_second / r.model_images_per_second, rel=1.0)  # per-repeat medians
    assert len({r.model_images_per_second for r in rows}) == 1  # one model rate, shared by the candidates of a size


def test_bench_config_uses_a_jpeg_set_at_other_sizes(config_file):
    base = _config(config_file)
    assert bench_config(base, 64, 16) == base
    other = bench_config(base, 96, 16)
    s = other.data.synthetic
    assert (other.data.image_size, s.size, s.format, s.train) == (96, 96, "jpeg", 16)
    assert other.data.cache_dir == base.data.cache_dir and other.preset == base.preset


def test_bench_data_cli(config_file, tmp_path):
    out = tmp_path / "d.json"
    r = CliRunner().invoke(app, ["bench", "data", "--config", str(config_file), "--size", "64", "--workers", "0",
                                 "--cache", "memory", "--batches", "2", "--repeats", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "loader / model" in r.output and "goal at 64 px, 0 worker(s) (the trial's)" in r.output
    data = json.loads(out.read_text())
    assert data["trial_workers"] == 0 and data["rows"][0]["cache"] == "memory"


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "a,b"], "--workers: expected comma-separated integers"),
    (["--workers", "-1"], "--workers: expected comma-separated integers >= 0"),
    (["--size", "100"], "--size: 100 is not a multiple of 32"),
    (["--cache", "ram"], "--cache: unknown cache mode 'ram'"),
    (["--batches", "0"], "--batches: must be >= 1"),
    (["--device", "tpu"], "--device: expected cpu, cuda or auto"),
])
def test_bench_data_cli_refuses_bad_options(config_file, args, message):
    r = CliRunner().invoke(app, ["bench", "data", "--config", str(config_file), *args])
    assert r.exit_code != 0 and message in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_bench_cache_shares_the_disk_cache_between_processes(tmp_path):
    """Two processes reading the same set: with ``memory`` each holds its own copy; with ``disk`` they
    share the mapped file, so the summed PSS grows by about one copy, not two."""
    generate_synthetic(tmp_path / "s", num_train=300, num_val=2, image_size=128, seed=0)
    base = TrialConfig.model_validate({"threads": 1, "data": {
        "synthetic": {"root": str(tmp_path / "s"), "train": 300, "val": 2, "size": 128}, "image_size": 128,
        "cache_dir": str(tmp_path / "cache")}})
    rows = {r.cache: r for r in bench_cache(base, [2], ["memory", "disk"])}
    copy_mib = 300 * 3 * 128 * 128 / 2**20  # 14 MiB of pixels
    assert rows["memory"].pss_growth_mib > 1.6 * copy_mib  # two private copies
    assert rows["disk"].pss_growth_mib < 1.4 * copy_mib  # one shared copy (plus noise)
    assert rows["disk"].rss_growth_mib > 1.6 * copy_mib  # RSS counts the shared pages in each process
