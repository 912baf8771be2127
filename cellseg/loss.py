"""Weighted cross-entropy of the U-Net paper: mean over pixels of w(x) * CE(x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of w * CE over all pixels.

    Args:
        logits: (N, C, H, W) float.
        target: (N, H, W) int64 class indices.
        weight: (N, H, W) float per-pixel weights (the U-Net weight map).
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weight).mean()
