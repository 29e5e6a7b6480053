"""Job files: the YAML schema of an ablation, its expansion into trials, and trial hashes.

A job names one dataset, a base trial and the axes it varies::

    name: box_losses                     # [A-Za-z0-9_.-]{1,64}: MLflow experiment and folder name
    dataset: {synthetic: {root: data/synth160}, image_size: 160}     # config.DataConfig
    base: {preset: yolov3, model: {width: 0.25}, train: {epochs: 30}}  # TrialConfig minus name/data/seed
    variants:                            # name -> overrides of the base (dotted or nested keys)
      mse: {}
      ciou: {recipe.box_loss: ciou}      # same as {recipe: {box_loss: ciou}}
    grid: {recipe.ignore_thresh: [0.5, 0.7, null]}   # product, crossed with every variant
    seeds: 3                             # [0, 1, 2]

Override keys address :class:`~ablate.config.TrialConfig` fields: ``preset``,
``recipe.<LossRecipe field>``, ``model.*``, ``train.*``, ``data.hflip`` (and the other
augmentation fields), ``threads``, ``device``. ``name``, ``seed`` and the dataset itself
(``data.synthetic`` / ``data.coco``) are fixed by the job. Overrides are merged over the base
with :func:`ablate.config._merge`, so a variant that changes ``preset`` gets
``recipe = preset(variant's preset) + base.recipe + variant's recipe``: the base's recipe
overrides apply on top of every preset.

Expansion (:meth:`JobSpec.trials`): no variants and no grid -> one variant ``base``; variants
only -> those, in file order; grid only -> the product, named ``box_loss=giou,ignore_thresh=0.5``
(the last component of each key, ``None`` as ``none``); both -> every variant x every grid
point, named ``ciou+ignore_thresh=0.5``. Each variant x each seed is a :class:`Trial`, ordered
variant-major, then by seed.

:func:`load_job_spec` reads a file with a safe YAML loader (duplicate keys and tags refused),
validates the job and every expanded trial, and reports the first problem as a one-line
:class:`SpecError`: ``"<file>: <dotted.field.path>: <message>"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .config import DataConfig, ModelSize, TrainConfig, TrialConfig, _merge
from .detect.recipe import LossRecipe, preset
from . import fingerprint


class SpecError(ValueError):
    """A job file that cannot be used; ``str(e)`` is one line naming the file and the field path."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Frozen):
    """What one trial asks Ray for."""

    cpus: float = Field(1.0, gt=0)  # CPUs per trial
    gpus: float = Field(0.0, ge=0)  # GPUs per trial; fractions (0.25) let several trials share one GPU

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"a share above one GPU must be a whole number, got {v:g}")
        return v


class Tracking(_Frozen):
    """Where the driver records MLflow runs."""

    uri: str = Field("sqlite:///mlflow.db", min_length=1)  # MLflow tracking URI
    experiment: Optional[str] = None  # MLflow experiment name; None: the job's name


class BaseTrial(_Frozen):
    """The trial every variant starts from: :class:`TrialConfig` without name, data and seed."""

    preset: str = "yolov3"  # one of detect.recipe.PRESETS
    recipe: dict[str, Any] = Field(default_factory=dict)  # LossRecipe overrides by field name
    model: ModelSize = ModelSize()
    train: TrainConfig = TrainConfig()
    threads: Optional[int] = Field(None, ge=1)  # torch CPU threads per trial
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        preset(v)  # ValueError listing the presets
        return v


#: TrialConfig fields a variant or grid key may start with.
OVERRIDABLE = ("preset", "recipe", "model", "data", "train", "threads", "device")
_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(LossRecipe))
_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # a dotted field path
_JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VARIANT_NAME = re.compile(r"[^\s/\\]{1,128}")  # a path component of job/variant/seed


@dataclass(frozen=True)
class Trial:
    """One variant with one seed, ready to train."""

    job: str
    variant: str
    seed: int
    config: TrialConfig = dataclasses.field(hash=False)  # name = job/variant/seed, data, seed, overrides applied
    hash: str  # trial_hash(config, dataset_fingerprint(data)) (with the code fingerprint): equal hashes, equal results
    overrides: dict[str, Any] = dataclasses.field(hash=False)  # the variant's flattened dotted overrides

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.seed}"


