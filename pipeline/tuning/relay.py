"""Ray Train reports -> Ray Tune results, in order, then the trial's final result: the project's own relay.

A trial is a Tune *driver function* that fits a Ray Train run. Ray Train's controller (another actor) sees
every ``ray.train.report`` of the workers; Tune must see them as the trial's results (what ASHA and PBT act
on), followed by one final result after training and evaluation (``FINAL_KEY``). Through public APIs only:

* ``RelayCallback`` -- a ``ray.train.UserCallback`` run in the Train controller: each report's rank-0
  metrics (plus ``checkpoint_path``, the Train checkpoint's URI) go into a one-slot ``ray.util.queue.Queue``;
  the controller waits while the previous report has not been taken.
* ``ReportRelay`` -- a thread of the trial process takes each item and hands it to ``to_tune`` (default:
  ``ray.tune.report(metrics)``; under PBT ``pbt.PointerReporter`` adds a Tune checkpoint). ``finish(final)``
  delivers what is still queued, stops the thread, then reports ``final`` from the trial's own thread: every
  Train report reaches Tune before the final result, and no two reports race.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import ray.train
import ray.tune

from pipeline.tuning.settings import CHECKPOINT_PATH_KEY

_STOP = "__sparsegen_relay_stop__"


class RelayCallback(ray.train.UserCallback):
    """Runs in the Train controller: each report's rank-0 metrics and checkpoint URI -> the trial's relay."""

    def __init__(self, queue):
        self._queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._queue.put(item)  # blocks while the trial has not taken the previous report (one slot)


def report_to_tune(metrics: dict[str, Any]) -> None:
    ray.tune.report(metrics)


class ReportRelay:
    """The trial process's end of the relay (create it inside the Tune trainable)."""

    def __init__(self, to_tune: Callable[[dict[str, Any]], None] = report_to_tune):
        from ray.util.queue import Queue

        self._to_tune = to_tune
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.relayed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sparsegen-report-relay", daemon=True)
        self._thread.start()

    def callback(self) -> RelayCallback:
        """For the Train run's ``RunConfig(callbacks=[...])``."""
        return RelayCallback(self.queue)

    def finish(self, final: dict[str, Any]) -> None:
        """After training: deliver every queued Train report, then report ``final`` to Tune."""
        self.close()
        ray.tune.report(final)

    def close(self, timeout_s: float | None = 300.0) -> None:
        """Deliver what is queued, then stop (blocks until Tune took it all). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.queue.put(_STOP, timeout=timeout_s)
        except Exception:  # noqa: BLE001 - the queue actor is gone: nothing left to deliver
            pass
        self._thread.join(timeout_s)
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(block=True, timeout=1.0)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone: the trial is ending
                return
            if item == _STOP:
                return
            try:
                self._to_tune(item)
                self.relayed += 1
            except Exception as exc:  # noqa: BLE001 - keep draining, or the Train controller blocks on its next put
                print(f"[sparsegen] could not report a Train result to Tune: {exc!r}", flush=True)
