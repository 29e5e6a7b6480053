"""Detection transforms: letterbox to a square network input, flip and colour jitter for training.

Boxes are absolute ``xyxy`` float tensors in pixels, ``x`` in ``[0, W]`` and ``y`` in ``[0, H]``
(pixel ``i`` covers ``[i, i + 1)``). The letterbox keeps the aspect ratio: the image is
resized so that its longer side is ``S`` and centred on a grey (0.5) ``S x S`` canvas, so
that ``input_xy = orig_xy * scale + pad`` and, back, ``orig_xy = (input_xy - pad) / scale``.

Training applies, in this order: a horizontal flip of the original image (so that ``scale``
and ``pad`` describe the flipped image exactly), the resize, colour jitter on the resized
image (the grey padding is not jittered) and the padding. Every random draw comes from
torch's global generator (through ``torchvision.transforms.v2``), so ``torch.manual_seed``
makes an epoch's augmentations reproducible; DataLoader workers get seeds derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["AugmentConfig", "DetectionTransform", "Letterbox", "boxes_to_original", "letterbox_geometry"]

#: Value of the letterbox padding (grey), images being floats in [0, 1].
PAD_VALUE = 0.5


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


class DetectionTransform:
    """``(uint8 Tensor[3, H, W], Tensor[G, 4]) -> (float Tensor[3, S, S] in [0, 1], Tensor[G, 4], Letterbox)``.

    With ``augment=None`` (evaluation) the transform is the letterbox alone and deterministic.
    """

    def __init__(self, size: int, augment: AugmentConfig | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.augment = augment
        self.flip = v2.RandomHorizontalFlip(augment.hflip) if augment is not None and augment.hflip > 0 else None
        self.jitter = None
        if augment is not None and (augment.jitter > 0 or augment.hue > 0):
            j = augment.jitter
            self.jitter = v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=augment.hue)

    def __call__(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Letterbox]:
        height, width = image.shape[-2:]
        if self.flip is not None:
            image, flipped = self.flip(
                tv_tensors.Image(image),
                tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)),
            )
            image, boxes = image.as_subclass(Tensor), flipped.as_subclass(Tensor)
        box = letterbox_geometry(height, width, self.size)
        if (box.height, box.width) != (height, width):
            image = F.resize(image, [box.height, box.width], antialias=True)  # [3, h, w]
        image = F.to_dtype(image, torch.float32, scale=True)
        if self.jitter is not None:
            image = self.jitter(image)
        canvas = image.new_full((3, self.size, self.size), PAD_VALUE)  # [3, S, S]
        canvas[:, box.top : box.top + box.height, box.left : box.left + box.width] = image
        offset = boxes.new_tensor([box.left, box.top, box.left, box.top])
        return canvas, boxes * box.scale + offset, box  # [3, S, S], [G, 4]

    def __repr__(self) -> str:
        return f"DetectionTransform(size={self.size}, augment={self.augment})"
