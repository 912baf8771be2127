"""Validation during training: whole-image (or 2x2-region) prediction, loss and scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cellseg.data.dataset import Sample
from cellseg.data.targets import make_targets
from cellseg.loss import weighted_cross_entropy
from cellseg.metrics import aggregate, evaluate_image
from cellseg.model import predict_logits
from cellseg.postprocess import probabilities_to_instances


@dataclass
class ValItem:
    """A validation sample with its targets computed once."""

    sample: Sample
    classes: np.ndarray
    weights: np.ndarray


def prepare(samples: list[Sample], targets_cfg, class_weights=None) -> list[ValItem]:
    """Validation items, their weight maps built as the training crops' (`class_weights` for
    targets.class_balance "dataset")."""
    return [ValItem(s, *make_targets(s.labels, **targets_cfg.model_dump(), class_weights=class_weights)) for s in samples]


def _region_slices(h: int, w: int, tiles: int):
    if tiles == 1:
        return [(slice(0, h), slice(0, w))]
    ys, xs = (0, h // 2, h), (0, w // 2, w)
    return [(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])) for i in range(2) for j in range(2)]


@torch.no_grad()
def predict_logits_image(net: torch.nn.Module, image: np.ndarray, device: torch.device, tiles: int = 1) -> torch.Tensor:
    """(3, H, W) logits for an (H, W) image; with tiles=4 the 2x2 regions are predicted apart and stitched."""
    h, w = image.shape
    out = torch.empty((3, h, w), dtype=torch.float32)
    x_full = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    for sl in _region_slices(h, w, tiles):
        x = x_full[sl][None, None].to(device)
        out[(slice(None), *sl)] = predict_logits(net, x)[0].float().cpu()
    return out


@torch.no_grad()
def validate(net: torch.nn.Module, items: list[ValItem], device: torch.device, tiles: int = 1, keep: int = 3, postprocess: dict | None = None):
    """Scores over the validation items; `postprocess`: options of `probabilities_to_instances`
    (config section `postprocess`), its defaults when None.

    Returns (metrics dict with val_loss/val_iou/val_seg/val_map/val_ap50 (means over images) and val_f1
    (pooled over objects, `metrics.aggregate`),
    the first `keep` (stem, image, gt, prediction) rows for overlays).
    """
    was_training = net.training
    net.eval()
    rows, losses, shown = [], [], []
    for item in items:
        logits = predict_logits_image(net, item.sample.image, device, tiles)
        loss = weighted_cross_entropy(
            logits[None], torch.from_numpy(item.classes.astype(np.int64))[None], torch.from_numpy(item.weights)[None]
        )
        losses.append(float(loss))
        probs = torch.softmax(logits, dim=0).numpy()
        pred = probabilities_to_instances(probs, **(postprocess or {}))
        rows.append(evaluate_image(item.sample.labels, pred))
        if len(shown) < keep:
            shown.append((item.sample.stem, item.sample.image, item.sample.labels, pred))
    net.train(was_training)
    agg = aggregate(rows)
    metrics = {
        "val_loss": float(np.mean(losses)) if losses else float("nan"),
        "val_iou": agg["iou"],
        "val_seg": agg["seg"],
        "val_map": agg["map"],
        "val_ap50": agg["ap50"],
        "val_f1": agg["f1"],
    }
    return metrics, shown
