"""``ablate bench eval``: the two COCOeval backends on the same detections, and batched NMS.

COCOeval needs boxes, not pixels: :func:`coco_like_gt` writes a COCO-sized ground truth (5,000
images by default, COCO val2017's count) straight into an annotation dict, without image files:
80 categories, ~7.3 boxes per image (Poisson), 1% of images empty, 1% of boxes crowd, sides
log-uniform from 4 px to the image's size (about 44% small, 23% medium, 33% large; COCO val:
41/34/24), aspect ratios 1:3-3:1. :func:`perturbed_detections` makes a detector's output from it:
most ground truths found with a jittered box (some twice, some with the wrong class, crowd
regions hit too), the rest of each image's ``dets`` slots false positives with low scores, as a
detector at ``conf_thresh=0.001, max_det=100`` returns. AP lands between 0 and 1 in every area
range.

Each repeat evaluates the same results with both backends, in alternating order (the machine is
shared and noisy: the ratio of one run is the figure, absolute seconds are not); the 12 numbers
and per-class AP of the two must agree to 1e-4 (the max abs difference is printed). The post-
processing figure times :func:`~ablate.detect.postprocess.postprocess` on a batch of random raw
head outputs (most (anchor, class) pairs candidates: the pre-NMS top-k binds, as in an early
evaluation) against the per-image loop it replaced (:func:`per_image_postprocess`), interleaved.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .evaluate import COCO_METRICS, coco_evaluate, resolve_backend

#: Backends compared, the reference first.
BACKENDS = ("pycocotools", "faster_coco_eval")


# --------------------------------------------------------------------------- data
def _box_sides(rng: np.random.Generator, n: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` box widths and heights: side log-uniform in [4, 0.9 min(w, h)], aspect ratio 1:3-3:1."""
    side = np.exp(rng.uniform(math.log(4.0), math.log(0.9 * min(w, h)), n))
    ar = np.exp(rng.uniform(math.log(1 / 3), math.log(3.0), n))
    bw = np.minimum(side * np.sqrt(ar), w - 1.0)
    bh = np.minimum(side / np.sqrt(ar), h - 1.0)
    return bw, bh


