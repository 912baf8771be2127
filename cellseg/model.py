"""The compressed U-Net: fewer levels and channels than Ronneberger et al. (2015).

The original method used 2 pooling levels with 32/64/128 channels; the default here is
3 levels from 32 channels (32/64/128/256). Every convolution is followed by batch norm and
then ReLU, except the last two convolutions, which are linear (no batch norm, no ReLU).
Input height and width must be multiples of 2**depth: `pad_to_multiple` does that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class TwoConv(nn.Sequential):
    """Two ConvBNReLU blocks."""

    def __init__(self, cin: int, cout: int):
        super().__init__(ConvBNReLU(cin, cout), ConvBNReLU(cout, cout))


class Down(nn.Sequential):
    """2x2 max pooling, then TwoConv."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.MaxPool2d(2), TwoConv(cin, cout))


class UpCat(nn.Module):
    """Upsample x2, 2x2 convolution (+BN+ReLU), concatenate the skip, TwoConv."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            # 2x2 'up-convolution' of the paper; asymmetric padding keeps the size
            nn.ZeroPad2d((0, 1, 0, 1)),
            nn.Conv2d(cin, cout, 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        self.conv = TwoConv(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Compressed U-Net: (N, in_channels, H, W) float -> (N, n_classes, H, W) logits."""

    def __init__(self, in_channels: int = 1, n_classes: int = 3, depth: int = 3, base_channels: int = 32):
        super().__init__()
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = TwoConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(UpCat(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth)))
        # the last two convolutions are linear
        self.head = nn.Sequential(
            nn.Conv2d(widths[0], widths[0], 3, padding=1),
            nn.Conv2d(widths[0], n_classes, 1),
        )

    @property
    def size_multiple(self) -> int:
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


def build_model(cfg) -> UNet:
    """UNet from a `cellseg.config.ModelConfig`."""
    return UNet(cfg.in_channels, cfg.n_classes, cfg.depth, cfg.base_channels)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right to multiples of `multiple`; returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        # reflect needs pad < size; fall back to replicate for tiny inputs
        m = mode if (ph < h and pw < w) else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=m)
    return x, (h, w)


def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits for inputs of any size: pad to the network's multiple, run, crop back."""
    multiple = getattr(model, "size_multiple", None) or getattr(getattr(model, "module", None), "size_multiple", 8)
    xp, (h, w) = pad_to_multiple(x, multiple)
    return model(xp)[..., :h, :w]
