"""train(config, report): resume equals an uninterrupted run, divergence is a result, the CLI."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from ablate.cli import app
from ablate.config import ConfigError, TrialConfig, load_trial_config
from ablate.detect.criterion import Criterion
from ablate.train import train


def tiny_config(root, **train_kw) -> TrialConfig:
    train_cfg = {"epochs": 2, "batch_size": 8, "eval_every": 1, "log_every": 1, "warmup_epochs": 0.5, **train_kw}
    return TrialConfig.model_validate({
        "name": "tiny",
        "preset": "yolov3",
        "model": {"width": 0.125, "depth": 0.33},
        "data": {"synthetic": {"root": str(root), "train": 24, "val": 8, "size": 64, "seed": 3}, "image_size": 64},
        "train": train_cfg,
    })


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth64")


def _run(config, out_dir=None, **kw):
    events = []
    result = train(config, events.append, out_dir=out_dir, **kw)
    return result, events


def test_reports_train_and_eval_events(synth_root):
    result, events = _run(tiny_config(synth_root))
    assert result["status"] == "finished" and result["epoch"] == 2
    kinds = [e["kind"] for e in events]
    assert kinds.count("eval") == 2
    assert [e["epoch"] for e in events if e["kind"] == "epoch"] == [1, 2]
    assert kinds[-1] == "epoch"  # the epoch event comes after that epoch's evaluation
    tr = next(e for e in events if e["kind"] == "train")
    for key in ("lr", "grad_norm", "loss/box", "loss/obj", "loss/noobj", "loss/cls", "weighted/box",
                "stat/num_pos", "stat/pos_per_gt", "stat/ignored_per_image"):
        assert key in tr and math.isfinite(tr[key]), key
    ev = [e for e in events if e["kind"] == "eval"][-1]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
                "per_class_AP", "infer_ms_per_image"):
        assert key in ev
    assert len(ev["per_class_AP"]) >= 5
    assert result["images_per_second"] > 0
    # yolov3 fits its anchors to the training boxes (k-means), and reports them
    from ablate.detect import build_priors, fit_anchors, get_layout
    from ablate.train import build_data

    train_set, _ = build_data(tiny_config(synth_root))
    fitted = fit_anchors(get_layout("yolov3"), train_set.box_sizes())
    assert result["anchors"] == [[[round(w, 2), round(h, 2)] for w, h in lv.anchors] for lv in fitted.levels]
    published = build_priors(get_layout("yolov3"), 64).anchor_wh.view(3, 3, 2)  # COCO's, scaled to 64 px
    assert not torch.allclose(torch.tensor(result["anchors"]), published, atol=0.5)


def test_same_seed_same_run_different_seed_differs(synth_root):
    a, ea = _run(tiny_config(synth_root, epochs=1))
    b, eb = _run(tiny_config(synth_root, epochs=1))
    assert [e.get("loss/total") for e in ea] == [e.get("loss/total") for e in eb]
    c, ec = _run(tiny_config(synth_root, epochs=1).model_copy(update={"seed": 1}))
    assert [e.get("loss/total") for e in ea] != [e.get("loss/total") for e in ec]


def test_resume_gives_the_same_final_metrics(synth_root, tmp_path):
    config = tiny_config(synth_root, epochs=3)
    full, full_events = _run(config, out_dir=tmp_path / "full")
    first, _ = _run(config, out_dir=tmp_path / "split", stop_after_epoch=1)
    assert first["status"] == "stopped" and first["epoch"] == 1
    assert (tmp_path / "split" / "checkpoint.pt").exists()
    resumed, resumed_events = _run(config, out_dir=tmp_path / "split")
    assert resumed["status"] == "finished" and resumed["epoch"] == 3
    for key in ("AP", "AP50", "AR100", "step"):
        assert resumed[key] == full[key] or (math.isnan(resumed[key]) and math.isnan(full[key])), key
    last = lambda evs: [e["loss/total"] for e in evs if e["kind"] == "train"][-3:]  # noqa: E731
    assert last(resumed_events) == last(full_events)


def test_nan_loss_ends_as_diverged(synth_root, monkeypatch):
    calls = {"n": 0}
    original = Criterion.__call__

    def poisoned(self, pred, targets):
        out = original(self, pred, targets)
        calls["n"] += 1
        if calls["n"] == 3:
            out.losses["box"] = out.losses["box"] * float("nan")
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(Criterion, "__call__", poisoned)
    result, _ = _run(tiny_config(synth_root))
    assert result["status"] == "diverged"
    assert result["diverged_at"]["step"] == 2  # two optimizer steps were taken before
    assert math.isnan(result["diverged_at"]["losses"]["box"])


@pytest.mark.parametrize(
    "content,message",
    [
        ("preset: yolov9\n", "preset: unknown preset 'yolov9'"),
        ("recipe: {box_loss: l3}\n", "recipe.box_loss: unknown value 'l3'"),
        ("train: {epochs: 0}\n", "train.epochs: Input should be greater than or equal to 1"),
        ("train: {epoch: 3}\n", "train.epoch: Extra inputs are not permitted"),
        ("data: {image_size: 100, synthetic: {}}\n", "image_size must be a multiple of 32"),
        ("data: {image_size: 128}\n", "give exactly one of data.synthetic or data.coco"),
        ("- a\n- b\n", "expected a mapping"),
        ("preset: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_trial_configs_one_line(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_trial_config(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_cli_train_writes_metrics_jsonl(synth_root, tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps(tiny_config(synth_root, epochs=1).model_dump(mode="json")))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in lines} == {"train", "eval", "epoch"}
    assert json.loads((out / "final.json").read_text())["status"] == "finished"
    assert "AP50" in result.output


@pytest.mark.slow
def test_bench_train_reports_each_preset(synth_root, tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps(tiny_config(synth_root, epochs=1).model_dump(mode="json")))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "train", "--config", str(cfg), "--presets", "yolov3,retinanet",
                                      "--parallel", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["preset"] for r in rows] == ["yolov3", "retinanet"]
    assert all(r["status"] == "finished" and r["images_per_second"] > 0 and 0 <= r["AP50"] <= 1 for r in rows)
    bad = CliRunner().invoke(app, ["bench", "train", "--config", str(cfg), "--presets", "yolov9"])
    assert bad.exit_code == 2 and "unknown preset 'yolov9'" in bad.output


def test_bench_goal_line():
    from ablate.bench import TrainBenchRow, goal_line

    row = lambda **kw: TrainBenchRow(**{"preset": "yolov3", "status": "finished", "AP50": 0.6, "AP": 0.3,  # noqa: E731
                                        "train_seconds": 250.0, "images_per_second": 30.0, "epochs": 7, **kw})
    assert goal_line([row()], 1, 1).endswith(": met")
    slow = goal_line([row(train_seconds=301.0)], 1, 1)
    assert "301 s <= 300 s of training NO" in slow and slow.endswith("NOT met")
    assert "AP 0.200 >= 0.25 NO" in goal_line([row(AP=0.2)], 1, 1)
    assert goal_line([row(status="diverged")], 1, 1).endswith("NOT met")
    assert "one core" in goal_line([row()], 2, 1) and "pessimistic" in goal_line([row()], 1, 2)
    assert goal_line([row(preset="ssd")], 1, 1) is None


# --------------------------------------------------------------------------- resume guard (issue 11)
def test_resume_refuses_a_checkpoint_of_another_config_or_code(synth_root, tmp_path, monkeypatch):
    """`ablate train` into a folder whose checkpoint another config or other code wrote is refused in
    one line naming the differing fields and `--no-resume`; nothing in the folder is touched; the
    Ray worker gets the same guard; `--no-resume` starts over with a fresh metrics.jsonl."""
    import ablate.fingerprint
    from ablate.train import CHECKPOINT, CheckpointMismatch, resume_state

    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps(tiny_config(synth_root, epochs=1).model_dump(mode="json")))
    out = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(cfg), "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    for sets, names in ((["recipe.box_loss=ciou"], "recipe.box_loss 'mse' -> 'ciou'"),
                        (["preset=ssd"], "preset 'yolov3' -> 'ssd'"),
                        (["train.epochs=3", "recipe.box_loss=giou"], "train.epochs 1 -> 3")):
        r = runner.invoke(app, ["train", str(cfg), "--out", str(out), *[x for s in sets for x in ("--set", s)]])
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and "load_state_dict" not in r.output
        msg = " ".join(r.output.split())
        assert "written for another configuration" in msg and names in msg and "--no-resume" in msg, msg
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written

    config = tiny_config(synth_root, epochs=1)
    resume_state(config, out)  # the same config and code: accepted
    # threads, device and the name do not change results: accepted too
    resume_state(config.model_copy(update={"threads": 3, "name": "other", "device": "cpu"}), out)

    # other code (an edited loss, another torch): refused, also for the Ray worker (its own hint)
    monkeypatch.setattr(ablate.fingerprint, "code_fingerprint", lambda: "f" * 64)
    with pytest.raises(CheckpointMismatch, match=r"written by other code .*`--no-resume` starts over"):
        resume_state(config, out)
    import ray

    import ablate.runner as runner_mod

    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "n" * 16})())
    monkeypatch.setattr(runner_mod.tune, "get_checkpoint", lambda: None)
    worker_config = config.model_copy(update={"name": "job1/mse/0"})
    with pytest.raises(CheckpointMismatch, match=r"other code .*ablate submit job1.yaml --force"):
        runner_mod._trainable({"trial": "mse/0"}, {"mse/0": {"config": worker_config.model_dump_json(),
                                                            "resume_from": str(out)}})
    monkeypatch.undo()

    # a checkpoint from before identities: its config and code cannot be checked
    state = torch.load(out / CHECKPOINT, weights_only=False)
    del state["identity"]
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / CHECKPOINT)
    with pytest.raises(CheckpointMismatch, match="without trial identities"):
        resume_state(config, old)

    fresh = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--no-resume", "--set", "recipe.box_loss=ciou"])
    assert fresh.exit_code == 0, fresh.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in lines if e["kind"] == "epoch"] == [1]  # started over: one run's events only
    assert json.loads((out / "config.resolved.json").read_text())["recipe"]["box_loss"] == "ciou"


def test_bench_train_honours_recipe_overrides(synth_root, tmp_path, monkeypatch):
    """`--set recipe.*` (and the config's recipe:) apply over every preset's recipe; one that a preset
    cannot take is refused in one line before anything is generated or trained."""
    import concurrent.futures as cf

    from ablate.bench import bench_train

    submitted = []

    class Inline:  # records what each worker would train, trains nothing
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, config_json):
            submitted.append(TrialConfig.model_validate_json(config_json))
            fut = cf.Future()
            fut.set_result({"preset": submitted[-1].preset, "status": "finished", "train_seconds": 1.0,
                            "images_per_second": 1.0, "epoch": 1, "AP50": 0.5, "AP": 0.25})
            return fut

    monkeypatch.setattr(cf, "ProcessPoolExecutor", Inline)
    base = tiny_config(synth_root, epochs=1).model_copy(update={"recipe": {"box_loss": "ciou"}})
    rows = bench_train(base, ["yolov3", "retinanet", "ssd"])
    assert [r.preset for r in rows] == ["yolov3", "retinanet", "ssd"]
    assert [c.loss_recipe().box_loss for c in submitted] == ["ciou"] * 3
    assert submitted[1].loss_recipe().assigner == "max_iou"  # the rest of each preset's recipe stays

    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps(tiny_config(tmp_path / "never", epochs=1).model_dump(mode="json")))
    bad = CliRunner().invoke(app, ["bench", "train", "--config", str(cfg), "--presets", "yolov3,yolov1",
                                   "--set", "recipe.obj_loss=null"])
    assert bad.exit_code == 2 and "do not fit preset yolov1" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) <= 3  # the banner and one error line (wrapped at most once)
    assert not (tmp_path / "never").exists()  # refused before the data was generated
