"""Figures: learning curves (progress.png) and validation overlays. Matplotlib, no display."""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi


@functools.cache
def pyplot():
    """matplotlib.pyplot, imported on first use and switched to the Agg backend (no display) then,
    once, as importing this module did before: the overlays of `infer` need no matplotlib, which
    takes 0.4 s to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preload() -> None:
    """Load now what the first saved figure would load (pyplot, Agg's C extension, PIL's image
    plugins): an interrupt that lands in the first import of a C extension can abort the interpreter."""
    pyplot()
    import matplotlib.backends.backend_agg  # noqa: F401
    from PIL import Image, features  # noqa: F401

    Image.preinit()


def learning_curves(history: list[dict], path: str, switch_epoch: int | None = None) -> None:
    """Loss, IoU/SEG/mAP and learning rate per epoch, with the curriculum switch marked."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        (axes[0], ["train_loss", "val_loss"], "loss"),
        (axes[1], ["val_iou", "val_seg", "val_map"], "validation score"),
        (axes[2], ["lr"], "learning rate"),
    ]
    for ax, keys, title in panels:
        for k in keys:
            ax.plot(epochs, [h.get(k, np.nan) for h in history], marker=".", label=k)
        if switch_epoch is not None:
            ax.axvline(switch_epoch, color="grey", ls="--", label="elastic on")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def contours(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of an object that touch another label or the background."""
    lab = labels.astype(np.int64)
    mx = ndi.maximum_filter(lab, size=3, mode="nearest")
    mn = ndi.minimum_filter(lab, size=3, mode="nearest")
    return (lab > 0) & ((mx != lab) | (mn != lab))


def overlay_rgb(image: np.ndarray, labels: np.ndarray, color=(255, 64, 0)) -> np.ndarray:
    """(H, W, 3) uint8: the normalised image in grey with object contours in `color`."""
    img = np.clip(np.nan_to_num(image), 0, 1)
    rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)
    rgb[contours(labels)] = color
    return rgb


def validation_overlay(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str, title: str = "") -> None:
    """A figure of (stem, image, ground truth, prediction) rows: image | truth | prediction."""
    plt = pyplot()
    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 3, figsize=(10, 3.4 * n), squeeze=False)
    for r, (stem, image, gt, pred) in enumerate(rows):
        for c, (lab, name, color) in enumerate([(None, "image", None), (gt, "ground truth", (0, 200, 0)), (pred, "prediction", (255, 64, 0))]):
            ax = axes[r, c]
            ax.imshow(np.clip(image, 0, 1), cmap="gray") if lab is None else ax.imshow(overlay_rgb(image, lab, color))
            ax.set_title(f"{stem[:16]} {name}" if c == 0 else name, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
