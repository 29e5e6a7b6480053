"""COCO evaluation: detections -> COCO results -> the 12 COCOeval numbers.

Coordinates: the detector works in pixels of its square, letterboxed input. Every image's
meta records how it got there: ``input = orig * scale + pad`` with ``pad = (left, top)``;
:func:`to_coco_results` inverts that, ``orig = (input - pad) / scale``, clips to the
original image and writes COCO ``xywh``.

Conventions of the returned numbers: COCOeval reports ``-1`` for a metric it cannot
define (no ground truth in that area range, e.g. ``APs`` on a set without small
objects); here those are ``NaN``, so that a mean over seeds or images can never mix a
sentinel into real values. ``per_class_AP`` is ``NaN`` for a class without ground truth.

Backends (:data:`EVAL_BACKENDS`): ``pycocotools``, the reference, and ``faster_coco_eval``
(the ``faster-coco-eval`` package: pycocotools' API with ``evaluate`` and ``accumulate`` in
C++). ``auto`` takes ``faster_coco_eval`` where it imports and falls back to pycocotools. Both
give the same 12 numbers and per-class AP to 1e-4 (``tests/test_eval_backend.py``: the synthetic
validation set, crowd and empty images, a class without ground truth, no detections at all);
``ablate bench eval`` times them on a COCO-sized set.

The export check (:func:`export_check`) proves the coordinate path end to end without a
trained model: ground truth fed back as detections must score AP = 1, and a raw head
output synthesised from the ground truth (:func:`~ablate.detect.postprocess.oracle_prediction`)
must survive decoding, NMS and the inverse letterbox with AP ~ 1.
"""

from __future__ import annotations

import contextlib
import io
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from .data.transforms import to_input
from .detect.anchors import Priors
from .detect.postprocess import Detections, oracle_prediction, postprocess
from .detect.recipe import LossRecipe

#: The 12 numbers of ``COCOeval.summarize()``, in ``COCOeval.stats`` order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(enabled: bool = True):
    return contextlib.redirect_stdout(io.StringIO()) if enabled else contextlib.nullcontext()


