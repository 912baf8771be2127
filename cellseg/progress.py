"""Rich progress for training epochs; silent in quiet mode."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class EpochProgress:
    """A bar per epoch with the running loss, and one summary line per finished epoch."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._loss_sum = 0.0
        self._n = 0

    def __enter__(self):
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, epoch: int, epochs: int, steps: int):
        self._loss_sum, self._n = 0.0, 0
        if self._progress is None:
            return None
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task("train", total=steps, epoch=f"{epoch}/{epochs}", loss=float("nan"))
        return self._task

    def advance(self, task, loss: float) -> None:
        self._loss_sum += loss
        self._n += 1
        if self._progress is not None and task is not None:
            self._progress.update(task, advance=1, loss=self._loss_sum / self._n)

    def epoch_done(self, m: dict, is_best: bool, switched: bool) -> None:
        if not self.enabled:
            return
        flags = (" [green]best[/]" if is_best else "") + (" [yellow]elastic on[/]" if switched else "")
        console.print(
            f"epoch {m['epoch']:>3}  loss {m['train_loss']:.4f}/{m['val_loss']:.4f}  "
            f"IoU {m['val_iou']:.3f}  SEG {m['val_seg']:.3f}  mAP {m['val_map']:.3f}  "
            f"lr {m['lr']:.0e}  stage {m['curriculum_stage']}  {m['epoch_seconds']:.1f}s{flags}",
            soft_wrap=True,  # one line per epoch, also in a narrow terminal or a log file
        )
