"""Job files: schema, expansion (variants x grid x seeds), trial hashes, the safe loader, one-line errors.

No training: everything here reads YAML and builds configs.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from ablate.detect.recipe import preset
from ablate.spec import JobSpec, SpecError, Trial, dataset_fingerprint, load_job_spec, trial_hash

JOBS = Path(__file__).resolve().parent.parent / "jobs"

HEAD = """\
name: t
dataset:
  synthetic: {root: ROOT, train: 10, val: 5, size: 64, seed: 0}
  image_size: 64
"""


def write(tmp_path: Path, body: str, head: str = HEAD, name: str = "job.yaml") -> Path:
    """``head`` + ``body`` (dedented) as a job file; ROOT becomes a synthetic root under tmp_path."""
    path = tmp_path / name
    path.write_text((head + textwrap.dedent(body)).replace("ROOT", str(tmp_path / "synth")))
    return path


def load(tmp_path: Path, body: str = "", **kw) -> JobSpec:
    return load_job_spec(write(tmp_path, body), **kw)


# --------------------------------------------------------------------------- expansion
def test_nothing_varied_is_one_base_variant(tmp_path):
    spec = load(tmp_path)
    assert spec.variant_names() == ["base"] and spec.baseline_variant == "base"
    [t] = spec.trials()
    assert (t.job, t.variant, t.seed, t.key, t.overrides) == ("t", "base", 0, "base/0", {})
    assert t.config.name == "t/base/0" and t.config.data == spec.dataset


def test_variants_in_file_order_then_seeds(tmp_path):
    spec = load(tmp_path, """\
        variants:
          zeta: {recipe.box_loss: ciou}
          alpha: {recipe: {box_loss: giou}, train.lr: 0.01}
          plain:
        seeds: 2
        """)
    assert spec.variant_names() == ["zeta", "alpha", "plain"] and spec.seeds == [0, 1]
    assert [t.key for t in spec.trials()] == ["zeta/0", "zeta/1", "alpha/0", "alpha/1", "plain/0", "plain/1"]
    assert spec.baseline is None and spec.baseline_variant == "zeta"
    alpha = spec.trials()[2]
    assert alpha.overrides == {"recipe.box_loss": "giou", "train.lr": 0.01} == spec.variant_overrides("alpha")
    assert alpha.config.loss_recipe().box_loss == "giou" and alpha.config.train.lr == 0.01
    assert alpha.config.name == "t/alpha/0" and alpha.seed == 0 and alpha.config.seed == 0
    assert spec.variant_overrides("plain") == {}
    with pytest.raises(KeyError, match="zeta, alpha, plain"):
        spec.variant_overrides("nope")


def test_grid_only_is_a_named_product(tmp_path):
    spec = load(tmp_path, """\
        grid:
          recipe.box_loss: [giou, ciou]
          recipe.ignore_thresh: [0.5, null]
        seeds: [7]
        """)
    assert spec.variant_names() == ["box_loss=giou,ignore_thresh=0.5", "box_loss=giou,ignore_thresh=none",
                                    "box_loss=ciou,ignore_thresh=0.5", "box_loss=ciou,ignore_thresh=none"]
    t = spec.trials()[1]
    assert t.overrides == {"recipe.box_loss": "giou", "recipe.ignore_thresh": None} and t.seed == 7
    assert t.config.loss_recipe().ignore_thresh is None


def test_variants_times_grid_times_seeds(tmp_path):
    spec = load(tmp_path, """\
        variants:
          a: {recipe.box_loss: ciou}
          b: {model.width: 0.5}
        grid: {recipe.lambda_noobj: [0.5, 1.0]}
        seeds: [3, 1]
        baseline: b+lambda_noobj=1.0
        """)
    assert spec.variant_names() == ["a+lambda_noobj=0.5", "a+lambda_noobj=1.0", "b+lambda_noobj=0.5",
                                    "b+lambda_noobj=1.0"]
    trials = spec.trials()
    assert len(trials) == 8 and [t.seed for t in trials[:2]] == [3, 1]
    assert trials[0].overrides == {"recipe.box_loss": "ciou", "recipe.lambda_noobj": 0.5}
    assert trials[6].config.model.width == 0.5 and trials[6].config.loss_recipe().lambda_noobj == 1.0
    assert spec.baseline_variant == "b+lambda_noobj=1.0"


def test_variant_preset_keeps_the_base_recipe_overrides(tmp_path):
    """recipe = preset(variant's preset) + base.recipe + variant's recipe."""
    spec = load(tmp_path, """\
        base: {preset: yolov3, recipe: {ignore_thresh: 0.5, lambda_noobj: 2}}
        variants:
          v4: {preset: yolov4, recipe.box_loss: giou}
        """)
    [t] = spec.trials()
    assert t.config.loss_recipe() == preset("yolov4").override(ignore_thresh=0.5, lambda_noobj=2.0, box_loss="giou")


def test_data_augmentation_may_vary_per_variant(tmp_path):
    spec = load(tmp_path, "variants: {noflip: {data.hflip: 0.0}, flip: {}}\n")
    a, b = spec.trials()
    assert a.config.data.hflip == 0.0 and b.config.data.hflip == 0.5
    assert a.config.data.synthetic == b.config.data.synthetic == spec.dataset.synthetic
    assert a.hash != b.hash


def test_exponent_floats_and_trials_are_hashable(tmp_path):
    """``1e-3`` is a float here (YAML 1.1 would read a string); trials are frozen and hashable."""
    spec = load(tmp_path, "base: {train: {lr: 3e-3}}\nvariants: {a: {recipe.lambda_noobj: 5e-1}}\n")
    [t] = spec.trials()
    assert t.config.train.lr == 0.003 and t.config.loss_recipe().lambda_noobj == 0.5
    assert isinstance(t, Trial) and len({t, t}) == 1
    with pytest.raises(Exception):
        t.seed = 3  # type: ignore[misc]
    with pytest.raises(Exception):
        spec.seeds = [1]  # type: ignore[misc]


# --------------------------------------------------------------------------- hashes
def test_same_variant_and_seed_in_another_job_has_the_same_hash(tmp_path):
    a = load_job_spec(write(tmp_path, """\
        base: {threads: 1}
        variants: {ciou: {recipe.box_loss: ciou}, mse: {}}
        seeds: 2
        """, name="a.yaml"))
    other_head = HEAD.replace("name: t", "name: other").replace("ROOT", "ROOT2")
    b = load_job_spec(write(tmp_path, """\
        base: {threads: 2, device: cpu, recipe: {box_loss: ciou}}
        variants: {the_ciou: {}, giou: {recipe.box_loss: giou}}
        seeds: [1, 0]
        """, head=other_head, name="b.yaml"))
    ha = {t.key: t.hash for t in a.trials()}
    hb = {t.key: t.hash for t in b.trials()}
    # name, threads, device and the data's directory are not in the hash; where ciou is set is irrelevant
    assert ha["ciou/0"] == hb["the_ciou/0"] and ha["ciou/1"] == hb["the_ciou/1"]
    assert len(set(ha.values())) == 4  # seeds and overrides give different hashes
    assert hb["giou/0"] not in ha.values()
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in ha.values())


def test_a_different_dataset_gives_a_different_hash(tmp_path):
    a = load(tmp_path)
    b = load_job_spec(write(tmp_path, "", head=HEAD.replace("seed: 0}", "seed: 1}"), name="b.yaml"))
    c = load_job_spec(write(tmp_path, "", head=HEAD.replace("image_size: 64", "image_size: 96"), name="c.yaml"))
    assert dataset_fingerprint(a.dataset) != dataset_fingerprint(b.dataset)
    assert dataset_fingerprint(a.dataset) == dataset_fingerprint(c.dataset)  # image size: augmentation, not identity
    assert len({a.trials()[0].hash, b.trials()[0].hash, c.trials()[0].hash}) == 3
    cfg = a.trials()[0].config
    assert trial_hash(cfg, "x" * 64) != trial_hash(cfg, "y" * 64)
    assert trial_hash(cfg.model_copy(update={"name": "n", "threads": 3}), "x" * 64) == trial_hash(cfg, "x" * 64)


def test_other_code_gives_another_hash(tmp_path, monkeypatch):
    """The code fingerprint is in the hash: a trial is reused only by identical code."""
    import ablate.fingerprint

    cfg = load(tmp_path).trials()[0].config
    assert trial_hash(cfg, "x" * 64) == trial_hash(cfg, "x" * 64, code=ablate.fingerprint.code_fingerprint())
    assert trial_hash(cfg, "x" * 64, code="a" * 64) != trial_hash(cfg, "x" * 64, code="b" * 64)
    before = load(tmp_path).trials()[0].hash
    monkeypatch.setattr(ablate.fingerprint, "code_fingerprint", lambda: "0" * 64)
    assert load(tmp_path).trials()[0].hash != before


def test_code_fingerprint_covers_the_result_code_and_libraries(tmp_path):
    """Bytes of the detector core, data, training, evaluation and config modules and the library
    versions count; the job machinery, reports and line endings do not."""
    import shutil

    from ablate import fingerprint

    pkg = tmp_path / "ablate"
    shutil.copytree(Path(fingerprint.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    versions = {"torch": "2.0", "torchvision": "0.15", "numpy": "2.0", "pycocotools": "2.0"}
    base = fingerprint.code_fingerprint_of(pkg, versions)
    assert fingerprint.code_fingerprint() == fingerprint.code_fingerprint_of(
        Path(fingerprint.__file__).parent, fingerprint.library_versions())
    assert set(fingerprint.library_versions()) == {"torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval"}
    for rel in ("report.py", "runner.py", "spec.py", "store/store.py", "cli.py"):  # not what a trial computes
        (pkg / rel).write_text((pkg / rel).read_text() + "\n# edited\n")
    assert fingerprint.code_fingerprint_of(pkg, versions) == base
    losses = pkg / "detect" / "losses.py"
    losses.write_bytes(losses.read_bytes().replace(b"\n", b"\r\n"))  # a Windows checkout: the same code
    assert fingerprint.code_fingerprint_of(pkg, versions) == base
    seen = {base}
    for rel in ("detect/losses.py", "data/transforms.py", "train.py", "evaluate.py", "config.py"):
        (pkg / rel).write_text((pkg / rel).read_text() + "\n# edited\n")
        fp = fingerprint.code_fingerprint_of(pkg, versions)
        assert fp not in seen, rel
        seen.add(fp)
    (pkg / "detect" / "new_loss.py").write_text("x = 1\n")  # a new module of the core counts too
    assert fingerprint.code_fingerprint_of(pkg, versions) not in seen
    for lib in versions:
        assert fingerprint.code_fingerprint_of(pkg, {**versions, lib: "9.9"}) != fingerprint.code_fingerprint_of(
            pkg, versions), lib


def coco_head(root: Path) -> str:
    """A COCO-format dataset under ``root`` (annotation files and image directories exist)."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(exist_ok=True)
    (root / "val" / "1.jpg").write_bytes(b"\xff\xd8")
    for split in ("train", "val"):
        (root / f"{split}.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return textwrap.dedent(f"""\
        name: c
        dataset:
          coco: {{train_ann: {root}/train.json, train_images: {root}/train, val_ann: {root}/val.json,
                 val_images: {root}/val}}
        """)


def test_coco_fingerprint_follows_the_files_not_their_place(tmp_path):
    a = load_job_spec(write(tmp_path, "", head=coco_head(tmp_path / "a"), name="a.yaml"))
    b = load_job_spec(write(tmp_path, "", head=coco_head(tmp_path / "b"), name="b.yaml"))
    assert dataset_fingerprint(a.dataset) == dataset_fingerprint(b.dataset)
    assert a.trials()[0].hash == b.trials()[0].hash
    (tmp_path / "b" / "val" / "2.jpg").write_bytes(b"\xff\xd8\x00")
    assert dataset_fingerprint(a.dataset) != dataset_fingerprint(b.dataset)


# --------------------------------------------------------------------------- loader
def test_command_line_tracking_and_store_replace_the_file(tmp_path):
    body = "tracking: {uri: http://mlflow:5000, experiment: exp}\nstore: postgresql+psycopg://u@h/db\n"
    spec = load(tmp_path, body)
    assert (spec.tracking.uri, spec.tracking.experiment, spec.store) == (
        "http://mlflow:5000", "exp", "postgresql+psycopg://u@h/db")
    assert spec.experiment_name == "exp"
    spec = load(tmp_path, body, tracking_uri="sqlite:///x.db", store="sqlite:///y.db")
    assert (spec.tracking.uri, spec.tracking.experiment, spec.store) == ("sqlite:///x.db", "exp", "sqlite:///y.db")
    spec = load(tmp_path, "", tracking_uri="file:./mlruns")
    assert spec.tracking.uri == "file:./mlruns" and spec.store == "sqlite:///ablate.db"
    assert spec.tracking.experiment is None and spec.experiment_name == "t"


def test_safe_loader_refuses_python_tags_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    for body in (f'description: !!python/object/apply:os.system ["touch {marker}"]\n',
                 "description: !!python/name:os.system\n",
                 f'variants: {{a: !!python/object/apply:subprocess.call [["touch", "{marker}"]]}}\n'):
        with pytest.raises(SpecError) as e:
            load(tmp_path, body)
        msg = str(e.value)
        assert "is not allowed (safe YAML only)" in msg and "!!python/" in msg and "\n" not in msg
        assert "line " in msg
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_job_spec(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- malformed jobs
BAD = [
    ("unknown top-level key", "epochs: 3\n",
     ["epochs: unknown key; valid keys: name, description, dataset, base, variants, grid, seeds"]),
    ("unknown nested key", "resources: {gpu: 1}\n", ["resources.gpu: unknown key; valid keys: cpus, gpus"]),
    ("wrong type", "max_concurrent: two\n", ["max_concurrent: Input should be a valid integer"]),
    ("max_concurrent zero", "max_concurrent: 0\n", ["max_concurrent: Input should be greater than or equal to 1"]),
    ("unknown preset", "base: {preset: yolov9}\n",
     ["base.preset: unknown preset 'yolov9'; choose one of yolov1, yolov2, yolov3, yolov4, scaled_yolov4, "
      "ssd, retinanet"]),
    ("unknown variant preset", "variants: {a: {preset: yolo}}\n",
     ["variants.a.preset: unknown preset 'yolo'; choose one of"]),
    ("unknown class loss", "variants: {focal: {recipe: {cls_loss: focall}}}\n",
     ["variants.focal.recipe.cls_loss: unknown value 'focall'; choose one of bce, ce, focal, sse"]),
    ("unknown assigner", "variants: {a: {recipe.assigner: hungarian}}\n",
     ["variants.a.recipe.assigner: unknown value 'hungarian'; choose one of best_anchor, max_iou, wh_ratio, yolov1"]),
    ("unknown coding in base", "base: {recipe: {coding: yolo9}}\n",
     ["base.recipe.coding: unknown value 'yolo9'; choose one of yolo, scaled_yolo, delta, yolov1"]),
    ("unknown recipe field", "variants: {a: {recipe.box_los: ciou}}\n",
     ["variants.a.recipe.box_los: unknown recipe field; choose one of", "box_loss"]),
    ("neg_iou above pos_iou", "variants: {band: {recipe: {assigner: max_iou, neg_iou: 0.6, pos_iou: 0.5}}}\n",
     ["variants.band.recipe.neg_iou:", "must be <= pos_iou (0.5)"]),
    ("negative focal gamma in grid", "grid: {recipe.focal_gamma: [2, -1]}\n",
     ["grid.recipe.focal_gamma: must be >= 0, got -1.0", "focal_gamma=-1"]),
    ("preset change breaks base recipe", "base: {recipe: {assigner: wh_ratio}}\nvariants: {v1: {preset: yolov1}}\n",
     ["variants.v1.recipe.assigner: wh_ratio matches by anchor shape"]),
    ("unknown nested key in variant", "variants: {a: {train: {lrr: 1}}}\n",
     ["variants.a.train.lrr: unknown key; valid keys: epochs, batch_size"]),
    ("unknown override head", "variants: {a: {lr: 0.1}}\n",
     ["variants.a.lr: unknown key; valid keys: preset, recipe, model, data, train, threads, device"]),
    ("wrong type in variant", "variants: {a: {model.width: wide}}\n",
     ["variants.a.model.width: Input should be a valid number"]),
    ("seed per variant", "variants: {a: {seed: 3}}\n", ["variants.a.seed: cannot be overridden per variant"]),
    ("name per variant", "variants: {a: {name: x}}\n", ["variants.a.name: cannot be overridden per variant"]),
    ("dataset per variant", "variants: {a: {data: {synthetic: {train: 5}}}}\n",
     ["variants.a.data.synthetic.train: the dataset cannot change per variant"]),
    ("key given twice", "variants: {a: {recipe.box_loss: ciou, recipe: {box_loss: giou}}}\n",
     ["variants.a.recipe.box_loss: given twice"]),
    ("grid and variant set one field", "variants: {a: {recipe.box_loss: ciou}}\ngrid: {recipe.box_loss: [giou]}\n",
     ["grid.recipe.box_loss: also set by variants.a"]),
    ("duplicate variant names", "variants:\n  a: {}\n  b: {}\n  a: {recipe.box_loss: ciou}\n",
     ["line 8: duplicate key 'a'"]),
    ("duplicate grid values", "grid: {recipe.ignore_thresh: [0.5, 0.5]}\n",
     ["grid.recipe.ignore_thresh: duplicate value 0.5"]),
    ("baseline not a variant", "variants: {a: {}, b: {}}\nbaseline: zz\n",
     ["baseline: 'zz' is not a variant; choose one of a, b"]),
    ("empty seeds", "seeds: []\n", ["seeds: must not be empty"]),
    ("duplicate seeds", "seeds: [0, 1, 0]\n", ["seeds: duplicate seed 0"]),
    ("zero seed count", "seeds: 0\n", ["seeds: a seed count must be >= 1"]),
    ("grid value not a list", "grid: {recipe.box_loss: giou}\n",
     ["grid.recipe.box_loss: Input should be a valid list"]),
    ("grid value empty", "grid: {recipe.box_loss: []}\n",
     ["grid.recipe.box_loss: expected a non-empty list of values"]),
    ("variant not a mapping", "variants: {a: ciou}\n", ["variants.a: Input should be a valid dictionary"]),
    ("bad job name", "", ["name: 'my job' must be 1-64 characters of A-Z a-z 0-9 _ . -"]),
    ("variant name with slash", "variants: {a/b: {}}\n", ["variants.a/b: a variant name must be"]),
    ("fractional GPUs above one", "resources: {gpus: 1.5}\n",
     ["resources.gpus: a share above one GPU must be a whole number"]),
    ("store not a URL", "store: ablate.db\n", ["store: 'ablate.db' is not a SQLAlchemy URL"]),
    ("no data source", "", ["dataset: give exactly one of data.synthetic or data.coco"]),
    ("image size", "", ["dataset: image_size must be a multiple of 32, got 100"]),
    ("non-mapping document", "", ["expected a mapping at the top level, got list"]),
    ("empty document", "", ["empty document"]),
    ("invalid YAML", "", ["line 3: not valid YAML"]),
    ("python tag", 'description: !!python/object/apply:os.system ["echo hi"]\n',
     ["line 5: tag '!!python/object/apply:os.system' is not allowed (safe YAML only)"]),
]
HEADS = {  # cases whose problem is in the head
    "bad job name": HEAD.replace("name: t", "name: my job"),
    "no data source": "name: t\ndataset: {image_size: 64}\n",
    "image size": HEAD.replace("image_size: 64", "image_size: 100"),
    "non-mapping document": "- name: t\n- dataset: {}\n",
    "empty document": "# nothing\n",
    "invalid YAML": "name: t\ndataset: {synthetic: {}\nseeds: [1, 2\n",
}


@pytest.mark.parametrize("case, body, expected", BAD, ids=[c[0] for c in BAD])
def test_malformed_job_is_one_line_naming_the_field(tmp_path, case, body, expected):
    path = write(tmp_path, body, head=HEADS.get(case, HEAD))
    with pytest.raises(SpecError) as e:
        load_job_spec(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for part in expected:
        assert part in msg, msg


def test_missing_coco_path_names_the_field(tmp_path):
    head = coco_head(tmp_path / "coco")
    (tmp_path / "coco" / "val.json").unlink()
    with pytest.raises(SpecError) as e:
        load_job_spec(write(tmp_path, "", head=head))
    assert f"dataset.coco.val_ann: no such file: {tmp_path}/coco/val.json" in str(e.value)
    head = coco_head(tmp_path / "coco2")
    (tmp_path / "coco2" / "train").rmdir()
    with pytest.raises(SpecError, match="dataset.coco.train_images: no such directory"):
        load_job_spec(write(tmp_path, "", head=head))


# --------------------------------------------------------------------------- the shipped jobs
SHIPPED = {  # file -> (variants, trials, baseline)
    "quickstart.yaml": (2, 4, "yolov3"),
    "box_losses.yaml": (5, 15, "mse"),
    "assigner_thresholds.yaml": (10, 30, "best_anchor_ignore_0.7+lambda_noobj=1.0"),
    "cls_losses.yaml": (8, 24, "dense+focal_gamma=0,focal_alpha=none"),
    "seed_systems.yaml": (7, 21, "yolov3"),
    "cluster_smoke.yaml": (2, 4, "mse"),
}


def test_every_job_file_is_listed_here():
    assert {p.name for p in JOBS.glob("*.yaml")} == set(SHIPPED) | {"coco.yaml"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_jobs_load_and_expand(name):
    path = JOBS / name
    assert path.read_text().startswith("#")  # each file opens with what it ablates and how long it takes
    spec = load_job_spec(path)
    variants, trials, baseline = SHIPPED[name]
    assert len(spec.variant_names()) == variants and len(spec.trials()) == trials
    assert spec.baseline_variant == baseline
    assert len({t.hash for t in spec.trials()}) == trials  # no two trials of a job are the same


def test_shipped_jobs_say_what_they_claim():
    q = load_job_spec(JOBS / "quickstart.yaml")
    assert [t.config.loss_recipe() for t in q.trials()] == [preset("yolov3")] * 2 + [preset("scaled_yolov4")] * 2
    assert q.dataset.hue == 0.0 and q.max_concurrent == 2 and q.resources.cpus == 1
    s = load_job_spec(JOBS / "seed_systems.yaml")
    assert [t.config.loss_recipe() for t in s.trials()[::3]] == [preset(n) for n in s.variant_names()]
    c = load_job_spec(JOBS / "cls_losses.yaml")
    bce = c.trials()[0].config.loss_recipe()
    assert (bce.cls_loss, bce.focal_gamma, bce.focal_alpha, bce.neg_mining) == ("focal", 0.0, None, "none")


def test_coco_job_needs_the_dataset():
    with pytest.raises(SpecError) as e:
        load_job_spec(JOBS / "coco.yaml")
    msg = str(e.value)
    assert msg.endswith("dataset.coco.train_ann: no such file: /datasets/coco/annotations/instances_train2017.json")
    assert "\n" not in msg


def test_a_stored_spec_round_trips(tmp_path):
    """The recorder stores ``model_dump_json()``; validating it again gives the same trials and hashes."""
    spec = load_job_spec(JOBS / "cls_losses.yaml")
    again = JobSpec.model_validate_json(spec.model_dump_json())
    key = [(t.key, t.hash, t.overrides) for t in spec.trials()]
    assert [(t.key, t.hash, t.overrides) for t in again.trials()] == key


@pytest.mark.parametrize("case, body, expected", BAD, ids=[c[0] for c in BAD])
def test_submit_refuses_malformed_job_and_writes_nothing(tmp_path, monkeypatch, case, body, expected):
    """Through the CLI: exit 2, one line on stderr, no store, no MLflow database, no data."""
    from typer.testing import CliRunner

    from ablate.cli import app

    path = write(tmp_path, body, head=HEADS.get(case, HEAD))
    monkeypatch.chdir(tmp_path)  # the default store and tracking URIs are relative to here
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["submit", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected[0] in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no ablate.db, mlflow.db, mlruns, synth
