"""Detection transforms: letterbox to a square network input, flip and colour jitter for training.

Boxes are absolute ``xyxy`` float tensors in pixels, ``x`` in ``[0, W]`` and ``y`` in ``[0, H]``
(pixel ``i`` covers ``[i, i + 1)``). The letterbox keeps the aspect ratio: the image is
resized so that its longer side is ``S`` and centred on a grey (``PAD_VALUE``) ``S x S``
canvas, so that ``input_xy = orig_xy * scale + pad`` and, back, ``orig_xy = (input_xy - pad) / scale``.

Images stay ``uint8`` from the decoder to the batch: :meth:`DetectionTransform.resize` (the
step an image cache stores), then for training a horizontal flip of the resized image and its
boxes, and the padding. Colour jitter is drawn there (a :class:`Jitter`: the order and factors
of brightness, contrast, saturation and hue, as ``v2.ColorJitter`` draws them) but applied by
:func:`batch_input` on the float batch on the training device, image by image, to the image's
own region (the grey padding is not jittered), with ``torchvision.transforms.v2.functional``:
on uint8 those functions convert to float and back for every operation, which made jitter the
loader's largest cost (17 ms of 31 per 640 px image on one core; see README, "Data benchmark"),
and on a GPU the float batch costs next to nothing. :func:`to_input` makes the float ``[0, 1]``
input on the device after the copy, so a quarter of the bytes cross to a GPU.

Every random draw of an image comes from the ``torch.Generator`` passed with it (flip, then
jitter's order and factors), so the augmentation of a sample is a function of its seed alone,
not of which loader worker or process draws it (:class:`~ablate.data.coco.SeededBatchSampler`
hands every sample its seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

__all__ = ["AugmentConfig", "DetectionTransform", "Jitter", "Letterbox", "apply_jitter", "batch_input",
           "boxes_to_original", "letterbox_geometry", "to_input"]

#: Value of the letterbox padding (grey) in uint8 pixels; 128 / 255 is about 0.5 of the float input.
PAD_VALUE = 128


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations (evaluation uses none of them)."""

    hflip: float = 0.5  # probability of a horizontal flip
    jitter: float = 0.2  # brightness, contrast and saturation factors drawn from [1 - jitter, 1 + jitter]
    hue: float = 0.02  # hue shift drawn from [-hue, hue], as a fraction of the colour wheel

    def __post_init__(self) -> None:
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {self.hflip}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")


