"""One trial: ``train(config, report) -> final metrics``. No Ray, MLflow or SQL in here.

The same function is called by a test, by ``ablate train`` and by a Ray worker. It
builds the data, the detector and the criterion from the detector core, trains with
warm-up then cosine or step decay, keeps an EMA of the weights, evaluates with
COCOeval (faster-coco-eval, or pycocotools: ``train.eval_backend``) every few epochs and reports:

* every ``log_every`` steps: ``{"kind": "train", "step", "epoch", "lr", "grad_norm",
  "loss/<term>", "weighted/<term>", "loss/total", "stat/<name>"}``;
* after each evaluation: ``{"kind": "eval", "step", "epoch", <12 COCO numbers>,
  "per_class_AP", "infer_ms_per_image"}``;
* at the end of every epoch, after its checkpoint is on disk: ``{"kind": "epoch", "step",
  "epoch", "train_seconds", "images_seen", "checkpoint"}`` (the checkpoint's path, or
  ``None`` without ``out_dir``): the moment a scheduler may snapshot the trial. On CUDA it
  adds ``gpu_mem_mib`` and ``gpu_mem_reserved_mib``: the epoch's peak of memory allocated to
  tensors and reserved by torch's caching allocator (MiB; reset when the epoch starts, so it
  covers its training, evaluation and checkpoint; the trial's peak is the max over epochs).

Seeding: the model is initialised from ``seed``; each epoch's data order and
augmentations are drawn from ``(seed, epoch)``, so the same seed gives the same batches
in every variant (seeds pair across variants) and a resumed run repeats exactly what an
uninterrupted one would have done. A checkpoint is written after every epoch.

A checkpoint carries the trial's identity (``spec.trial_identity``: the resolved config without
name, threads, device and the dataset's location, plus the dataset fingerprint) and the code
fingerprint (``fingerprint.code_fingerprint``). Resuming from one written for another identity or by
other code is refused (:class:`CheckpointMismatch`, one line naming the differing fields), before
anything is loaded: a resumed run never mixes two configurations or two versions of the code.

A NaN or infinite loss ends the trial as ``diverged`` with the step and the loss terms.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .config import ConfigError, TrialConfig
from .detect import AnchorLayout, LossRecipe, Targets, build_criterion, fit_anchors, get_layout
from .detect.model import ModelConfig, build_model

Report = Callable[[dict[str, Any]], None]
CHECKPOINT = "checkpoint.pt"


class CheckpointMismatch(ConfigError):
    """A checkpoint written for another trial or by other code; the message is one line."""


def resume_state(config: TrialConfig, out_dir: Path, resume: bool = True, restart_hint: str = "`--no-resume`"
                 ) -> tuple[dict[str, Any], str, Optional[dict[str, Any]]]:
    """``(identity, code fingerprint, checkpoint state or None)`` of a run that checkpoints into
    ``out_dir``: the state is ``out_dir/checkpoint.pt`` when ``resume`` and it exists, checked by
    :func:`check_checkpoint` (so a caller can refuse before it writes anything)."""
    from . import fingerprint, spec

    identity = spec.trial_identity(config, spec.dataset_fingerprint(config.data))
    code = fingerprint.code_fingerprint()
    path = Path(out_dir) / CHECKPOINT
    if not (resume and path.exists()):
        return identity, code, None
    state = torch.load(path, map_location="cpu", weights_only=False)  # CPU: the RNG state must stay there
    check_checkpoint(state, identity, code, path, restart_hint)
    return identity, code, state


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_checkpoint(state: dict[str, Any], identity: dict[str, Any], code: str, path: Path,
                     restart_hint: str) -> None:
    """Refuse (:class:`CheckpointMismatch`) a checkpoint whose identity or code fingerprint is not
    this trial's. ``restart_hint`` says how to start over (``--no-resume`` for ``ablate train``)."""
    stored = state.get("identity")
    if stored is None:
        raise CheckpointMismatch(f"checkpoint {path} was written by an ablate without trial identities "
                                 f"(its configuration and code cannot be checked); {restart_hint} starts over")
    if stored != identity:
        a, b = _flat(stored), _flat(identity)
        diffs = []
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<unset>") != b.get(key, "<unset>"):
                diffs.append("the dataset (data.synthetic / data.coco contents)" if key == "data.fingerprint"
                             else f"{key} {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise CheckpointMismatch(f"checkpoint {path} was written for another configuration ({shown}); "
                                 f"{restart_hint} starts over")
    if state.get("code_fingerprint") != code:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by other code (code fingerprint {str(state.get('code_fingerprint'))[:12]}, "
            f"now {code[:12]}: ablate's detector, data, training or evaluation sources or torch, torchvision, "
            f"numpy, pycocotools or faster-coco-eval changed); {restart_hint} starts over")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