@dataclass(frozen=True)
class _Variant:
    """An expanded variant: its name, its flat overrides, and where they came from (for error paths)."""

    name: str
    overrides: dict[str, Any]  # {"recipe.box_loss": "ciou", ...}
    where: str  # "base", "variants.<name>" or "grid"
    configs: tuple[TrialConfig, ...]  # one per seed


class JobSpec(_Frozen):
    """A validated job file. Construction validates every expanded trial (ValidationError otherwise).

    Build it with :func:`load_job_spec` or ``model_validate``; ``model_copy(update=...)`` of the
    fields that shape trials would keep the old expansion.
    """

    name: str  # MLflow experiment and folder name
    description: str = ""
    dataset: DataConfig  # one dataset per job
    base: BaseTrial = BaseTrial()
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> overrides of the base
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # dotted field -> values (product)
    seeds: list[int] = [0]  # non-empty, distinct, >= 0; an int n in YAML means [0..n-1]
    baseline: Optional[str] = None  # a variant name; None: the first variant
    resources: Resources = Resources()
    max_concurrent: Optional[int] = Field(None, ge=1)  # trials at once; None: as many as resources allow
    max_failures: int = Field(2, ge=0)  # retries per trial after a crash (not after divergence)
    tracking: Tracking = Tracking()
    store: str = "sqlite:///ablate.db"  # SQLAlchemy URL of the results store

    _variants: tuple[_Variant, ...] = PrivateAttr(default=())
    _trials: Optional[list[Trial]] = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _JOB_NAME.fullmatch(v) or v in (".", ".."):
            raise ValueError(f"{v!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
        return v

    @field_validator("variants", mode="before")
    @classmethod
    def _empty_variants(cls, v: Any) -> Any:
        """``plain:`` with nothing after it is a variant equal to the base."""
        return {k: ({} if o is None else o) for k, o in v.items()} if isinstance(v, dict) else v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"a seed count must be >= 1, got {v}")
            return list(range(v))
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must not be empty")
        for i, s in enumerate(v):
            if s < 0:
                raise ValueError(f"seeds must be >= 0, got {s}")
            if s in v[:i]:
                raise ValueError(f"duplicate seed {s}")
        return v

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError(f"{v!r} is not a SQLAlchemy URL (sqlite:///ablate.db, postgresql+psycopg://user@host/db)")
        return v

    @model_validator(mode="after")
    def _expand(self) -> "JobSpec":
        """Expand variants x grid x seeds into trial configs; every message starts with its field path."""
        base_tree = {**self.base.model_dump(), "data": self.dataset.model_dump()}
        _check_recipe_keys(self.base.recipe, "base.recipe")
        try:
            TrialConfig.model_validate({**base_tree, "name": f"{self.name}/base", "seed": self.seeds[0]})
        except ValidationError as e:
            raise ValueError(_trial_error(e, "base")) from None
        expanded = []
        for v in _variant_axes(self):
            tree = _merge(base_tree, _nest(v.overrides, v.where))
            configs = []
            for seed in self.seeds:
                try:
                    name = f"{self.name}/{v.name}/{seed}"
                    configs.append(TrialConfig.model_validate({**tree, "name": name, "seed": seed}))
                except ValidationError as e:
                    where = "grid" if _grid_key(_error_path(e), self.grid) else v.where
                    suffix = "" if where == f"variants.{v.name}" else f" (in variant {v.name!r})"
                    raise ValueError(_trial_error(e, where) + suffix) from None
            expanded.append(dataclasses.replace(v, configs=tuple(configs)))
        names = [v.name for v in expanded]
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not a variant; choose one of {', '.join(names)}")
        self._variants = tuple(expanded)
        return self

    # ------------------------------------------------------------------ expansion
    def trials(self) -> list[Trial]:
        """Every variant x seed, variant-major; hashes use the dataset and code fingerprints (computed once)."""
        if self._trials is None:
            fp = dataset_fingerprint(self.dataset)
            self._trials = [Trial(self.name, v.name, c.seed, c, trial_hash(c, fp), dict(v.overrides))
                            for v in self._variants for c in v.configs]
        return list(self._trials)

    def variant_names(self) -> list[str]:
        """Expanded variant names in expansion order (``base`` when the job varies nothing)."""
        return [v.name for v in self._variants]

    def variant_overrides(self, name: str) -> dict[str, Any]:
        """The flattened dotted overrides of variant ``name`` relative to the base (grid point included)."""
        for v in self._variants:
            if v.name == name:
                return dict(v.overrides)
        raise KeyError(f"no variant {name!r} in job {self.name!r}; variants: {', '.join(self.variant_names())}")

    @property
    def baseline_variant(self) -> str:
        """``baseline`` or, when not given, the first variant."""
        return self.baseline or self._variants[0].name

    @property
    def experiment_name(self) -> str:
        """``tracking.experiment`` or, when not given, the job's name."""
        return self.tracking.experiment or self.name


