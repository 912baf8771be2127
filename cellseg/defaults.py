"""Tiling defaults of `cellseg infer`, `evaluate`, `tune` and serving, chosen by `make bench`.

Tiles are shrunk per image to the smallest that need no more of them (`inference.balanced_tile`),
so a larger maximum wastes no pixels on small images and fewer tile seams on large ones; on the
CPU, per-pixel speed hardly depends on the batch, and a small batch keeps onnxruntime's memory
low. A GPU wants larger batches: pass --batch-size 16 or more. (Kept apart from `inference` so the
CLI reads them without importing numpy.)
"""

DEFAULT_TILE = 768
DEFAULT_BATCH = 1