class Letterbox(NamedTuple):
    """Where an ``H x W`` image lands on the ``S x S`` input: ``input_xy = orig_xy * scale + (left, top)``."""

    scale: float
    left: int
    top: int
    height: int  # of the resized image, before padding
    width: int


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    """Scale and padding that fit an ``height x width`` image into ``size x size``, aspect kept, centred."""
    scale = size / max(height, width)
    new_h = min(size, max(1, round(height * scale)))
    new_w = min(size, max(1, round(width * scale)))
    return Letterbox(scale, (size - new_w) // 2, (size - new_h) // 2, new_h, new_w)


def boxes_to_original(boxes: Tensor, scale: float, pad: tuple[int, int], orig_size: tuple[int, int]) -> Tensor:
    """Map ``Tensor[N, 4]`` xyxy boxes from the network input back to the original image, clipped to it.

    ``pad`` is ``(left, top)`` and ``orig_size`` is ``(height, width)``, as in a dataset target.
    """
    left, top = pad
    height, width = orig_size
    offset = boxes.new_tensor([left, top, left, top])
    limit = boxes.new_tensor([width, height, width, height])
    return torch.minimum((boxes - offset) / scale, limit).clamp_(min=0)  # [N, 4]


class Jitter(NamedTuple):
    """One image's colour jitter: factors (None: that operation is off), the order to apply them in
    (0 brightness, 1 contrast, 2 saturation, 3 hue) and the image's region of the padded input."""

    order: tuple[int, ...]
    brightness: float | None
    contrast: float | None
    saturation: float | None
    hue: float | None
    region: tuple[int, int, int, int]  # top, left, height, width


def _factor(spread: float, generator: torch.Generator | None) -> float:
    """A jitter factor drawn uniformly from ``[1 - spread, 1 + spread]`` (``v2.ColorJitter``'s draw)."""
    return float(torch.empty(1).uniform_(max(0.0, 1.0 - spread), 1.0 + spread, generator=generator))


class DetectionTransform:
    """``(uint8 Tensor[3, H, W], Tensor[G, 4], generator) -> (uint8 Tensor[3, S, S], Tensor[G, 4], Letterbox)``.

    With ``augment=None`` (evaluation) the transform is the letterbox alone and deterministic.
    ``__call__`` takes the original image; :meth:`resize` and :meth:`finish` are its two halves,
    for callers that keep resized images (the image caches).
    """

    def __init__(self, size: int, augment: AugmentConfig | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.augment = augment

    def geometry(self, height: int, width: int) -> Letterbox:
        return letterbox_geometry(height, width, self.size)

    def resize(self, image: Tensor) -> Tensor:
        """``uint8 Tensor[3, H, W] -> uint8 Tensor[3, h, w]``: the letterbox's resize (antialiased bilinear),
        the same for training and evaluation."""
        height, width = image.shape[-2:]
        box = self.geometry(height, width)
        if (box.height, box.width) == (height, width):
            return image
        return F.resize(image, [box.height, box.width], antialias=True)

    def finish(self, resized: Tensor, boxes: Tensor, box: Letterbox, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Letterbox, Jitter | None]:
        """Flip (training) and pad a resized image: ``uint8 [3, h, w]`` and boxes ``[G, 4]`` in original
        pixels ``-> uint8 [3, S, S]``, boxes in input pixels, the letterbox and the image's colour jitter
        (None without; :func:`batch_input` applies it). Draws come from ``generator`` (torch's global
        generator when None): the flip, then the jitter."""
        image = resized
        boxes = boxes * box.scale  # [G, 4] in resized pixels
        a = self.augment
        jitter = None
        if a is not None:
            if a.hflip > 0 and float(torch.rand(1, generator=generator)) < a.hflip:
                image = F.horizontal_flip(image)
                w = float(box.width)
                boxes = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), -1)
            if a.jitter > 0 or a.hue > 0:
                jitter = self._draw_jitter(box, generator)
        canvas = image.new_full((3, self.size, self.size), PAD_VALUE)  # [3, S, S] uint8
        canvas[:, box.top : box.top + box.height, box.left : box.left + box.width] = image
        offset = boxes.new_tensor([box.left, box.top, box.left, box.top])
        return canvas, boxes + offset, box, jitter  # [3, S, S], [G, 4]

    def _draw_jitter(self, box: Letterbox, generator: torch.Generator | None) -> Jitter:
        """Brightness, contrast, saturation (factors in ``[1 - jitter, 1 + jitter]``) and hue (shift in
        ``[-hue, hue]``) in a random order, drawn as ``v2.ColorJitter`` draws them."""
        a = self.augment
        assert a is not None
        order = tuple(torch.randperm(4, generator=generator).tolist())
        j = a.jitter
        b = _factor(j, generator) if j > 0 else None
        c = _factor(j, generator) if j > 0 else None
        s = _factor(j, generator) if j > 0 else None
        h = float(torch.empty(1).uniform_(-a.hue, a.hue, generator=generator)) if a.hue > 0 else None
        return Jitter(order, b, c, s, h, (box.top, box.left, box.height, box.width))

    def __call__(self, image: Tensor, boxes: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Letterbox, Jitter | None]:
        height, width = image.shape[-2:]
        return self.finish(self.resize(image), boxes, self.geometry(height, width), generator)

    def __repr__(self) -> str:
        return f"DetectionTransform(size={self.size}, augment={self.augment})"


def apply_jitter(images: Tensor, jitters: Sequence[Jitter | None]) -> Tensor:
    """Apply each image's :class:`Jitter` to its region of a float ``[0, 1]`` batch ``[B, 3, S, S]``,
    in place, with ``v2.functional``'s float operations (each clamps to ``[0, 1]``). Returns ``images``."""
    if len(jitters) != images.shape[0]:
        raise ValueError(f"{len(jitters)} jitters for {images.shape[0]} images")
    for i, j in enumerate(jitters):
        if j is None:
            continue
        top, left, height, width = j.region
        region = images[i, :, top : top + height, left : left + width]
        x = region
        for k in j.order:
            if k == 0 and j.brightness is not None:
                x = F.adjust_brightness(x, j.brightness)
            elif k == 1 and j.contrast is not None:
                x = F.adjust_contrast(x, j.contrast)
            elif k == 2 and j.saturation is not None:
                x = F.adjust_saturation(x, j.saturation)
            elif k == 3 and j.hue is not None:
                x = F.adjust_hue(x, j.hue)
        region.copy_(x)
    return images


def batch_input(images: Tensor, targets: Sequence[dict], device: torch.device | str) -> Tensor:
    """The network input of a loader batch: :func:`to_input`, then each target's ``jitter``
    (:func:`apply_jitter`) on the device."""
    jitters = [t.get("jitter") for t in targets]
    if not any(j is not None for j in jitters):
        return to_input(images, device)
    x = apply_jitter(to_input(images, device, channels_last=False), jitters)  # on contiguous images: 3x faster
    return x.contiguous(memory_format=torch.channels_last)


def to_input(images: Tensor, device: torch.device | str, channels_last: bool = True) -> Tensor:
    """A batch as the network's input on ``device``: ``uint8 Tensor[B, 3, S, S] -> float32 [0, 1]``
    (a float batch is only moved). The copy is non-blocking (pinned memory on CUDA) and the
    conversion runs on ``device``."""
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # on uint8 where it arrives so: a quarter of the bytes
    if not x.is_floating_point():
        x = x.to(torch.float32).div_(255.0)  # keeps the memory format
    return x