# --------------------------------------------------------------------------- overrides
def _flatten(tree: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """``{"recipe": {"box_loss": "ciou"}, "train.lr": 0.01} -> {"recipe.box_loss": "ciou", "train.lr": 0.01}``.

    Empty mappings vanish; a key given both dotted and nested is an error naming ``where.key``.
    """
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        for kk, vv in (_flatten(v, where, key + ".") if isinstance(v, dict) else {key: v}).items():
            if kk in out:
                raise ValueError(f"{where}.{kk}: given twice (as a dotted key and inside a mapping)")
            out[kk] = vv
    return out


def _check_override_keys(flat: dict[str, Any], where: str) -> None:
    """Refuse keys a variant may not set: malformed, unknown, name/seed, the dataset, unknown recipe fields."""
    for key in flat:
        path = f"{where}.{key}"
        if not _KEY.fullmatch(key):
            raise ValueError(f"{path}: not a field path (use dotted names such as recipe.box_loss)")
        parts = key.split(".")
        if parts[0] in ("name", "seed"):
            why = "trials are named job/variant/seed" if parts[0] == "name" else "seeds come from the job's seeds"
            raise ValueError(f"{path}: cannot be overridden per variant; {why}")
        if parts[:2] in (["data", "synthetic"], ["data", "coco"]):
            raise ValueError(f"{path}: the dataset cannot change per variant; one job, one dataset (dataset:)")
        if parts[0] not in OVERRIDABLE:
            raise ValueError(f"{path}: unknown key; valid keys: {', '.join(OVERRIDABLE)}")
        if parts[0] == "recipe" and len(parts) > 1:
            _check_recipe_keys({parts[1]: None}, f"{where}.recipe")


def _check_recipe_keys(recipe: dict[str, Any], where: str) -> None:
    for k in recipe:
        if k not in _RECIPE_FIELDS:
            raise ValueError(f"{where}.{k}: unknown recipe field; choose one of {', '.join(_RECIPE_FIELDS)}")


def _nest(flat: dict[str, Any], where: str) -> dict[str, Any]:
    """``{"recipe.box_loss": "ciou"} -> {"recipe": {"box_loss": "ciou"}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{where}.{key}: conflicts with {where}.{'.'.join(parents[:i + 1])}")
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"{where}.{key}: conflicts with {where}.{key}.*")
        node[leaf] = value
    return out


def _label(value: Any) -> str:
    """A grid value in a variant name: ``None -> none``, ``True -> true``, ``[1, 2] -> [1,2]``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_label(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _variant_axes(spec: JobSpec) -> list[_Variant]:
    """The expanded variants (without configs): variants x grid points, in order, names checked."""
    variants = []
    for name, overrides in spec.variants.items():
        where = f"variants.{name}"
        if not _VARIANT_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"{where}: a variant name must be 1-128 characters without spaces, '/' or '\\'")
        flat = _flatten(overrides, where)
        _check_override_keys(flat, where)
        variants.append(_Variant(name, flat, where, ()))
    for key, values in spec.grid.items():
        _check_override_keys({key: None}, "grid")
        if not values:
            raise ValueError(f"grid.{key}: expected a non-empty list of values")
        labels = [_label(v) for v in values]
        for i, lab in enumerate(labels):
            if lab in labels[:i]:
                raise ValueError(f"grid.{key}: duplicate value {lab}")
    if not spec.grid:
        return variants or [_Variant("base", {}, "base", ())]
    keys = list(spec.grid)
    out = []
    for v in variants or [None]:
        for point in itertools.product(*spec.grid.values()):
            label = ",".join(f"{k.rsplit('.', 1)[-1]}={_label(x)}" for k, x in zip(keys, point))
            for k in keys:
                if v is not None and (k in v.overrides or any(o.startswith(k + ".") or k.startswith(o + ".")
                                                              for o in v.overrides)):
                    raise ValueError(f"grid.{k}: also set by {v.where}; set it in one place")
            name = f"{v.name}+{label}" if v else label
            if not _VARIANT_NAME.fullmatch(name):
                raise ValueError(f"grid: the variant name {name!r} has spaces, '/' or '\\' or is too long")
            out.append(_Variant(name, {**(v.overrides if v else {}), **dict(zip(keys, point))},
                                v.where if v else "grid", ()))
    seen: set[str] = set()
    for v in out:
        if v.name in seen:
            raise ValueError(f"grid: variant name {v.name!r} occurs twice; give the grid keys distinct last components")
        seen.add(v.name)
    return out


def _grid_key(path: str, grid: dict[str, list[Any]]) -> bool:
    return any(path == k or path.startswith(k + ".") for k in grid)


# --------------------------------------------------------------------------- error messages
def _model_at(model: type[BaseModel], loc: list[str]) -> Optional[type[BaseModel]]:
    """The pydantic model reached by following ``loc`` from ``model``; None where a dict or scalar intervenes."""
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return None
        hint = field.annotation
        models = [a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            return None
        model = models[0]
    return model


def _describe(err: dict[str, Any], model: type[BaseModel]) -> tuple[list[str], str]:
    """``(field path, message)`` of one pydantic error; unknown keys list the valid ones."""
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        if parent is not None:
            msg = f"unknown key; valid keys: {', '.join(parent.model_fields)}"
    elif not loc and msg.startswith("recipe."):  # TrialConfig: "recipe.<field>: problem" or "recipe.<field> (...) ..."
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            loc, msg = head.split("."), rest
        else:
            field = re.match(r"recipe\.(\w+)", msg).group(1)  # type: ignore[union-attr]
            loc, msg = ["recipe", field], msg.removeprefix("recipe.")
    return loc, msg


def _error_path(e: ValidationError) -> str:
    return ".".join(_describe(e.errors()[0], TrialConfig)[0])


def _trial_error(e: ValidationError, where: str) -> str:
    """``"<where>.<path>: <message>"`` for the first error of a TrialConfig built from a job."""
    loc, msg = _describe(e.errors()[0], TrialConfig)
    return f"{'.'.join([where, *loc])}: {msg}"


def _spec_error(e: ValidationError, source: str) -> SpecError:
    loc, msg = _describe(e.errors()[0], JobSpec)
    return SpecError(f"{source}: {'.'.join(loc)}: {msg}" if loc else f"{source}: {msg}")


# --------------------------------------------------------------------------- hashing
def dataset_fingerprint(data: DataConfig) -> str:
    """SHA-256 hex of the dataset's identity, not its location or augmentation.

    Synthetic: the generator parameters and ``GENERATOR_VERSION`` (nothing is generated);
    COCO: :func:`ablate.data.coco.fingerprint` of the training and the validation split
    (annotation bytes and image names/sizes; no pixels read).
    """
    from .data.coco import fingerprint
    from .data.synth import GENERATOR_VERSION

    if data.synthetic is not None:
        s = data.synthetic
        ident = {"source": "synthetic", "version": GENERATOR_VERSION, "train": s.train, "val": s.val,
                 "size": s.size, "seed": s.seed}
        if s.format != "png":  # JPEG pixels differ; PNG sets keep the fingerprint they had before formats existed
            ident["format"] = s.format
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    c = data.coco
    assert c is not None  # DataConfig holds exactly one source
    ident = f"coco\0train\0{fingerprint(c.train_ann, c.train_images)}\0val\0{fingerprint(c.val_ann, c.val_images)}"
    return hashlib.sha256(ident.encode()).hexdigest()


#: Resolved-config keys that do not change a trial's results.
NOT_IN_HASH = ("name", "threads", "device")
#: ``data`` keys left out of a trial's identity: the dataset's location (replaced by its fingerprint)
#: and how images reach the model (cache, loader workers, prefetch), which give the same batches
#: (tests/test_data_pipeline.py).
DATA_NOT_IN_HASH = ("synthetic", "coco", "cache", "cache_dir", "workers", "prefetch")

def trial_identity(config: TrialConfig, data_fingerprint: str) -> dict[str, Any]:
    """What determines a trial's results besides the code: the resolved config (recipe expanded)
    without ``name``, ``threads``, ``device``, the dataset's location (``data.synthetic`` /
    ``data.coco``, replaced by ``data.fingerprint``) and how images reach the model (``data.cache``,
    ``cache_dir``, ``workers``, ``prefetch``: they change no batch, so no result) and the COCOeval
    backend (``train.eval_backend``: the backends agree to 1e-4, tests/test_eval_backend.py)."""
    resolved = config.resolved()
    for key in NOT_IN_HASH:
        resolved.pop(key, None)
    resolved["data"] = {k: v for k, v in resolved["data"].items() if k not in DATA_NOT_IN_HASH}
    resolved["train"] = {k: v for k, v in resolved["train"].items() if k != "eval_backend"}
    resolved["data"]["fingerprint"] = data_fingerprint
    return resolved


def trial_hash(config: TrialConfig, data_fingerprint: str, code: Optional[str] = None) -> str:
    """16 hex digits of SHA-256 over :func:`trial_identity` and the code fingerprint (``code``,
    default :func:`ablate.fingerprint.code_fingerprint`: this process's code).

    So the same variant and seed in another job, or with the data in another directory, has the
    same hash and is reused; a different seed, override, augmentation or dataset gives a
    different one, and so does other code (an edited loss, another torch).
    """
    identity = trial_identity(config, data_fingerprint)
    identity["code"] = code if code is not None else fingerprint.code_fingerprint()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
class _Refused(yaml.MarkedYAMLError):
    """A YAML construct the job loader refuses (duplicate key, tag); formatted without "not valid YAML"."""

    def __init__(self, problem: str, mark: yaml.Mark):
        super().__init__(problem=problem, problem_mark=mark)


class _JobLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate mapping keys and every non-standard tag, and reads ``1e-3`` as a float."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _Refused(f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    raise _Refused(f"tag {tag!r} is not allowed (safe YAML only)", node.start_mark)


_JobLoader.add_constructor(None, _refuse_tag)  # type: ignore[arg-type]
_JobLoader.add_implicit_resolver(  # YAML 1.1 wants "1.0e-3"; people write "1e-3"
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _read_yaml(path: Path, source: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{source}: not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_JobLoader)  # noqa: S506 -- a SafeLoader subclass
    except _Refused as e:
        raise SpecError(f"{source}: line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(f"{source}: {where}not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {e}") from None


def _check_paths(data: DataConfig, source: str) -> None:
    """COCO files and directories must exist; a synthetic root may be absent (it is generated) but not a file."""
    if data.coco is not None:
        for field in ("train_ann", "train_images", "val_ann", "val_images"):
            p = getattr(data.coco, field)
            is_file = field.endswith("_ann")
            if not (p.is_file() if is_file else p.is_dir()):
                raise SpecError(f"{source}: dataset.coco.{field}: no such {'file' if is_file else 'directory'}: {p}")
    elif data.synthetic is not None and data.synthetic.root.exists() and not data.synthetic.root.is_dir():
        raise SpecError(f"{source}: dataset.synthetic.root: {data.synthetic.root} is a file, not a directory")


def load_job_spec(path: str | Path, *, tracking_uri: str | None = None, store: str | None = None) -> JobSpec:
    """Read, validate and expand a job file; every problem is a one-line :class:`SpecError`.

    ``tracking_uri`` and ``store`` (command-line flags) replace the file's ``tracking.uri`` and
    ``store``. Dataset paths are checked here (COCO files must exist); relative paths are
    relative to the working directory, as in trial configs. Trial hashes are computed on the
    first :meth:`JobSpec.trials` call.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SpecError(f"{source}: no such file")
    raw = _read_yaml(path, source)
    if raw is None:
        raise SpecError(f"{source}: empty document; expected a mapping with name, dataset, base, variants, ...")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if tracking_uri is not None:
        t = raw.get("tracking") or {}
        raw["tracking"] = {**t, "uri": tracking_uri} if isinstance(t, dict) else t
    if store is not None:
        raw["store"] = store
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise _spec_error(e, source) from None
    _check_paths(spec.dataset, source)
    return spec
