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
    head: str = "decoupled"  # decoupled: a box (+ objectness) branch and a class branch; coupled: one conv for all
    head_width: float = 1.0  # decoupled: each branch's channels, as a fraction of the neck's


#: Prior probability that an anchor holds an object, for the bias initialisation (RetinaNet's pi).
PRIOR_PROB = 0.01


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


class Head(nn.Module):
    """One level's head: ``Tensor[B, c, H, W] -> Tensor[B, A*K, H, W]``, channels anchor-major.

    ``coupled``: a 3x3 conv then one 1x1 output conv (YOLOv3's last block). ``decoupled``:
    two 3x3 branches of ``width * c`` channels, box offsets and objectness from one, classes
    from the other (RetinaNet's box and class subnets; YOLOX, Ge et al. 2021, sec. 2.1.1,
    for its faster convergence). At width 1 a training step of the tiny detector at 160 px
    costs ~18% more than with the coupled head (one core).
    """

    def __init__(self, c: int, a: int, k: int, n_box: int, kind: str, width: float = 1.0):
        super().__init__()
        self.a, self.k, self.n_box, self.kind = a, k, n_box, kind
        if kind == "coupled":
            self.branches = nn.ModuleList([nn.Sequential(ConvBNAct(c, c, 3), nn.Conv2d(c, a * k, 1))])
        elif kind == "decoupled":
            h = _ch(c * width)
            self.branches = nn.ModuleList([nn.Sequential(ConvBNAct(c, h, 3), nn.Conv2d(h, a * n_box, 1)),
                                           nn.Sequential(ConvBNAct(c, h, 3), nn.Conv2d(h, a * (k - n_box), 1))])
        else:
            raise ValueError(f"head: unknown kind {kind!r}; choose coupled or decoupled")

    @torch.no_grad()
    def init_output(self, bias: Tensor, weight_scale: float) -> None:
        """Set the output biases from ``bias: Tensor[A, K]`` and scale the output weights."""
        outs = [b[-1] for b in self.branches]
        if self.kind == "coupled":
            outs[0].bias.copy_(bias.reshape(-1))
        else:
            outs[0].bias.copy_(bias[:, : self.n_box].reshape(-1))
            outs[1].bias.copy_(bias[:, self.n_box :].reshape(-1))
        for o in outs:
            o.weight.mul_(weight_scale)

    def output_bias(self) -> Tensor:
        """The output biases as ``Tensor[A, K]`` (a copy)."""
        outs = [b[-1].bias.detach().view(self.a, -1) for b in self.branches]
        return torch.cat(outs, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "coupled":
            return self.branches[0](x)
        B, _, H, W = x.shape
        box = self.branches[0](x).view(B, self.a, self.n_box, H, W)
        cls = self.branches[1](x).view(B, self.a, self.k - self.n_box, H, W)
        return torch.cat((box, cls), 2).view(B, self.a * self.k, H, W)


#: Strides the neck always fuses (up to the head's coarsest level), whatever levels the head has:
#: a single stride-32 head (YOLOv1, YOLOv2) then reads the stride-32 output of FPN + PAN over
#: 8/16/32, as YOLOv2's passthrough layer brings finer features to its one level, instead of a
#: lone 1x1 conv on the backbone (on which it barely learned: AP50 0.007 with YOLOv3's recipe on
#: the easy synthetic set; tests/test_presets_learn.py).
NECK_STRIDES = (8, 16, 32)


class Detector(nn.Module):
    """Backbone + neck + one head per level with ``A_l * K`` outputs per cell.

    The neck runs over the head's strides plus :data:`NECK_STRIDES` (up to the coarsest head
    stride), and the heads read the levels they predict at; for the three- and five-level presets
    the two sets are the same.
    """

    def __init__(self, layout: AnchorLayout, recipe: LossRecipe, num_classes: int, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.strides = layout.strides
        self.anchors_per_level = layout.anchors_per_level
        self.k = recipe.head_channels(num_classes)
        fused = tuple(sorted(set(self.strides) | {s for s in NECK_STRIDES if s <= max(self.strides)}))
        self._head_levels = [fused.index(s) for s in self.strides]  # which neck outputs the heads read
        self.backbone = Backbone(fused, config.width, config.depth)
        c = config.neck_channels or max(32, _ch(256 * config.width))
        self.neck = Neck([self.backbone.out_channels[s] for s in fused], c, config.depth)
        n_box = 4 + int(recipe.has_objectness)
        self.heads = nn.ModuleList(Head(c, a, self.k, n_box, config.head, config.head_width)
                                   for a in self.anchors_per_level)
        self._init_bias(recipe, num_classes)

    @torch.no_grad()
    def _init_bias(self, recipe: LossRecipe, num_classes: int) -> None:
        """Prior-probability bias initialisation (Lin et al. 2017, sec. 4.1): every anchor starts
        at ``p(object) = PRIOR_PROB``, through its objectness logit (log-loss objectness), or its
        class logits (sigmoid heads), or its background logit (softmax heads). Squared-error
        objectness starts at p = 0.5 (YOLOv2 on the quickstart set, 7 epochs: AP 0.001 at
        p = 0.01, 0.010 at 0.5). With objectness, the class logits start at YOLOv5's
        ``log(0.6 / (C - 0.99))`` (``_initialize_biases``).

        Not YOLOv5's objectness ``log(8 / (640 / stride)^2)``: it assumes a 640 px input; at
        160 px it starts the anchors at p = 0.02 (stride 8) to 0.32 (stride 32), ~20x the rate of
        positives there, and the flood of negatives' loss stalls learning (tiny YOLOv3 on the
        quickstart set, fitted anchors, 10 epochs: AP 0.255 and 0.173 for seeds 0 and 1 with it,
        0.405 and 0.398 with ``PRIOR_PROB``).
        """
        prior_logit = math.log(PRIOR_PROB / (1 - PRIOR_PROB))
        for head, a in zip(self.heads, self.anchors_per_level):
            b = torch.zeros(a, self.k)  # [A, K]: 4 box offsets stay 0
            if recipe.has_objectness:
                # squared error on sigmoid(obj) has a gradient of 2 (p - t) p (1 - p): 25x weaker at
                # p = 0.01 than at 0.5, so MSE objectness (YOLOv1, YOLOv2) keeps darknet's zero bias
                b[:, 4] = 0.0 if recipe.obj_loss == "mse" else prior_logit
                b[:, 5:] = math.log(0.6 / max(num_classes - 0.99, 0.01))
            elif recipe.background_class:
                b[:, 4] = math.log((1 - PRIOR_PROB) / PRIOR_PROB * num_classes)  # softmax: p(background) = 1 - PRIOR_PROB
            else:
                b[:, 4:] = prior_logit
            head.init_output(b, 0.1)

    def forward(self, images: Tensor) -> Tensor:
        """``Tensor[B, 3, S, S] -> Tensor[B, N, K]``."""
        fused = self.neck(self.backbone(images))
        outs = []
        for i, head, a in zip(self._head_levels, self.heads, self.anchors_per_level):
            f = fused[i]  # [B, c, H, W] at this head's stride
            y = head(f)  # [B, A*K, H, W]
            B, _, H, W = y.shape
            outs.append(y.view(B, a, self.k, H, W).permute(0, 3, 4, 1, 2).reshape(B, H * W * a, self.k))
        return torch.cat(outs, 1)  # [B, N, K]


def build_model(recipe: LossRecipe, layout: AnchorLayout, num_classes: int, config: ModelConfig = ModelConfig()) -> Detector:
    return Detector(layout, recipe, num_classes, config)