def _floats(x: Any) -> list[float]:
    """A number, a sequence or a tensor -> a flat list of Python floats."""
    if isinstance(x, Tensor):
        return [float(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, (int, float, np.floating, np.integer)):
        return [float(x)]
    return [float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def _image_id(meta: Mapping[str, Any]) -> int:
    v = meta["image_id"]
    return v if isinstance(v, int) else int(_floats(v)[0])


def _meta_geometry(meta: Mapping[str, Any]) -> tuple[float, float, float, float, float, float]:
    """``(scale_x, scale_y, pad_left, pad_top, orig_h, orig_w)`` of one image's meta.
    ``scale`` is one float (the letterbox keeps the aspect ratio) or ``(sx, sy)``."""
    s = _floats(meta["scale"])
    sx, sy = (s[0], s[0]) if len(s) == 1 else (s[0], s[1])
    pl, pt = _floats(meta["pad"])[:2]
    h, w = _floats(meta["orig_size"])[:2]
    return sx, sy, pl, pt, h, w


def load_coco_gt(ann_file: str) -> COCO:
    """The ground truth of a COCO annotation file, loaded without pycocotools' prints."""
    with _quiet():
        return COCO(str(ann_file))


# --------------------------------------------------------------------------- results
def to_coco_results(dets: Sequence[Detections], metas: Sequence[Mapping[str, Any]],
                    category_ids: Sequence[int]) -> list[dict]:
    """Detections in input pixels -> COCO result dicts in original-image pixels.

    Args:
        dets: one :class:`Detections` per image, boxes ``[D, 4]`` xyxy in input pixels.
        metas: one dict per image with ``image_id``, ``scale`` (input px per original px),
            ``pad`` ``(left, top)`` in input px and ``orig_size`` ``(h, w)``; values may be
            numbers, sequences or tensors.
        category_ids: COCO category id of each contiguous label.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, boxes mapped
        with ``(xy - pad) / scale`` and clipped to the original image.
    """
    if len(dets) != len(metas):
        raise ValueError(f"{len(dets)} detections for {len(metas)} metas")
    if not dets:
        return []
    sizes = [d.boxes.shape[0] for d in dets]
    # one transfer from the device for the whole batch
    all_boxes = torch.cat([d.boxes.detach().float().reshape(-1, 4) for d in dets]).cpu().split(sizes)
    all_scores = torch.cat([d.scores.detach().float().reshape(-1) for d in dets]).cpu().split(sizes)
    all_labels = torch.cat([d.labels.detach().long().reshape(-1) for d in dets]).cpu().split(sizes)
    results: list[dict] = []
    for n, b, sc, lb, meta in zip(sizes, all_boxes, all_scores, all_labels, metas):
        if n == 0:
            continue
        sx, sy, pl, pt, h, w = _meta_geometry(meta)
        x1 = ((b[:, 0] - pl) / sx).clamp(0, w)
        y1 = ((b[:, 1] - pt) / sy).clamp(0, h)
        x2 = ((b[:, 2] - pl) / sx).clamp(0, w)
        y2 = ((b[:, 3] - pt) / sy).clamp(0, h)
        xywh = torch.stack((x1, y1, x2 - x1, y2 - y1), -1).tolist()  # [D, 4]
        scores = sc.tolist()
        labels = lb.tolist()
        image_id = _image_id(meta)
        results.extend(
            {"image_id": image_id, "category_id": int(category_ids[lab]), "bbox": box, "score": float(s)}
            for box, s, lab in zip(xywh, scores, labels)
        )
    return results


# --------------------------------------------------------------------------- COCOeval
#: ``coco_evaluate(backend=...)``: ``auto`` is ``faster_coco_eval`` where it imports, else pycocotools.
EVAL_BACKENDS = ("auto", "pycocotools", "faster_coco_eval")

#: faster-coco-eval's copy of a pycocotools ground truth, built once per ground-truth object.
_FAST_GT: "weakref.WeakKeyDictionary[COCO, Any]" = weakref.WeakKeyDictionary()


def _faster_coco_eval() -> tuple[type, type] | None:
    """faster-coco-eval's ``(COCO, COCOeval_faster)``, or None where the package does not import."""
    try:
        from faster_coco_eval import COCO as FastCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return FastCOCO, COCOeval_faster


def resolve_backend(backend: str = "auto") -> str:
    """The backend that ``backend`` runs: ``pycocotools`` or ``faster_coco_eval``.

    ``auto`` is ``faster_coco_eval`` where the package imports, else ``pycocotools``. Asking for
    ``faster_coco_eval`` without the package raises ImportError; an unknown name, ValueError.
    """
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"eval backend: unknown {backend!r}; choose one of {', '.join(EVAL_BACKENDS)}")
    if backend == "pycocotools":
        return backend
    if _faster_coco_eval() is None:
        if backend == "faster_coco_eval":
            raise ImportError("eval backend 'faster_coco_eval': the faster-coco-eval package does not import "
                              "(pip install faster-coco-eval), or choose 'pycocotools'")
        return "pycocotools"
    return "faster_coco_eval"


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object without detections (``COCO.loadRes`` cannot take an empty list)."""
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                   "categories": list(coco_gt.dataset.get("categories", []))}
    with _quiet():
        res.createIndex()
    return res


def _nan_if_undefined(v: float) -> float:
    return float("nan") if v < 0 else float(v)


def _cocoeval(coco_gt: COCO, results: list[dict], backend: str):
    """A COCOeval (bbox) of ``results`` on ``coco_gt``, set up but not run, for ``backend``."""
    if backend == "pycocotools":
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        return COCOeval(coco_gt, coco_dt, iouType="bbox")
    fast = _faster_coco_eval()
    assert fast is not None  # resolve_backend checked
    FastCOCO, COCOevalFast = fast
    gt = _FAST_GT.get(coco_gt)
    if gt is None:
        # a shallow copy: the annotation dicts are shared (both libraries set the same "ignore" flag)
        gt = _FAST_GT[coco_gt] = FastCOCO(coco_gt.dataset)
    return COCOevalFast(gt, gt.loadRes(results), iouType="bbox")


def coco_evaluate(coco_gt: COCO, results: list[dict], per_class: bool = True, quiet: bool = True,
                  image_ids: Iterable[int] | None = None, backend: str = "auto") -> dict:
    """COCOeval (bbox) of ``results`` against ``coco_gt``.

    Args:
        coco_gt: the ground truth (a pycocotools ``COCO``, e.g. from :func:`load_coco_gt`).
        results: COCO result dicts (:func:`to_coco_results`); may be empty, which scores 0
            wherever ground truth exists.
        per_class: also compute the AP of each category.
        quiet: swallow the backend's prints.
        image_ids: evaluate only these images (default: every image of ``coco_gt``); pass
            the ids that were run when the detector saw only part of the set.
        backend: one of :data:`EVAL_BACKENDS` (:func:`resolve_backend`); the backends agree to 1e-4.

    Returns:
        ``{"AP": .., "AP50": .., ... (the 12 :data:`COCO_METRICS`, in [0, 1]),
        "per_class_AP": {category name: AP}, "eval_backend": the backend that ran,
        "cocoeval_seconds": wall clock of loading the results, evaluate, accumulate and
        summarize}`` (``per_class_AP`` is ``{}`` when ``per_class`` is False). A metric
        COCOeval cannot define (it reports -1: no ground truth in that area range) is ``NaN``.
        Per-class AP is the mean of the accumulated precision over the 10 IoU thresholds and
        101 recall points, area "all", ``maxDets=100``, ignoring COCOeval's -1 entries; it is
        ``NaN`` for a category without ground truth in the evaluated images.
    """
    backend = resolve_backend(backend)
    results = [dict(r) for r in results]  # loadRes writes into the dicts
    t0 = time.perf_counter()
    with _quiet(quiet):
        ev = _cocoeval(coco_gt, results, backend)
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {k: _nan_if_undefined(v) for k, v in zip(COCO_METRICS, list(ev.stats)[:12])}
    out["per_class_AP"] = {}
    if per_class:
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        m = list(ev.params.maxDets).index(100) if 100 in ev.params.maxDets else -1
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, m]  # [T, R]
            p = p[p > -1]
            out["per_class_AP"][coco_gt.cats[int(cat_id)]["name"]] = float(p.mean()) if p.size else float("nan")
    out["eval_backend"] = backend
    out["cocoeval_seconds"] = seconds
    return out


# --------------------------------------------------------------------------- model
def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable,
    priors: Priors,
    recipe: LossRecipe,
    coco_gt: COCO,
    category_ids: Sequence[int],
    device: torch.device | str = "cpu",
    conf_thresh: float = 0.001,
    nms_iou: float = 0.6,
    max_det: int = 100,
    backend: str = "auto",
) -> dict:
    """Run ``model`` over ``loader`` and score it with COCOeval.

    Args:
        model: ``model(images Tensor[B, 3, S, S]) -> Tensor[B, N, K]`` raw head output.
        loader: yields ``(images, targets)``, each target a dict with ``image_id``,
            ``orig_size`` ``(h, w)``, ``scale`` and ``pad`` ``(left, top)``.
        priors: the head's priors at the input size ``S``.
        category_ids: COCO category id of each contiguous label.
        backend: the COCOeval backend (:func:`coco_evaluate`).

    Returns:
        the dict of :func:`coco_evaluate` (over the images seen: the 12 numbers,
        ``per_class_AP``, ``eval_backend``, ``cocoeval_seconds``) plus ``infer_ms_per_image``
        and ``infer_images_per_second`` (wall clock of forward + post-processing, batched, on
        ``device``), ``eval_seconds`` and ``eval_images_per_second`` (the whole evaluation:
        loading, inference, COCO results and COCOeval) and ``num_detections``. The model is
        put back in its previous train/eval mode.
    """
    device = torch.device(device)
    if priors.boxes.device != device:
        priors = priors.to(device)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    seen: list[int] = []
    infer_s, n_images = 0.0, 0
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for images, targets in loader:
                images = to_input(images, device)  # uint8 batches become float [0, 1] on the device
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                pred = model(images)  # [B, N, K]
                dets = postprocess(pred, priors, recipe, conf_thresh=conf_thresh, nms_iou=nms_iou, max_det=max_det)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                infer_s += time.perf_counter() - t0
                n_images += images.shape[0]
                results.extend(to_coco_results(dets, targets, category_ids))
                seen.extend(_image_id(t) for t in targets)
    finally:
        model.train(was_training)
    metrics = coco_evaluate(coco_gt, results, image_ids=seen, backend=backend)
    eval_s = time.perf_counter() - start
    metrics["infer_ms_per_image"] = 1000.0 * infer_s / max(n_images, 1)
    metrics["infer_images_per_second"] = n_images / infer_s if infer_s > 0 else 0.0
    metrics["eval_seconds"] = eval_s
    metrics["eval_images_per_second"] = n_images / eval_s if eval_s > 0 else 0.0
    metrics["num_detections"] = len(results)
    return metrics


# --------------------------------------------------------------------------- export check
def gt_detections(coco_gt: COCO, metas: Sequence[Mapping[str, Any]], category_ids: Sequence[int]) -> list[Detections]:
    """The ground truth of each meta's image as score-1 detections in input pixels.

    Boxes are forward-mapped with the metas' letterbox, ``input = orig * scale + pad``;
    crowd annotations are skipped. Categories not in ``category_ids`` raise ``KeyError``.
    """
    label_of = {int(c): i for i, c in enumerate(category_ids)}
    out = []
    for meta in metas:
        sx, sy, pl, pt, _, _ = _meta_geometry(meta)
        anns = [a for a in coco_gt.imgToAnns.get(_image_id(meta), []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # [G, 4]
        xyxy = torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), -1)
        boxes = xyxy * torch.tensor([sx, sy, sx, sy]) + torch.tensor([pl, pt, pl, pt])
        labels = torch.tensor([label_of[int(a["category_id"])] for a in anns], dtype=torch.long)
        out.append(Detections(boxes, torch.ones(len(anns)), labels))
    return out


def export_check(
    coco_gt: COCO,
    metas: Sequence[Mapping[str, Any]],
    category_ids: Sequence[int],
    recipe: LossRecipe | None = None,
    priors: Priors | None = None,
    targets: Sequence[Mapping[str, Any]] | None = None,
    **postprocess_kwargs: Any,
) -> dict:
    """End-to-end check of the coordinate path on the images of ``metas``.

    The ground truth in input pixels comes from ``targets`` (per image, ``boxes``
    ``Tensor[G, 4]`` xyxy and contiguous ``labels`` ``Tensor[G]``, as the data loader
    yields them; this checks the loader's forward letterbox against the inverse of
    :func:`to_coco_results`) or, by default, from :func:`gt_detections` (the COCO ground
    truth forward-mapped with the metas; a mistake made the same way in both directions
    would cancel there, so prefer the loader's targets where there is a loader).

    Without a recipe those boxes, as score-1 detections mapped back by
    :func:`to_coco_results`, must score AP = 1. With a recipe and its priors, per image,
    :func:`~ablate.detect.postprocess.oracle_prediction` encodes them into a raw head
    output which :func:`~ablate.detect.postprocess.postprocess` decodes; AP should be
    >= 0.99 (float rounding aside).

    Returns:
        the :func:`coco_evaluate` dict plus ``num_detections`` and the oracle's counts
        (0 without a recipe): ``unplaced`` ground truths it could not put on any prior,
        ``unreachable`` assigned rows whose coding cannot represent their box.
    """
    if targets is None:
        gts = gt_detections(coco_gt, metas, category_ids)
    else:
        if len(targets) != len(metas):
            raise ValueError(f"{len(targets)} targets for {len(metas)} metas")
        gts = [Detections(t["boxes"].float().reshape(-1, 4), torch.ones(t["boxes"].shape[0]),
                          torch.as_tensor(t["labels"]).long().reshape(-1)) for t in targets]
    unplaced = unreachable = 0
    if recipe is None:
        dets = gts
    else:
        if priors is None:
            raise ValueError("export_check: a recipe needs its priors")
        dets = []
        for g in gts:
            o = oracle_prediction(g.boxes, g.labels, priors, recipe, len(category_ids))
            unplaced += o.unplaced
            unreachable += o.unreachable
            dets.extend(postprocess(o.pred, priors, recipe, **postprocess_kwargs))
    results = to_coco_results(dets, metas, category_ids)
    out = coco_evaluate(coco_gt, results, image_ids=[_image_id(m) for m in metas])
    out["num_detections"] = len(results)
    out["unplaced"] = unplaced
    out["unreachable"] = unreachable
    return out
