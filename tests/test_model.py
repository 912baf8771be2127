"""The compressed U-Net and its loss."""

import torch
from torch import nn

from cellseg.loss import weighted_cross_entropy
from cellseg.model import UNet, predict_logits


def test_shapes_for_any_input_size():
    net = UNet(depth=2, base_channels=8).eval()
    for h, w in [(64, 64), (37, 50), (5, 9)]:
        assert predict_logits(net, torch.rand(2, 1, h, w)).shape == (2, 3, h, w)


def test_batch_norm_before_every_activation_and_linear_head():
    net = UNet(depth=3, base_channels=8)
    mods = list(net.modules())
    for i, m in enumerate(mods):
        if isinstance(m, nn.ReLU):
            assert isinstance(mods[i - 1], nn.BatchNorm2d)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # the last two convolutions are the linear head: no BN/ReLU after them
    assert list(net.head) == convs[-2:]
    assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm2d)) for m in net.head)
    assert convs[-1].out_channels == 3


def test_depth_and_width_configurable():
    small = UNet(depth=2, base_channels=32)  # the original method: 32/64/128
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert max(widths) == 128 and small.size_multiple == 4


def test_weighted_cross_entropy_weights_pixels():
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    w = torch.ones(1, 2, 2)
    base = weighted_cross_entropy(logits, target, w)
    assert torch.isclose(base, torch.log(torch.tensor(3.0)))
    w2 = w.clone()
    w2[0, 0, 0] = 5
    assert torch.isclose(weighted_cross_entropy(logits, target, w2), base * 8 / 4)


def test_trains_on_one_batch():
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=8)
    x = torch.rand(2, 1, 32, 32)
    y = (x[:, 0] > 0.5).long()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = weighted_cross_entropy(net(x), y, torch.ones_like(x[:, 0]))
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 0.5 * first
