"""Training progress where the user looks: a line per log interval in logs, a live bar on a terminal.

Rank 0 of the training loop produces one progress record per log interval (step / total, images/s,
reconstruction MSE, ETA). Where it goes depends on the driver (the process that called ``fit()``):

* driver stdout is not a terminal (``ray job logs -f``, CI, a log file): rank 0 prints ``progress_line``,
  which Ray streams to the driver's output -- one line per interval;
* driver stdout is a terminal: the driver passes a ``ray.util.queue.Queue`` to the workers; rank 0 puts
  each record there instead of printing, and a driver thread draws a ``tqdm`` bar from them.

``SPARSEGEN_PROGRESS_BAR=1`` forces the bar, ``=0`` forces lines.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import asdict, dataclass

PROGRESS_BAR_ENV = "SPARSEGEN_PROGRESS_BAR"


@dataclass
class Progress:
    step: int
    total_steps: int
    images_per_s: float
    reconstruction_mse: float
    eta_s: float


def make_progress(step: int, total_steps: int, logged: dict[str, float], elapsed_s: float, steps_done: int,
                  budget_s: float | None = None) -> Progress:
    """The record of one log interval; ETA at this run's average step time so far, at most what is left of a
    wall-clock budget (``training.max_train_minutes``) when there is one."""
    eta_s = elapsed_s / max(steps_done, 1) * max(total_steps - step, 0)
    if budget_s is not None:
        eta_s = min(eta_s, max(budget_s - elapsed_s, 0.0))
    return Progress(step=step, total_steps=total_steps, images_per_s=float(logged.get("images_per_s", float("nan"))),
                    reconstruction_mse=float(logged.get("reconstruction_mse", float("nan"))), eta_s=eta_s)


def format_eta(eta_s: float) -> str:
    minutes, seconds = divmod(int(round(eta_s)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def progress_line(progress: Progress) -> str:
    """One line for the console and ``ray job logs -f``."""
    return (f"[sparsegen] step {progress.step}/{progress.total_steps} "
            f"({100 * progress.step / max(progress.total_steps, 1):.0f}%) | {progress.images_per_s:.1f} images/s | "
            f"reconstruction MSE {progress.reconstruction_mse:.4f} | ETA {format_eta(progress.eta_s)}")


def console(line: str) -> None:
    """One line from a Train worker to the driver's console, once. Ray Train patches ``print`` in its
    workers: a print to a wrapped ``sys.stdout`` goes both to the original stream and to Train's logger
    (stderr), so the driver showed every line twice. Printing to the process's own stdout sends it once."""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def bar_wanted(stream=None) -> bool:
    """A bar when the driver's stdout is a terminal, unless ``SPARSEGEN_PROGRESS_BAR`` says otherwise."""
    forced = os.environ.get(PROGRESS_BAR_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def send(queue, progress: Progress) -> None:
    """Rank 0's side: never blocks training (a full queue drops the record; the next one follows)."""
    try:
        queue.put_nowait(asdict(progress))
    except Exception:  # noqa: BLE001 - Full, or the driver's queue actor is gone: progress is best effort
        pass


class ProgressBar:
    """The driver's side: a ``tqdm`` bar fed by the workers' records through ``queue``."""

    def __init__(self, description: str = "training", file=None):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=64, actor_options={"num_cpus": 0})
        self._description = description
        self._file = file
        self._stop = threading.Event()
        self.bar = None
        self.records = 0
        self._thread = threading.Thread(target=self._run, name="sparsegen-progress-bar", daemon=True)
        self._thread.start()

    def _update(self, record: dict) -> None:
        from tqdm import tqdm

        progress = Progress(**record)
        if self.bar is None:
            self.bar = tqdm(total=progress.total_steps, desc=self._description, unit="step", file=self._file,
                            dynamic_ncols=True)
        self.bar.total = progress.total_steps
        self.bar.update(progress.step - self.bar.n)
        self.bar.set_postfix_str(f"{progress.images_per_s:.1f} images/s, MSE {progress.reconstruction_mse:.4f}, "
                                 f"ETA {format_eta(progress.eta_s)}", refresh=True)
        self.records += 1

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                record = self.queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone
                return
            self._update(record)

    def close(self) -> None:
        """Draw what is still queued, then stop. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5.0)
        try:
            while not self.queue.empty():
                self._update(self.queue.get_nowait())
        except Exception:  # noqa: BLE001
            pass
        if self.bar is not None:
            self.bar.close()
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            pass
