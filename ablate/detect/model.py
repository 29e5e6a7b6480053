"""The shared one-stage detector: CSP-Darknet-style backbone, FPN + PAN neck, per-level head.

The same network serves every preset; only its head layout (levels, anchors per cell,
outputs per anchor) follows the recipe, so a comparison changes only the loss side.
No pretrained weights (nothing can be downloaded): everything trains from scratch.

``Detector(images Tensor[B, 3, S, S]) -> Tensor[B, N, K]``: rows in prior order
(level, y, x, anchor), ``K = recipe.head_channels(C)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .anchors import AnchorLayout
from .recipe import LossRecipe


@dataclass(frozen=True)
class ModelConfig:
    width: float = 0.25  # channel multiplier (YOLOv5n: 0.25)
    depth: float = 0.33  # bottleneck-count multiplier (YOLOv5n: 0.33)
    neck_channels: int | None = None  # default: 256 * width, at least 32


def _ch(c: float) -> int:
    return max(8, int(math.ceil(c / 8) * 8))


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03),
            nn.SiLU(inplace=True),
        )


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 1)
        self.cv2 = ConvBNAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convolutions (Scaled-YOLOv4 / YOLOv5)."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        h = c_out // 2
        self.cv1 = ConvBNAct(c_in, h, 1)
        self.cv2 = ConvBNAct(c_in, h, 1)
        self.m = nn.Sequential(*(Bottleneck(h, shortcut) for _ in range(n)))
        self.cv3 = ConvBNAct(2 * h, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1 = ConvBNAct(c, c // 2, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBNAct(c * 2, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), 1))


class Backbone(nn.Module):
    """Stride-2 stages up to ``max_stride``; returns the features at ``strides``."""

    def __init__(self, strides: tuple[int, ...], width: float, depth: float):
        super().__init__()
        self.strides = strides
        n = lambda k: max(1, round(k * depth))  # noqa: E731
        chans = [_ch(64 * width), _ch(128 * width), _ch(256 * width), _ch(512 * width), _ch(1024 * width)]
        self.stem = ConvBNAct(3, chans[0], 3, 2)  # stride 2
        stages = []
        c_prev = chans[0]
        reps = [n(3), n(6), n(9), n(3)]
        max_stride = max(strides)
        stride = 2
        i = 1
        self.out_channels: dict[int, int] = {}
        while stride < max_stride:
            c = chans[min(i, len(chans) - 1)]
            blocks: list[nn.Module] = [ConvBNAct(c_prev, c, 3, 2)]
            if i <= 4:
                blocks.append(C3(c, c, reps[i - 1]))
            if i == 4:
                blocks.append(SPPF(c))
            stride *= 2
            stages.append(nn.Sequential(*blocks))
            self.out_channels[stride] = c
            c_prev = c
            i += 1
        self.stages = nn.ModuleList(stages)
        self._stage_strides = [2 ** (k + 2) for k in range(len(stages))]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        out = {}
        for s, stage in zip(self._stage_strides, self.stages):
            x = stage(x)
            out[s] = x
        return [out[s] for s in self.strides]


class Neck(nn.Module):
    """FPN (top-down) then PAN (bottom-up) over the head's levels, ``c`` channels each."""

    def __init__(self, in_channels: list[int], c: int, depth: float):
        super().__init__()
        n = max(1, round(3 * depth))
        L = len(in_channels)
        self.lateral = nn.ModuleList(ConvBNAct(ci, c, 1) for ci in in_channels)
        self.top_down = nn.ModuleList(C3(2 * c, c, n, shortcut=False) for _ in range(L - 1))
        self.down = nn.ModuleList(ConvBNAct(c, c, 3, 2) for _ in range(L - 1))
        self.bottom_up = nn.ModuleList(C3(2 * c, c, n, shortcut=False) for _ in range(L - 1))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        x = [lat(f) for lat, f in zip(self.lateral, feats)]
        # top-down: from the coarsest level
        for i in range(len(x) - 2, -1, -1):
            up = nn.functional.interpolate(x[i + 1], size=x[i].shape[-2:], mode="nearest")
            x[i] = self.top_down[i](torch.cat((x[i], up), 1))
        # bottom-up
        for i in range(1, len(x)):
            down = self.down[i - 1](x[i - 1])
            if down.shape[-2:] != x[i].shape[-2:]:
                down = nn.functional.interpolate(down, size=x[i].shape[-2:], mode="nearest")
            x[i] = self.bottom_up[i - 1](torch.cat((x[i], down), 1))
        return x


class Detector(nn.Module):
    """Backbone + neck + one head per level with ``A_l * K`` outputs per cell."""

    def __init__(self, layout: AnchorLayout, recipe: LossRecipe, num_classes: int, image_size: int,
                 config: ModelConfig = ModelConfig()):
        super().__init__()
        self.strides = layout.strides
        self.anchors_per_level = layout.anchors_per_level
        self.k = recipe.head_channels(num_classes)
        self.backbone = Backbone(self.strides, config.width, config.depth)
        c = config.neck_channels or max(32, _ch(256 * config.width))
        self.neck = Neck([self.backbone.out_channels[s] for s in self.strides], c, config.depth)
        self.heads = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, c, 3), nn.Conv2d(c, a * self.k, 1)) for a in self.anchors_per_level
        )
        self._init_bias(recipe, num_classes, image_size)

    @torch.no_grad()
    def _init_bias(self, recipe: LossRecipe, num_classes: int, image_size: int) -> None:
        """Prior-probability bias initialisation (RetinaNet sec. 4.1; YOLOv5 ``_initialize_biases``)."""
        for head, stride, a in zip(self.heads, self.strides, self.anchors_per_level):
            conv = head[-1]
            b = conv.bias.view(a, self.k)
            b.zero_()
            c0 = 4
            if recipe.has_objectness:
                b[:, 4] = math.log(8 / (image_size / stride) ** 2)  # ~8 objects per image
                c0 = 5
                b[:, c0:] = math.log(0.6 / max(num_classes - 0.99, 0.01))
            elif recipe.background_class:
                b[:, c0] = math.log(99.0 * num_classes)  # p(background) ~ 0.99
            else:
                b[:, c0:] = -math.log((1 - 0.01) / 0.01)  # p(class) ~ 0.01
            conv.weight.mul_(0.1)

    def forward(self, images: Tensor) -> Tensor:
        """``Tensor[B, 3, S, S] -> Tensor[B, N, K]``."""
        feats = self.neck(self.backbone(images))
        outs = []
        for f, head, a in zip(feats, self.heads, self.anchors_per_level):
            y = head(f)  # [B, A*K, H, W]
            B, _, H, W = y.shape
            outs.append(y.view(B, a, self.k, H, W).permute(0, 3, 4, 1, 2).reshape(B, H * W * a, self.k))
        return torch.cat(outs, 1)  # [B, N, K]


def build_model(recipe: LossRecipe, layout: AnchorLayout, num_classes: int, image_size: int,
                config: ModelConfig = ModelConfig()) -> Detector:
    return Detector(layout, recipe, num_classes, image_size, config)
