"""``LossRecipe``: every loss-side decision of a one-stage detector, and the seed presets.

A recipe is a frozen, validated dataclass. A preset is a named recipe whose values each
cite their source. Any field can be overridden by name (``box_loss=ciou``), which is how
an ablation job varies it::

    recipe = preset("yolov3").override(box_loss="ciou", ignore_thresh=None)
    recipe = preset("yolov3").override_from(["box_loss=ciou", "ignore_thresh=null"])
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Union

from .anchors import LAYOUTS, get_layout
from .assign import ASSIGNERS
from .coding import CODINGS

BOX_LOSSES = ("mse", "sse_sqrt", "smooth_l1", "iou", "giou", "diou", "ciou", "eiou", "siou")
OBJ_LOSSES = ("bce", "mse", "focal")
CLS_LOSSES = ("bce", "ce", "focal", "sse")
NORMALIZE = ("positives", "batch", "sum", "mean", "level_mean")
CHOICES: dict[str, tuple[str, ...]] = {
    "anchors": tuple(LAYOUTS),
    "anchor_fit": ("none", "kmeans"),
    "coding": CODINGS,
    "assigner": ASSIGNERS,
    "box_loss": BOX_LOSSES,
    "obj_loss": OBJ_LOSSES,
    "obj_target": ("one", "iou", "ciou"),
    "cls_loss": CLS_LOSSES,
    "neg_mining": ("none", "ohem"),
    "normalize": NORMALIZE,
}


@dataclass(frozen=True)
class LossRecipe:
    """Coding, assignment and loss terms of one detector variant. Defaults are YOLOv3's."""

    name: str = "custom"  # the preset this recipe derives from

    # --- coding and anchors
    anchors: str = "yolov3"  # anchor layout, see anchors.LAYOUTS
    anchor_fit: str = "none"  # none: the layout's published shapes; kmeans: the training set's clusters (anchors.fit_anchors)
    coding: str = "yolo"  # yolo | scaled_yolo | delta | yolov1
    scale_xy: Union[float, tuple[float, ...]] = 1.0  # yolo coding: 1.0 (v2/v3), 1.05-1.2 (v4), or per level
    variances: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)  # delta coding

    # --- assignment
    assigner: str = "best_anchor"  # best_anchor | max_iou | wh_ratio | yolov1
    pos_iou: float = 0.5  # max_iou: IoU >= pos_iou is positive
    neg_iou: float = 0.4  # max_iou: IoU < neg_iou is negative, between is ignored
    low_quality: bool = True  # max_iou: each GT's best anchor is positive too
    min_pos_iou: float = 0.0  # max_iou: ... if its IoU reaches this
    iou_thresh: Optional[float] = None  # best_anchor: extra anchors above this shape IoU (YOLOv4 0.213)
    anchor_t: float = 4.0  # wh_ratio: max width/height ratio
    ignore_thresh: Optional[float] = None  # ignore mask on decoded predictions; None: off

    # --- box loss
    box_loss: str = "mse"
    box_small_weight: bool = False  # weight box loss by 2 - w*h (w, h relative to the image), YOLOv3
    smooth_l1_beta: float = 1.0  # smooth_l1: 1.0 SSD, 0.1 detectron2 RetinaNet, 0 = L1
    ciou_iou_gate: Optional[float] = None  # ciou: alpha = 0 where IoU < gate (0.5 in CIoU's TPAMI version)

    # --- objectness (None: no objectness output, as SSD / RetinaNet)
    obj_loss: Optional[str] = "bce"
    obj_target: str = "one"  # one | iou (detached IoU of the decoded prediction) | ciou (its CIoU clamped at 0, YOLOv5)

    # --- classification
    cls_loss: str = "bce"  # bce | ce (softmax; with a background class when obj_loss is None) | focal | sse
    label_smoothing: float = 0.0
    focal_alpha: Optional[float] = 0.25
    focal_gamma: float = 2.0

    # --- negatives
    neg_mining: str = "none"  # none | ohem
    neg_pos_ratio: float = 3.0  # ohem: negatives kept per positive

    # --- weights and normalisation
    lambda_box: float = 1.0  # lambda_coord
    lambda_obj: float = 1.0
    lambda_noobj: float = 1.0  # relative weight of the negatives' term (objectness, or background class)
    lambda_cls: float = 1.0
    level_balance: Optional[tuple[float, ...]] = None  # per-level weights of the negatives/objectness terms
    normalize: str = "batch"  # positives | batch | sum | mean | level_mean (see Criterion._normalise)
    scale_by_batch: bool = False  # multiply the weighted terms by the batch size (YOLOv5 / Scaled-YOLOv4 `loss * bs`)

    def __post_init__(self) -> None:
        _check_types(self)
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value is None and name == "obj_loss":
                continue
            if value not in choices:
                raise ValueError(f"{name}: unknown value {value!r}; choose one of {', '.join(choices)}")
        if not 0.0 <= self.neg_iou <= self.pos_iou <= 1.0:
            raise ValueError(f"neg_iou ({self.neg_iou}) must be <= pos_iou ({self.pos_iou}), both in [0, 1]")
        for name in ("min_pos_iou", "iou_thresh", "ignore_thresh", "ciou_iou_gate"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: {v} is outside [0, 1]")
        if self.focal_gamma < 0:
            raise ValueError(f"focal_gamma: must be >= 0, got {self.focal_gamma}")
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha: must be in [0, 1] or null, got {self.focal_alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.anchor_t <= 1.0:
            raise ValueError(f"anchor_t: must be > 1, got {self.anchor_t}")
        if self.neg_pos_ratio <= 0:
            raise ValueError(f"neg_pos_ratio: must be > 0, got {self.neg_pos_ratio}")
        if self.smooth_l1_beta < 0:
            raise ValueError(f"smooth_l1_beta: must be >= 0, got {self.smooth_l1_beta}")
        for name in ("lambda_box", "lambda_obj", "lambda_noobj", "lambda_cls"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be a finite number >= 0, got {getattr(self, name)}")
        if any(v <= 0 for v in self.variances):
            raise ValueError(f"variances: must be > 0, got {self.variances}")
        layout = get_layout(self.anchors)
        n_levels = len(layout.levels)
        if isinstance(self.scale_xy, tuple) and len(self.scale_xy) != n_levels:
            raise ValueError(f"scale_xy: {len(self.scale_xy)} values for {n_levels} levels of anchors={self.anchors}")
        if self.level_balance is not None:
            if len(self.level_balance) != n_levels:
                raise ValueError(
                    f"level_balance: {len(self.level_balance)} values for {n_levels} levels of anchors={self.anchors}"
                )
            if any(v < 0 for v in self.level_balance):
                raise ValueError(f"level_balance: weights must be >= 0, got {self.level_balance}")
        if layout.anchor_free and self.assigner in ("best_anchor", "wh_ratio"):
            raise ValueError(
                f"assigner: {self.assigner} matches by anchor shape, but anchors={self.anchors} has no prior shapes; "
                "use yolov1 or max_iou"
            )
        if layout.anchor_free and self.anchor_fit != "none":
            raise ValueError(f"anchor_fit: anchors={self.anchors} has no prior shapes to fit; use anchor_fit=none")
        if self.obj_target != "one" and self.obj_loss is None:
            raise ValueError(f"obj_target: {self.obj_target} needs an objectness loss (obj_loss is null)")
        if self.normalize == "level_mean" and self.obj_loss is None:
            raise ValueError("normalize: level_mean is YOLOv5's per-level reduction of the box, objectness and class "
                             "terms and needs an objectness loss (obj_loss is null); use mean or positives")

    # ------------------------------------------------------------------ derived
    @property
    def has_objectness(self) -> bool:
        return self.obj_loss is not None

    @property
    def background_class(self) -> bool:
        """A head without objectness and with a softmax class loss predicts background as class 0."""
        return self.obj_loss is None and self.cls_loss in ("ce", "sse")

    def head_channels(self, num_classes: int) -> int:
        """Outputs per anchor: 4 box offsets, objectness if any, classes (+ background)."""
        return 4 + int(self.has_objectness) + num_classes + int(self.background_class)

    # ------------------------------------------------------------------ overrides
    def override(self, **changes: Any) -> "LossRecipe":
        """A copy with fields replaced by name; unknown names and bad values raise ``ValueError``."""
        names = {f.name for f in fields(self)}
        for key in changes:
            if key not in names:
                raise ValueError(f"unknown recipe field {key!r}; fields are: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in changes.items()})

    def override_from(self, items: list[str]) -> "LossRecipe":
        """Apply ``["field=value", ...]``; values are parsed as YAML scalars/lists (``null``, ``[4, 1, 0.4]``)."""
        import yaml  # a detector dependency only through torchvision; imported lazily

        changes = {}
        for item in items:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form field=value")
            key, raw = item.split("=", 1)
            changes[key.strip()] = yaml.safe_load(raw)
        return self.override(**changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def diff(self, other: "LossRecipe") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{name: (self, other)}``."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}


# --------------------------------------------------------------------------- type checking
_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(LossRecipe))
    return _HINTS


def _coerce(name: str, value: Any) -> Any:
    """Lists from YAML become tuples; ints where floats are expected become floats."""
    hint = _hints().get(name)
    if isinstance(value, list):
        value = tuple(value)
    if value is None:
        return None
    args = typing.get_args(hint)
    if (hint is float or float in args) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tuple):
        return tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
    return value


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _check_types(recipe: LossRecipe) -> None:
    for name, hint in _hints().items():
        value = getattr(recipe, name)
        if not _matches(value, hint):
            raise ValueError(f"{name}: expected {_type_name(hint)}, got {value!r}")


# --------------------------------------------------------------------------- presets
PRESETS: dict[str, LossRecipe] = {
    # YOLOv1 (Redmon et al., CVPR 2016, sec. 2.2 eq. 3): one coarse grid, B=2 predictors,
    # SSE everywhere, lambda_coord 5, lambda_noobj 0.5, sqrt(w), sqrt(h).
    "yolov1": LossRecipe(
        name="yolov1",
        anchors="yolov1",  # single level, 2 predictors per cell, no prior shape
        coding="yolov1",  # cell offset + sqrt(w / W) (paper sec. 2.2)
        assigner="yolov1",  # predictor with the highest current IoU is "responsible"
        box_loss="sse_sqrt",  # SSE on (x, y, sqrt w, sqrt h) (eq. 3, first two lines)
        obj_loss="mse",  # SSE on confidence (eq. 3, lines 3-4)
        obj_target="iou",  # "confidence ... equal the IOU between the predicted box and the ground truth"
        cls_loss="sse",  # SSE on class probabilities (eq. 3, last line)
        lambda_box=5.0,  # lambda_coord = 5
        lambda_noobj=0.5,  # lambda_noobj = .5
        normalize="batch",  # sum over the grid, averaged over images
    ),
    # YOLOv2 (Redmon & Farhadi, CVPR 2017; darknet yolov2.cfg [region] layer).
    "yolov2": LossRecipe(
        name="yolov2",
        anchors="yolov2",  # five anchors on one stride-32 level (COCO's: 0.57x0.68 .. 9.77x9.17 cells)
        anchor_fit="kmeans",  # "we run k-means clustering on the training set bounding boxes" (sec. 2, Fig. 2)
        coding="yolo",  # sigma(t) + c, p exp(t) (sec. 2, "Direct location prediction")
        scale_xy=1.0,
        assigner="best_anchor",  # best anchor of the centre cell by shape IoU (region layer)
        ignore_thresh=0.6,  # region layer thresh = .6: no noobj loss above it
        box_loss="mse",  # coord_scale=1 squared error on t
        box_small_weight=True,  # region_layer.c delta_region_box: scale = coord_scale * (2 - w*h)
        obj_loss="mse",  # region layer: delta = scale * (target - sigma(x)), i.e. squared error
        obj_target="iou",  # rescore=1: objectness target is the IoU
        cls_loss="sse",  # softmax=1; delta on probabilities
        lambda_box=1.0,  # coord_scale=1
        lambda_obj=5.0,  # object_scale=5
        lambda_noobj=0.2,  # noobject_scale=1 relative to object_scale=5
        lambda_cls=1.0,  # class_scale=1
        normalize="batch",
    ),
    # YOLOv3 (Redmon & Farhadi, arXiv 1804.02767; darknet yolov3.cfg [yolo] layers).
    "yolov3": LossRecipe(
        name="yolov3",
        anchors="yolov3",  # nine anchors, three per level at strides 8/16/32 (COCO's: 10x13 .. 373x326 at 416 px)
        anchor_fit="kmeans",  # "We still use k-means clustering to determine our bounding box priors" (sec. 2.3)
        coding="yolo",
        scale_xy=1.0,
        assigner="best_anchor",  # "one bounding box prior for each ground truth object" (sec. 2.1)
        ignore_thresh=0.7,  # yolov3.cfg ignore_thresh=.7 (paper: "we use the threshold of .5")
        box_loss="mse",  # squared error on t (sec. 2.1)
        box_small_weight=True,  # darknet delta_yolo_box scale = 2 - w*h
        obj_loss="bce",  # logistic regression objectness (sec. 2.1)
        obj_target="one",
        cls_loss="bce",  # independent logistic classifiers (sec. 2.2)
        normalize="batch",  # darknet sums over the batch; we average over images
    ),
    # YOLOv4 (Bochkovskiy et al., arXiv 2004.10934; darknet yolov4.cfg).
    "yolov4": LossRecipe(
        name="yolov4",
        anchors="yolov4",
        coding="yolo",
        scale_xy=(1.2, 1.1, 1.05),  # scale_x_y per [yolo] layer, eliminates grid sensitivity
        assigner="best_anchor",
        iou_thresh=0.213,  # iou_thresh=0.213: extra anchors per GT
        ignore_thresh=0.7,  # ignore_thresh=.7
        box_loss="ciou",  # iou_loss=ciou
        obj_loss="bce",
        obj_target="one",
        cls_loss="bce",
        lambda_box=0.07,  # iou_normalizer=0.07
        lambda_obj=1.0,  # obj_normalizer=1.0
        lambda_cls=1.0,  # cls_normalizer=1.0
        normalize="batch",
    ),
    # Scaled-YOLOv4 (Wang et al., CVPR 2021; WongKinYiu/ScaledYOLOv4 yolov4-csp, data/hyp.scratch.yaml,
    # utils/general.py compute_loss; the same loss as ultralytics yolov5 v7.0 utils/loss.py ComputeLoss).
    # Deviations from that code, each on purpose: (1) no `loss * bs` (scale_by_batch=False): the
    # trainer's learning rate and weight decay are shared by every preset, and the reference's
    # lr 0.01 (SGD) assumes the sum over the batch; scale_by_batch=true reproduces it (with SGD, divide
    # lr by the batch size to keep the step). (2) One GT per (anchor, cell): where two GTs, or one GT
    # centred exactly on a cell border, claim the same (anchor, cell), the reference keeps every copy
    # in its per-level means (and the last tobj write wins); ablate keeps the GT with the smaller
    # size ratio once. (3) The class term is kept with one class (the reference skips it, `nc > 1`).
    "scaled_yolov4": LossRecipe(
        name="scaled_yolov4",
        anchors="scaled_yolov4",  # yolov4-csp.yaml anchors at 640 px
        coding="scaled_yolo",  # 2 sigma - 0.5, p (2 sigma)^2
        assigner="wh_ratio",  # build_targets: wh ratio < anchor_t plus two neighbour cells
        anchor_t=4.0,  # hyp anchor_t: 4.0
        box_loss="ciou",  # lbox += (1 - bbox_iou(pbox, tbox, CIoU=True)).mean()
        obj_loss="bce",
        obj_target="ciou",  # tobj = (1 - gr) + gr * ciou.detach().clamp(0), gr = 1.0: the CIoU, not the IoU
        cls_loss="bce",  # BCEWithLogits on smooth_BCE targets (eps 0: 1 / 0)
        lambda_box=0.05,  # hyp box (giou in hyp.scratch.yaml): 0.05
        lambda_obj=1.0,  # hyp obj: 1.0
        lambda_cls=0.5,  # hyp cls: 0.5
        level_balance=(4.0, 1.0, 0.4),  # balance = [4.0, 1.0, 0.4] for P3-P5, on the objectness term only
        normalize="level_mean",  # per level: lbox, lcls means over its positives, lobj mean over its anchors; summed
        scale_by_batch=False,  # the reference returns loss * bs; see (1) above
    ),
    # SSD (Liu et al., ECCV 2016, sec. 2.2; ssd.pytorch MultiBoxLoss).
    "ssd": LossRecipe(
        name="ssd",
        anchors="ssd",  # SSD300 default boxes
        coding="delta",
        variances=(0.1, 0.1, 0.2, 0.2),  # prior variances
        assigner="max_iou",
        pos_iou=0.5,  # "match default boxes to any ground truth with jaccard overlap higher than 0.5"
        neg_iou=0.5,  # no ignored band
        low_quality=True,  # "match each ground truth box to the default box with the best jaccard overlap"
        box_loss="smooth_l1",  # localisation: Smooth L1 (eq. 2)
        smooth_l1_beta=1.0,
        obj_loss=None,  # no objectness: background is class 0
        cls_loss="ce",  # softmax confidence loss with background (eq. 3)
        neg_mining="ohem",  # hard negative mining
        neg_pos_ratio=3.0,  # "the ratio between the negatives and positives is at most 3:1"
        lambda_box=1.0,  # alpha = 1 (cross validation)
        normalize="positives",  # divided by N, the number of matched default boxes
    ),
    # RetinaNet (Lin et al., ICCV 2017, sec. 4; detectron2 RetinaNet defaults).
    "retinanet": LossRecipe(
        name="retinanet",
        anchors="retinanet",  # P3-P7, 3 scales x 3 ratios
        coding="delta",
        variances=(1.0, 1.0, 1.0, 1.0),  # BBOX_REG_WEIGHTS (1, 1, 1, 1)
        assigner="max_iou",
        pos_iou=0.5,  # "anchors are assigned to ground-truth object boxes using an IoU threshold of 0.5"
        neg_iou=0.4,  # "and to background if their IoU is in [0, 0.4)"; ignored between
        low_quality=True,  # detectron2 RETINANET allow_low_quality_matches=True
        box_loss="smooth_l1",
        smooth_l1_beta=0.1,  # detectron2 SMOOTH_L1_LOSS_BETA = 0.1
        obj_loss=None,
        cls_loss="focal",  # sigmoid focal loss over all anchors
        focal_alpha=0.25,  # alpha = 0.25
        focal_gamma=2.0,  # gamma = 2
        normalize="positives",  # "normalized by the number of anchors assigned to a ground-truth box"
    ),
}


def preset(name: str) -> LossRecipe:
    """The preset recipe ``name``; one of :data:`PRESETS`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
