"""One trial's configuration (pydantic, frozen, unknown keys refused).

A trial is one variant with one seed: a preset plus recipe overrides, the detector's
size, the data and the training schedule. ``ablate train CONFIG.yaml`` reads one; the job
spec of a later issue expands into many.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .detect.recipe import PRESETS, LossRecipe, preset


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticData(_Frozen):
    root: Path = Path("data/synth160")  # generated here if missing
    train: int = Field(1000, ge=1)  # training images
    val: int = Field(200, ge=1)  # validation images
    size: int = Field(160, ge=64)  # generated image side
    seed: int = 0
    format: Literal["png", "jpeg"] = "png"  # image files; jpeg exercises a real decoder (quality 90)


class CocoData(_Frozen):
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


class DataConfig(_Frozen):
    synthetic: Optional[SyntheticData] = None
    coco: Optional[CocoData] = None
    image_size: int = Field(160, ge=32)  # network input (letterboxed), a multiple of 32
    hflip: float = Field(0.5, ge=0, le=1)
    jitter: float = Field(0.2, ge=0, le=1)
    hue: float = Field(0.02, ge=0, le=0.5)
    # decoded, resized images (uint8): "disk" one memory-mapped file per dataset and image size, built
    # once per node and shared by every trial there through the page cache; "memory" a copy per process
    # (each loader worker holds its own); "none" decodes every time; "auto" is disk when the decoded
    # set is small (ablate.data.coco.AUTO_DISK_LIMIT), none otherwise (COCO train2017 at 640 px is ~100 GB)
    cache: Literal["auto", "none", "memory", "disk"] = "auto"
    cache_dir: Optional[Path] = None  # the disk cache's folder (node-local); default $ABLATE_CACHE_DIR or ~/.cache/ablate/images
    # loader worker processes; null: the trial's CPU share (threads) minus one for the training process
    workers: Optional[int] = Field(None, ge=0, le=64)
    prefetch: int = Field(2, ge=1, le=64)  # batches each worker loads ahead

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.synthetic is None) == (self.coco is None):
            raise ValueError("give exactly one of data.synthetic or data.coco")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        return self


class ModelSize(_Frozen):
    width: float = Field(0.25, gt=0, le=2)  # channel multiplier
    depth: float = Field(0.33, gt=0, le=2)  # depth multiplier
    head: Literal["decoupled", "coupled"] = "decoupled"  # decoupled: a box(+obj) and a class branch; coupled: one
    head_width: float = Field(1.0, gt=0, le=2)  # decoupled: channels of each branch, a fraction of the neck's


class TrainConfig(_Frozen):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0)  # peak learning rate (AdamW)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum / AdamW beta1
    weight_decay: float = Field(0.05, ge=0)  # not applied to norms and biases
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[float, ...] = (0.7, 0.9)  # step schedule: fractions of training, x0.1 each
    min_lr_ratio: float = Field(0.05, ge=0, le=1)  # cosine floor
    ema: bool = True
    ema_decay: float = Field(0.999, gt=0, lt=1)
    grad_clip: Optional[float] = Field(10.0, gt=0)  # max gradient norm; null: off
    eval_every: int = Field(5, ge=1)  # epochs between evaluations (the last epoch always evaluates)
    log_every: int = Field(10, ge=1)  # steps between training reports
    conf_thresh: float = Field(0.001, ge=0, lt=1)
    nms_iou: float = Field(0.6, gt=0, le=1)
    max_det: int = Field(100, ge=1)
    # COCOeval backend: "auto" is faster_coco_eval (C++) where it imports, else pycocotools (the
    # reference); the two give the same 12 numbers and per-class AP to 1e-4 (tests/test_eval_backend.py)
    eval_backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"


class TrialConfig(_Frozen):
    name: str = "trial"
    preset: str = "yolov3"
    recipe: dict[str, Any] = Field(default_factory=dict)  # LossRecipe overrides by field name
    model: ModelSize = ModelSize()
    data: DataConfig = DataConfig(synthetic=SyntheticData())
    train: TrainConfig = TrainConfig()
    seed: int = 0
    threads: Optional[int] = Field(None, ge=1)  # torch CPU threads (several trials share a machine)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _valid_recipe(self) -> "TrialConfig":
        try:
            self.loss_recipe()
        except ValueError as e:  # "field: problem" -> "recipe.field: problem"
            raise ValueError(f"recipe.{e}") from None
        return self

    def loss_recipe(self) -> LossRecipe:
        return preset(self.preset).override(**self.recipe)

    def resolved(self) -> dict[str, Any]:
        """The fully resolved configuration (recipe expanded), JSON-ready."""
        d = self.model_dump(mode="json")
        d["recipe"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.loss_recipe().to_dict().items()}
        return d

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message is one line."""


def _format_validation_error(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Nested update: ``extra``'s leaves replace ``base``'s."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_trial_config(path: Path, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """Read a trial YAML (safe loader only) into a :class:`TrialConfig`; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = _merge(raw, overrides or {})
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path))) from None