def coco_like_gt(num_images: int = 5000, classes: int = 80, boxes_per_image: float = 7.3,
                 empty: float = 0.01, crowd: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """A COCO annotation dict (``images``, ``annotations``, ``categories``) without image files.

    Images are 640 x 480, 480 x 640 or 640 x 427; annotation ids start at 1 (COCOeval reads id 0
    as "unmatched"); ``area`` is the box area.
    """
    rng = np.random.default_rng(seed)
    sizes = ((640, 480), (480, 640), (640, 427))
    images, anns = [], []
    for i in range(num_images):
        w, h = sizes[int(rng.integers(len(sizes)))]
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": w, "height": h})
        n = 0 if rng.random() < empty else int(rng.poisson(boxes_per_image))
        bw, bh = _box_sides(rng, n, w, h)
        x = rng.uniform(0, w - bw)
        y = rng.uniform(0, h - bh)
        cat = rng.integers(1, classes + 1, n)
        is_crowd = rng.random(n) < crowd
        for k in range(n):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cat[k]),
                         "bbox": [float(x[k]), float(y[k]), float(bw[k]), float(bh[k])],
                         "area": float(bw[k] * bh[k]), "iscrowd": int(is_crowd[k])})
    cats = [{"id": k + 1, "name": f"class{k + 1:02d}", "supercategory": "thing"} for k in range(classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def perturbed_detections(dataset: dict[str, Any], dets: int = 100, recall: float = 0.85, seed: int = 0) -> list[dict]:
    """COCO results for ``dataset``: its ground truth, perturbed, plus false positives; ``dets`` per image.

    Each non-crowd box is found with probability ``recall`` (corners jittered by ~8% of its side,
    score 0.3-1, the wrong class 10% of the time) and found twice with probability 0.2 (a looser
    box, a lower score); a crowd box is hit with probability 0.5. The remaining slots of an image
    are false positives anywhere, of any class, with scores below 0.4.
    """
    rng = np.random.default_rng(seed)
    classes = [c["id"] for c in dataset["categories"]]
    by_image: dict[int, list[dict]] = {}
    for a in dataset["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    results: list[dict] = []
    for img in dataset["images"]:
        w, h, out = img["width"], img["height"], []
        for a in by_image.get(img["id"], []):
            hits = (rng.random() < 0.5) if a["iscrowd"] else (rng.random() < recall) + (rng.random() < 0.2)
            for k in range(int(hits)):
                x, y, bw, bh = a["bbox"]
                j = rng.normal(0, 0.08 * (1 + k), 4) * np.array([bw, bh, bw, bh])
                x1, y1 = max(0.0, x + j[0]), max(0.0, y + j[1])
                x2, y2 = min(float(w), x + bw + j[2]), min(float(h), y + bh + j[3])
                if x2 - x1 < 1 or y2 - y1 < 1:
                    continue
                cat = a["category_id"] if rng.random() < 0.9 else int(rng.choice(classes))
                score = rng.uniform(0.3, 1.0) / (1 + k)
                out.append((cat, [x1, y1, x2 - x1, y2 - y1], score))
        out = out[:dets]
        n_fp = dets - len(out)
        if n_fp > 0:
            bw, bh = _box_sides(rng, n_fp, w, h)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = rng.choice(classes, n_fp)
            score = 0.4 * rng.random(n_fp) ** 2 + 1e-3
            out.extend((int(cat[k]), [float(x[k]), float(y[k]), float(bw[k]), float(bh[k])], float(score[k]))
                       for k in range(n_fp))
        results.extend({"image_id": img["id"], "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
                       for c, b, s in out)
    return results


def coco_from_dict(dataset: dict[str, Any]):
    """A pycocotools ``COCO`` of an annotation dict, built without its prints."""
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


# --------------------------------------------------------------------------- comparison
def max_abs_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest ``|a - b|`` over the 12 COCO numbers and per-class AP of two :func:`coco_evaluate`
    dicts; ``inf`` where one is NaN and the other is not (both NaN agree)."""
    pairs = [(a[k], b[k]) for k in COCO_METRICS]
    pa, pb = a.get("per_class_AP", {}), b.get("per_class_AP", {})
    if set(pa) != set(pb):
        return math.inf
    pairs += [(pa[k], pb[k]) for k in pa]
    worst = 0.0
    for x, y in pairs:
        if math.isnan(x) or math.isnan(y):
            if math.isnan(x) != math.isnan(y):
                return math.inf
            continue
        worst = max(worst, abs(x - y))
    return worst


# --------------------------------------------------------------------------- benchmark
@dataclass
class EvalBench:
    images: int
    annotations: int
    detections: int
    repeats: int
    seconds: dict[str, list[float]]  # backend -> wall clock of each coco_evaluate call
    median_s: dict[str, float]
    speedup: float  # pycocotools median / faster_coco_eval median
    max_abs_diff: float  # over the 12 numbers and per-class AP, between the backends
    metrics: dict[str, float]  # the reference's 12 numbers
    postprocess: dict[str, Any] = field(default_factory=dict)


def bench_eval(images: int = 5000, repeats: int = 3, dets: int = 100, seed: int = 0,
               postprocess_batch: int = 16, progress: Callable[[str], None] | None = None) -> EvalBench:
    """Time :func:`~ablate.evaluate.coco_evaluate` with each backend on the same results.

    ``postprocess_batch`` > 0 also times batched vs per-image post-processing
    (:func:`bench_postprocess`); 0 skips it. Raises ImportError without faster-coco-eval.
    """
    say = progress or (lambda m: None)
    for b in BACKENDS:
        resolve_backend(b)
    t0 = time.perf_counter()
    dataset = coco_like_gt(images, seed=seed)
    results = perturbed_detections(dataset, dets=dets, seed=seed)
    gt = coco_from_dict(dataset)
    say(f"data: {images} images, {len(dataset['annotations'])} boxes, {len(results)} detections "
        f"({time.perf_counter() - t0:.1f} s)")
    seconds: dict[str, list[float]] = {b: [] for b in BACKENDS}
    outs: dict[str, dict] = {}
    for r in range(repeats):
        for b in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            t = time.perf_counter()
            outs[b] = coco_evaluate(gt, results, backend=b)
            seconds[b].append(time.perf_counter() - t)
            say(f"repeat {r + 1}/{repeats} {b}: {seconds[b][-1]:.2f} s (AP {outs[b]['AP']:.4f})")
    median = {b: statistics.median(v) for b, v in seconds.items()}
    ref, fast = outs[BACKENDS[0]], outs[BACKENDS[1]]
    pp = bench_postprocess(batch=postprocess_batch, repeats=repeats, seed=seed, progress=say) if postprocess_batch else {}
    return EvalBench(images=images, annotations=len(dataset["annotations"]), detections=len(results), repeats=repeats,
                     seconds=seconds, median_s=median, speedup=median["pycocotools"] / median["faster_coco_eval"],
                     max_abs_diff=max_abs_difference(ref, fast), metrics={k: ref[k] for k in COCO_METRICS},
                     postprocess=pp)


def per_image_postprocess(pred: torch.Tensor, priors, recipe, conf_thresh: float = 0.001, nms_iou: float = 0.6,
                          max_det: int = 100, pre_nms_topk: int = 3000) -> list:
    """The loop that batched :func:`~ablate.detect.postprocess.postprocess` replaced, kept as its
    reference (tests) and baseline (benchmark): per image, the candidates above ``conf_thresh``, their
    top ``pre_nms_topk``, decode, clip, ``batched_nms`` by class, the first ``max_det``."""
    from torchvision.ops import batched_nms

    from .detect.coding import build_coding
    from .detect.postprocess import Detections, num_classes_of, scores_from_logits

    B = pred.shape[0]
    C = num_classes_of(pred, recipe)
    coding = build_coding(recipe.coding, recipe.scale_xy, recipe.variances)
    scores = scores_from_logits(pred, recipe)  # [B, N, C]
    t = pred[..., :4].float()
    H, W = priors.image_size
    out = []
    for i in range(B):
        flat = scores[i].reshape(-1)  # [N*C]
        idx = (flat > conf_thresh).nonzero().squeeze(1)
        val = flat[idx]
        if val.numel() > pre_nms_topk:
            val, top = val.topk(pre_nms_topk)
            idx = idx[top]
        rows, labels = idx // C, idx % C
        boxes = coding.decode(t[i, rows], priors.rows(rows))  # [M, 4]
        boxes = torch.stack((boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                             boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)), -1)
        ok = torch.isfinite(boxes).all(1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, val, labels = boxes[ok], val[ok], labels[ok]
        keep = batched_nms(boxes, val, labels, nms_iou)[:max_det]
        out.append(Detections(boxes[keep], val[keep], labels[keep]))
    return out


def bench_postprocess(preset_name: str = "yolov3", batch: int = 16, size: int = 640, classes: int = 80,
                      repeats: int = 3, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Milliseconds of post-processing one batch of random raw outputs ``[batch, N, K]`` (CPU):
    :func:`~ablate.detect.postprocess.postprocess` (batched) vs :func:`per_image_postprocess` (the
    loop it replaced), interleaved; the medians and their ratio (loop / batched)."""
    from .detect import build_priors, get_layout, preset
    from .detect.postprocess import postprocess

    say = progress or (lambda m: None)
    recipe = preset(preset_name)
    priors = build_priors(get_layout(recipe.anchors), size)
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, priors.num, recipe.head_channels(classes), generator=g)
    pred[..., 4:] = pred[..., 4:] * 1.5 - 3.0  # objectness and class logits: most pairs above 0.001
    ms: dict[str, list[float]] = {"batched": [], "per_image": []}
    runs = {"batched": lambda: postprocess(pred, priors, recipe),
            "per_image": lambda: per_image_postprocess(pred, priors, recipe)}
    runs["batched"]()  # warm-up
    for r in range(repeats):
        for name in (("batched", "per_image") if r % 2 == 0 else ("per_image", "batched")):
            t = time.perf_counter()
            runs[name]()
            ms[name].append(1000 * (time.perf_counter() - t))
        say(f"postprocess repeat {r + 1}/{repeats}: batched {ms['batched'][-1]:.0f} ms, "
            f"per-image loop {ms['per_image'][-1]:.0f} ms")
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"preset": preset_name, "batch": batch, "size": size, "classes": classes, "anchors": priors.num,
            "batched_ms": med["batched"], "per_image_ms": med["per_image"],
            "ratio": med["per_image"] / med["batched"], "threads": torch.get_num_threads()}


def write_eval_json(path: Path, bench: EvalBench, environment: dict[str, Any]) -> None:
    d = asdict(bench)
    d["environment"] = environment
    d["max_abs_diff"] = d["max_abs_diff"] if math.isfinite(d["max_abs_diff"]) else None
    d["metrics"] = {k: (v if math.isfinite(v) else None) for k, v in d["metrics"].items()}
    path.write_text(json.dumps(d, indent=2))
