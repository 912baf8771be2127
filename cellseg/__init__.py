"""cellseg: compact U-Net segmentation of cells and nuclei, tracked in MLflow, served through ONNX."""

__version__ = "0.1.0"

from cellseg.errors import CellsegError

__all__ = ["CellsegError", "__version__"]
