"""The shared detector: head layout per preset, bias initialisation, and every preset overfits a batch."""

import math

import pytest
import torch

from ablate.detect import PRESETS, Targets, build_criterion, build_priors, get_layout, preset
from ablate.detect.model import ModelConfig, build_model
from ablate.train import lr_lambda, param_groups
from ablate.config import TrainConfig

TINY = ModelConfig(width=0.125, depth=0.33)


@pytest.mark.parametrize("name", list(PRESETS))
def test_output_rows_follow_the_priors(name):
    r = preset(name)
    layout = get_layout(r.anchors)
    model = build_model(r, layout, 3, TINY).eval()
    out = model(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, build_priors(layout, 96).num, r.head_channels(3))


def test_row_order_is_level_y_x_anchor():
    r = preset("yolov3")
    layout = get_layout(r.anchors)
    model = build_model(r, layout, 2, TINY).eval()
    priors = build_priors(layout, 64)
    captured = {}
    head = model.heads[1]
    head.register_forward_hook(lambda m, i, o: captured.setdefault("raw", o))
    out = model(torch.randn(1, 3, 64, 64))
    raw = captured["raw"]  # [1, A*K, H, W] of level 1
    K = r.head_channels(2)
    y, x, a = 2, 1, 2
    n = priors.level_offsets[1] + (y * priors.level_shapes[1][1] + x) * 3 + a
    assert torch.allclose(out[0, n], raw[0, a * K:(a + 1) * K, y, x])


@pytest.mark.parametrize("head", ["coupled", "decoupled"])
def test_bias_initialisation_by_prior_probability(head):
    cfg = ModelConfig(width=0.125, depth=0.33, head=head)
    m = build_model(preset("retinanet"), get_layout("retinanet"), 4, cfg)
    b = m.heads[0].output_bias()  # [9 anchors, 4 box + 4 classes]
    assert torch.allclose(torch.sigmoid(b[:, 4:]), torch.full((9, 4), 0.01), atol=1e-6)
    assert (b[:, :4] == 0).all()
    ssd = build_model(preset("ssd"), get_layout("ssd"), 4, cfg)
    logits = ssd.heads[0].output_bias()[:, 4:]  # [4, 1 background + 4]
    assert torch.allclose(torch.softmax(logits, -1)[:, 0], torch.full((4,), 0.99), atol=1e-4)
    y3 = build_model(preset("yolov3"), get_layout("yolov3"), 4, cfg)
    obj = y3.heads[0].output_bias()[:, 4]
    assert torch.allclose(torch.sigmoid(obj), torch.full((3,), 0.01))  # every level, whatever the input size
    y2 = build_model(preset("yolov2"), get_layout("yolov2"), 4, cfg)  # squared-error objectness: p = 0.5
    assert (y2.heads[0].output_bias()[:, 4] == 0).all()
    # a zero feature map gives exactly the biases (eval BN of 0 is 0, SiLU(0) = 0), anchor-major
    # as the row order needs: channel a * K + j is anchor a's output j, in both head kinds
    head = y3.heads[0].eval()
    out = head(torch.zeros(1, head.branches[0][0][0].in_channels, 2, 2))  # [1, A*K, 2, 2]
    assert torch.equal(out[0, :, 1, 1].view(3, 9), head.output_bias())


def test_no_weight_decay_on_norms_and_biases():
    m = build_model(preset("yolov3"), get_layout("yolov3"), 2, TINY)
    decay, no_decay = param_groups(m, 0.05)
    assert all(p.ndim == 4 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_lr_schedule_warmup_cosine_and_step():
    f = lr_lambda(TrainConfig(schedule="cosine", min_lr_ratio=0.05), total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.05)
    assert f(55) == pytest.approx(0.05 + 0.95 * 0.5)
    g = lr_lambda(TrainConfig(schedule="step", milestones=(0.5, 0.75)), total_steps=110, warmup_steps=10)
    assert g(20) == 1.0 and g(61) == pytest.approx(0.1) and g(90) == pytest.approx(0.01)


def _fixed_batch(gen, S=64, C=3):
    """Four grey images with coloured rectangles where the ground truths are."""
    imgs = torch.rand(4, 3, S, S, generator=gen) * 0.2 + 0.4
    boxes, labels = [], []
    for i in range(4):
        wh = torch.rand(i + 1, 2, generator=gen) * 24 + 8
        xy = torch.rand(i + 1, 2, generator=gen) * (S - wh)
        b = torch.cat((xy, xy + wh), 1)
        lab = torch.randint(0, C, (i + 1,), generator=gen)
        for bb, ll in zip(b.long(), lab):
            imgs[i, ll, bb[1]:bb[3], bb[0]:bb[2]] = 1.0
        boxes.append(b)
        labels.append(lab)
    return imgs, Targets.from_lists(boxes, labels)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_overfits_one_fixed_batch(name):
    """The gradients of every recipe reach the network: the total loss at least halves."""
    torch.manual_seed(0)
    imgs, targets = _fixed_batch(torch.Generator().manual_seed(0))
    r = preset(name)
    model = build_model(r, get_layout(r.anchors), 3, TINY)
    crit = build_criterion(r, 3, 64)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-3)
    losses, box = [], []
    for _ in range(150):
        out = crit(model(imgs), targets)
        box.append(out.losses["box"].item())
        opt.zero_grad()
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(out.total.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-10:]) < 0.5 * losses[0], (losses[0], losses[-10:])
    assert min(box[-10:]) < 0.5 * box[0], (box[0], box[-10:])  # the box term itself is learned


def test_ema_moves_floats_towards_the_model_and_copies_counters():
    import copy

    from ablate.train import ModelEMA

    model = build_model(preset("yolov3"), get_layout("yolov3"), 2, TINY)
    ema = ModelEMA(model, decay=0.9)
    before = copy.deepcopy(ema.module.state_dict())
    model.train()
    model(torch.rand(2, 3, 64, 64))  # BatchNorm statistics and counters move
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for step in (1, 2):
        ema.update(model)
        d = 0.9 * (1 - math.exp(-step / 2000))  # YOLOv5's ramp
        now = model.state_dict()
        for k, v in ema.module.state_dict().items():
            want = before[k] * d + now[k] * (1 - d) if v.dtype.is_floating_point else now[k]
            assert torch.allclose(v, want, atol=1e-6), k
        before = copy.deepcopy(ema.module.state_dict())
    assert ema.module.state_dict()["backbone.stem.1.num_batches_tracked"] == 1