class ModelEMA:
    """Exponential moving average of weights and buffers with a warm-up ramp
    (``decay * (1 - exp(-updates / 2000))``, YOLOv5 ``ModelEMA``)."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._cache: tuple[nn.Module, tuple] | None = None

    def _tensors(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(EMA floats, model floats, EMA others, model others): state tensors share storage with
        the modules, so the lists are built once per source model (building two state dicts
        every step cost ~8 ms on one core)."""
        if self._cache is None or self._cache[0] is not model:
            ema, src = self.module.state_dict(), model.state_dict()
            fl = [k for k, v in ema.items() if v.dtype.is_floating_point]
            ot = [k for k, v in ema.items() if not v.dtype.is_floating_point]
            self._cache = (model, ([ema[k] for k in fl], [src[k] for k in fl], [ema[k] for k in ot], [src[k] for k in ot]))
        return self._cache[1]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step: floating tensors move ``1 - d`` of the way to the model's (one fused
        ``_foreach_lerp_``), the others (BatchNorm's counters) are copied."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 2000))
        ema_f, src_f, ema_o, src_o = self._tensors(model)
        torch._foreach_lerp_(ema_f, src_f, 1.0 - d)
        torch._foreach_copy_(ema_o, src_o)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only, not on norms and biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias" or isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine or step decay."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return 0.1 + 0.9 * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if cfg.schedule == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 0.1 ** sum(progress >= m for m in cfg.milestones)

    return f


def _targets(batch_targets: list[dict[str, Any]], device: torch.device) -> Targets:
    return Targets.from_lists([t["boxes"].to(device) for t in batch_targets],
                              [t["labels"].to(device) for t in batch_targets], device=device)


def cpu_share(config: TrialConfig) -> int:
    """The trial's CPU cores: ``threads`` (a job sets it from ``resources.cpus``), else the cores this
    process may run on."""
    if config.threads:
        return config.threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(config: TrialConfig) -> int:
    """``data.workers``, or by default the trial's CPU share minus the core of the training process."""
    w = config.data.workers
    return w if w is not None else max(0, cpu_share(config) - 1)


def build_data(config: TrialConfig, progress: Optional[Callable[[str], None]] = None):
    """The training and validation datasets of a trial (generating the synthetic set if missing,
    building or opening the disk image cache where ``data.cache`` asks for one)."""
    from .data.coco import CocoDetection
    from .data.synth import generate_synthetic
    from .data.transforms import AugmentConfig

    d = config.data
    if d.synthetic is not None:
        s = d.synthetic
        generate_synthetic(s.root, num_train=s.train, num_val=s.val, image_size=s.size, seed=s.seed, progress=progress,
                           image_format=s.format)
        paths = (s.root / "annotations/instances_train.json", s.root / "train",
                 s.root / "annotations/instances_val.json", s.root / "val")
    else:
        c = d.coco
        paths = (c.train_ann, c.train_images, c.val_ann, c.val_images)
    aug = AugmentConfig(hflip=d.hflip, jitter=d.jitter, hue=d.hue)
    common = {"cache": d.cache, "cache_dir": d.cache_dir, "progress": progress, "threads": cpu_share(config)}
    train_set = CocoDetection(paths[0], paths[1], d.image_size, train=True, augment=aug, **common)
    val_set = CocoDetection(paths[2], paths[3], d.image_size, train=False, **common)
    return train_set, val_set


def build_layout(recipe: LossRecipe, train_set, progress: Optional[Callable[[str], None]] = None) -> AnchorLayout:
    """The recipe's anchor layout; with ``anchor_fit: kmeans``, fitted to ``train_set``'s boxes
    (a :class:`~ablate.data.coco.DatasetError` if it has fewer boxes than anchors)."""
    from .data.coco import DatasetError

    layout = get_layout(recipe.anchors)
    if recipe.anchor_fit == "kmeans":
        wh = train_set.box_sizes()
        k = sum(layout.anchors_per_level)
        if wh.shape[0] < k:
            raise DatasetError(f"{train_set.ann_file}: {wh.shape[0]} training boxes, fewer than the {k} anchors "
                               f"that recipe.anchor_fit=kmeans fits to them (set recipe.anchor_fit: none)")
        layout = fit_anchors(layout, wh)
        if progress:
            shapes = " | ".join(" ".join(f"{w:.0f}x{h:.0f}" for w, h in lv.anchors) for lv in layout.levels)
            progress(f"anchors fitted to {wh.shape[0]} training boxes (k-means, 1 - IoU): {shapes}")
    return layout


def train(
    config: TrialConfig,
    report: Report = lambda event: None,
    out_dir: Optional[Path] = None,
    resume: bool = True,
    stop_after_epoch: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
    restart_hint: str = "`--no-resume`",
) -> dict[str, Any]:
    """Train one trial and return its final metrics.

    Args:
        config: the trial.
        report: receives training and evaluation events (see the module docstring).
        out_dir: where the per-epoch checkpoint goes; ``None`` keeps nothing on disk.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists; one written for another
            identity or by other code raises :class:`CheckpointMismatch` (nothing is trained).
        stop_after_epoch: end after this (1-based) epoch as if interrupted (for tests and
            schedulers); the result then has ``status == "stopped"``.
        restart_hint: how a :class:`CheckpointMismatch` message tells the user to start over.

    Returns:
        ``{"status": "finished" | "diverged" | "stopped", "epoch", "step", <last eval
        metrics>, "train_seconds", "images_per_second", "anchors", "resumed_from_epoch", ...}``
        (``anchors``: the anchor shapes ``[w, h]`` per level in input pixels, fitted or published;
        ``resumed_from_epoch``: the checkpoint's epoch this last run started from, 0 if none); a diverged
        trial adds ``"diverged_at": {"step", "epoch", "losses"}``.
    """
    from .data.coco import make_loader
    from .data.transforms import batch_input
    from .evaluate import evaluate_model, load_coco_gt

    t = config.train
    ckpt_path = Path(out_dir) / CHECKPOINT if out_dir else None
    identity, code, state = resume_state(config, out_dir, resume, restart_hint) if out_dir else (None, None, None)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    recipe = config.loss_recipe()
    train_set, val_set = build_data(config, progress)
    num_classes = train_set.num_classes
    size = config.data.image_size
    layout = build_layout(recipe, train_set, progress)
    criterion = build_criterion(recipe, num_classes, size, device, layout)
    priors = criterion.priors
    anchors = [[[round(w, 2), round(h, 2)] for w, h in priors.anchor_wh[priors.anchor_level == lvl].tolist()]
               for lvl in range(priors.num_levels)]  # per level, input pixels

    torch.manual_seed(config.seed)
    model = build_model(recipe, layout, num_classes, ModelConfig(**config.model.model_dump())).to(device)
    model = model.to(memory_format=torch.channels_last)  # faster on CUDA and on the CPU (oneDNN)
    groups = param_groups(model, t.weight_decay)
    params = [p for g in groups for p in g["params"]]  # one list: clipping walks it every step
    # fused kernels: one pass over all parameters (AdamW's per-tensor loop cost ~18 ms a step on one core, fused 4.5)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True, fused=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999), fused=True)
    steps_per_epoch = math.ceil(len(train_set) / t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    warmup = min(int(t.warmup_epochs * steps_per_epoch), total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total_steps, warmup))
    ema = ModelEMA(model, t.ema_decay) if t.ema else None
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, step, last_eval, train_seconds, images_seen = 0, 0, {}, 0.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema and state.get("ema"):
            ema.load_state_dict(state["ema"])
        start_epoch, step = state["epoch"], state["step"]
        last_eval, train_seconds, images_seen = state["last_eval"], state["train_seconds"], state["images_seen"]
        torch.set_rng_state(state["rng"])
        if progress:
            progress(f"resumed from {ckpt_path} after epoch {start_epoch}")

    coco_gt = load_coco_gt(val_set.ann_file)
    workers, pin = loader_workers(config), device.type == "cuda"
    loader, sampler = make_loader(train_set, t.batch_size, shuffle=True, workers=workers,
                                  prefetch=config.data.prefetch, pin_memory=pin)
    val_loader, _ = make_loader(val_set, max(t.batch_size, 16), shuffle=False, workers=workers,
                                prefetch=config.data.prefetch, pin_memory=pin)
    if progress:
        progress(f"data: {len(train_set)} training and {len(val_set)} validation images at {size} px, "
                 f"cache {train_set.cache}/{val_set.cache}, {workers} loader worker{'s' * (workers != 1)}")
    status = "finished"
    epoch = start_epoch
    for epoch in range(start_epoch + 1, t.epochs + 1):
        model.train()
        # the epoch's order and every sample's augmentation seed come from (seed, epoch)
        sampler.set_seed(config.seed * 1_000_003 + epoch)
        torch.manual_seed(config.seed * 1_000_003 + epoch)
        if device.type == "cuda":  # the epoch event's gpu_mem_* are this epoch's peaks (training + eval)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for images, batch_targets in loader:
            images = batch_input(images, batch_targets, device)  # uint8 -> float, colour jitter, on the device
            targets = _targets(batch_targets, device)
            with torch.autocast(device.type, enabled=use_amp):
                pred = model(images)
            out = criterion(pred.float(), targets)
            if not torch.isfinite(out.total):
                train_seconds += time.perf_counter() - t0
                return _result("diverged", epoch, step, last_eval, train_seconds, images_seen, {
                    "anchors": anchors, "diverged_at": {"step": step, "epoch": epoch,
                                    "losses": {k: float(v.detach()) for k, v in out.losses.items()}},
                })
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.total).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip or math.inf, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema:
                ema.update(model)
            step += 1
            images_seen += images.shape[0]
            if step % t.log_every == 0 or step == 1:
                event = {"kind": "train", "step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                         "grad_norm": float(grad_norm), "loss/total": float(out.total.detach())}
                event.update({f"loss/{k}": float(v.detach()) for k, v in out.losses.items()})
                event.update({f"weighted/{k}": float(v.detach()) for k, v in out.weighted.items()})
                event.update({f"stat/{k}": float(v) for k, v in out.stats.items()})
                report(event)
        train_seconds += time.perf_counter() - t0

        if epoch % t.eval_every == 0 or epoch == t.epochs:
            eval_model = ema.module if ema else model
            metrics = evaluate_model(eval_model, val_loader, priors, recipe, coco_gt, val_set.category_ids,
                                     backend=t.eval_backend,
                                     device=device, conf_thresh=t.conf_thresh, nms_iou=t.nms_iou, max_det=t.max_det)
            metrics["per_class_AP"] = {k: (None if v != v else v) for k, v in metrics["per_class_AP"].items()}
            last_eval = {"epoch": epoch, "step": step, **metrics}
            report({"kind": "eval", **last_eval})
        if ckpt_path:
            _save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                "epoch": epoch, "step": step, "last_eval": last_eval, "train_seconds": train_seconds,
                "images_seen": images_seen, "rng": torch.get_rng_state(), "config_hash": config.content_hash(),
                "identity": identity, "code_fingerprint": code,
            })
        gpu_mem = {"gpu_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                   "gpu_mem_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20} \
            if device.type == "cuda" else {}
        report({"kind": "epoch", "step": step, "epoch": epoch, "train_seconds": train_seconds,
                "images_seen": images_seen, "checkpoint": str(ckpt_path) if ckpt_path else None, **gpu_mem})
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < t.epochs:
            status = "stopped"
            break
    return _result(status, epoch, step, last_eval, train_seconds, images_seen,
                   {"anchors": anchors, "resumed_from_epoch": start_epoch})


def _result(status: str, epoch: int, step: int, last_eval: dict, train_seconds: float, images_seen: int,
            extra: Optional[dict] = None) -> dict[str, Any]:
    res = {"status": status, "epoch": epoch, "step": step, **{k: v for k, v in last_eval.items() if k not in ("epoch", "step")},
           "train_seconds": train_seconds, "images_per_second": images_seen / train_seconds if train_seconds else 0.0}
    res.update(extra or {})
    return res


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
