"""Population-based training (``--scheduler pbt``) over Ray Train runs.

PBT exploits by restarting a weak trial from a strong trial's *Tune* checkpoint with perturbed
hyperparameters. Trials are Ray Train drivers, so the pieces are:

* **Every Train checkpoint becomes a Tune checkpoint.** The trial's report relay
  (``pipeline.tuning.relay``: a public ``ray.train.UserCallback`` in the Train controller, a queue, a thread
  of the trial process) hands each Train report to ``PointerReporter``, which reports it as
  ``ray.tune.report(metrics, checkpoint=...)`` whose checkpoint is a tiny directory holding a pointer file
  (``POINTER_FILE``: the Train checkpoint's URI, its Train run, the trial). The weights stay where Ray Train
  wrote them; nothing is copied at every checkpoint. The run's last checkpoint (its last step) is reported
  without a Tune checkpoint: a trial exploiting it would have nothing left to train.
* **PBT's clock counts Train checkpoints.** Each relayed report carries ``PBT_TIME_KEY`` (the step in units
  of ``run.checkpoint_every_steps``), PBT's ``time_attr``; the trial's final result (end-of-training metrics)
  carries none, so PBT never takes it for a perturbation point (results without ``time_attr`` are none:
  ``require_attrs=False``) and never restarts a finished trial.
* **A restarted trial starts from the pointer** (``plan_start``). Its own pointer (a trial restarted after a
  failure, or a restored search) continues its own Train run (Ray Train resumes that run's latest checkpoint). Another
  trial's pointer (an exploit) starts a *fresh* Train run named ``<search>-<trial_id>-pbt<hash>`` (the
  hash of the donor checkpoint and the new config: the same exploit re-run after an interruption finds
  its run again; a new exploit never resumes an old run) from a private copy of the donor's checkpoint
  (``<storage>/pbt-seeds/<run>``), taken at once because the donor keeps rotating its own checkpoints
  (``run.checkpoints_to_keep``); if the pointed checkpoint is already gone, the donor run's newest one is
  used (the newest before the trial's last step; none: the trial keeps its own Train run). With fast
  checkpoints and the default ``run.checkpoints_to_keep: 2`` that fallback is the rule, not the exception.
* **One MLflow child run per trial.** ``train()`` finds its MLflow run by the tag ``sparsegen.run_name``;
  before a fresh Train run ``pipeline.tuning.runs.attach_pbt_start`` re-tags the trial's child run with the
  new Train run's name and records the exploit, so the trial keeps logging into its one child run.
* **No pausing in turns**: asynchronous PBT pauses a trial at a perturbation point whenever another one
  waits, to share resources in turns; pausing a Train driver kills its Train run, so ``TrainRunPBT`` lets
  it run on (the one decision it changes, through the public scheduler interface). A population larger than
  ``--max-concurrent`` runs in waves and exploits happen among the trials running together.
* **What may be perturbed**: any searched key except those that change parameter shapes or the latent
  bank (``SHAPE_KEYS``: copying weights between such trials cannot work); ``check_space`` refuses them
  before Ray starts. Choices mutate by shifting to a neighbouring value (or resampling); ranges by x0.8 /
  x1.2 (or resampling), clamped to the space's bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Any

from pipeline.tuning.settings import CHECKPOINT_PATH_KEY, SchedulerOptions, StartPlan, plain_config

POINTER_FILE = "sparsegen-train-checkpoint.json"
SEEDS_DIR = "pbt-seeds"
DEFAULT_PERTURBATION_INTERVAL = 2
# PBT's time_attr: the Train step in units of run.checkpoint_every_steps (perturbation_interval and
# burn_in_period count Train checkpoints). Only relayed Train reports carry it.
PBT_TIME_KEY = "pbt_checkpoints"
# Keys that change parameter shapes (generator or critic) or the latent bank's size: a trial cannot load
# another trial's checkpoint when these differ.
SHAPE_KEYS = (
    "model.resolution", "model.latent_dim", "model.fc_channels", "model.first_layer", "model.cell_channels",
    "model.widths", "model.convs_per_block", "model.critic_widths", "model.critic_first_width",
    "model.critic_convs_per_block", "data.demo_images", "data.limit", "data.holdout_fraction",
)


class NothingToExploit(LookupError):
    """The donor has no checkpoint left that ends before this trial's last step."""


def total_steps(step: int, epoch: float, max_steps: int | None, epochs: float) -> int | None:
    """A run's last step, as the training loop computes it (steps per epoch read off a report)."""
    if max_steps:
        return int(max_steps)
    if not epoch:
        return None
    return math.ceil(epochs * round(step / epoch))


# ---------------------------------------------------------------------------------------------------
# Validation and the scheduler (driver side)


def check_space(space) -> list[str]:
    """Problems that make a space unusable for PBT (empty: fine)."""
    problems = []
    for p in space.parameters:
        if p.kind == "value":
            continue
        if any(p.key == k or p.key.startswith(k + ".") for k in SHAPE_KEYS):
            problems.append(
                f"parameters.{p.key}: scheduler pbt cannot search a key that changes parameter shapes or the "
                f"latent bank (PBT copies weights and latents between trials); fix it with 'set' or use asha/none")
    if not any(p.kind != "value" for p in space.parameters):
        problems.append("scheduler pbt: no parameter to perturb (every parameter is a constant 'value')")
    return problems


def mutations(space) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: choices -> lists, ranges -> Tune domains (constants are left out)."""
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.parameters:
        if p.kind == "choice":
            out[p.key] = list(p.args)
        elif p.kind == "uniform":
            out[p.key] = tune.uniform(float(p.args[0]), float(p.args[1]))
        elif p.kind == "loguniform":
            out[p.key] = tune.loguniform(float(p.args[0]), float(p.args[1]))
        elif p.kind == "randint":
            out[p.key] = tune.randint(int(p.args[0]), int(p.args[1]) + 1)
    return out


def clamp_to_space(space):
    """PBT's ``custom_explore_fn``: perturbed ranges (x0.8 / x1.2) stay inside the space's bounds."""
    bounds = {p.key: (p.kind, p.args) for p in space.parameters if p.kind in ("uniform", "loguniform", "randint")}

    def explore(config: dict) -> dict:
        for key, (kind, (lo, hi)) in bounds.items():
            if key not in config:
                continue
            value = min(max(float(config[key]), float(lo)), float(hi))
            config[key] = int(round(value)) if kind == "randint" else value
        return config

    return explore


def _pbt_base():
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining


class TrainRunPBT(_pbt_base()):
    """Asynchronous ``PopulationBasedTraining`` whose trials are never paused to take turns.

    Asynchronous PBT answers PAUSE at a perturbation point whenever another trial waits (PENDING, or PAUSED
    while an exploit restarts it), to share resources in turns; an exploited trial gets NOOP (PBT paused it
    itself). Pausing a Train driver kills its Train run (a restart costs a worker-group start), so that
    PAUSE becomes CONTINUE: trials run to the end and waiting trials start when one finishes. Everything
    else is PBT's own, through ``TrialScheduler.on_trial_result``, the public scheduler interface."""

    def __init__(self, **kwargs):
        super().__init__(synch=False, **kwargs)

    def on_trial_result(self, tune_controller, trial, result):
        from ray.tune.schedulers import TrialScheduler

        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if decision == TrialScheduler.PAUSE else decision


def make_scheduler(options: SchedulerOptions, space) -> TrainRunPBT:
    """PBT on the relayed Train reports (one per Train checkpoint; clock ``PBT_TIME_KEY``)."""
    return TrainRunPBT(
        time_attr=PBT_TIME_KEY, metric=options.metric, mode=options.mode,
        perturbation_interval=float(options.get("perturbation_interval", DEFAULT_PERTURBATION_INTERVAL)),
        burn_in_period=float(options.get("burn_in_period", 0)),
        quantile_fraction=float(options.get("quantile_fraction", 0.25)),
        resample_probability=float(options.get("resample_probability", 0.25)),
        hyperparam_mutations=mutations(space), custom_explore_fn=clamp_to_space(space),
        # Results without the clock (the final one) or the metric (reports of ranks other than 0 may lack
        # holdout_mse_pm1) are simply no perturbation point.
        require_attrs=False,
    )


# ---------------------------------------------------------------------------------------------------
# Train -> Tune checkpoints (trial side)


class PointerReporter:
    """``to_tune`` of the trial's report relay under PBT: each Train report -> ``ray.tune.report`` with
    ``PBT_TIME_KEY`` and, unless it is the run's last step, a Tune checkpoint holding a pointer file."""

    def __init__(self, trial_id: str, train_run: str, storage: str, checkpoint_every_steps: int,
                 max_steps: int | None = None, epochs: float = 0.0):
        self.trial_id, self.train_run, self.storage = trial_id, train_run, storage
        self.checkpoint_every_steps = max(1, int(checkpoint_every_steps))
        self.max_steps, self.epochs = max_steps, epochs

    def __call__(self, metrics: dict) -> None:
        import ray.tune

        path = metrics.get(CHECKPOINT_PATH_KEY)
        step, epoch = int(metrics.get("step") or 0), float(metrics.get("epoch") or 0.0)
        metrics = {**metrics, PBT_TIME_KEY: step / self.checkpoint_every_steps}
        last = total_steps(step, epoch, self.max_steps, self.epochs)
        if not path or (last is not None and step >= last):
            # The run's last checkpoint is no Tune checkpoint: a trial exploiting it would have nothing left
            # to train (PBT skips donors without a checkpoint).
            ray.tune.report(metrics)
            return
        uri = ("s3://" + path.removeprefix("s3://")) if self.storage.startswith("s3://") else path
        pointer = {"train_checkpoint": uri, "train_run_dir": uri.rstrip("/").rsplit("/", 1)[0],
                   "train_run": self.train_run, "trial_id": self.trial_id, "step": step, "epoch": epoch,
                   "total_steps": last}
        with tempfile.TemporaryDirectory(prefix="sparsegen-pointer-") as directory:
            with open(os.path.join(directory, POINTER_FILE), "w") as handle:
                json.dump(pointer, handle, indent=1)
            # Persisted (copied into the trial's Tune storage) before report returns.
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory))


# ---------------------------------------------------------------------------------------------------
# Starting (or restarting) a trial


def read_pointer(checkpoint) -> dict | None:
    """The pointer inside a Tune checkpoint written by ``CheckpointPump`` (None: not one of ours)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = os.path.join(directory, POINTER_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)


def plan_start(pointer: dict | None, trial_id: str, base_name: str, config: dict, storage: str,
               max_steps: int | None = None, epochs: float = 0.0) -> StartPlan:
    """Where a trial starts (see ``StartPlan``).

    Raises ``NothingToExploit`` when an exploit's donor has no checkpoint before this trial's last step
    (``max_steps`` / ``epochs``: this trial's own, possibly perturbed, length)."""
    if pointer is None:
        return StartPlan(train_run=base_name)
    if pointer.get("trial_id") == trial_id:
        # Its own checkpoint (a restart after a failure, or a restored search): continue its own Train run,
        # which Ray Train resumes from its latest checkpoint (the pointed one is the fallback).
        return StartPlan(train_run=pointer["train_run"], resume_from=pointer["train_checkpoint"], pointer=pointer)
    digest = hashlib.sha1(json.dumps([pointer["train_checkpoint"], plain_config(config)], sort_keys=True,
                                     default=str).encode()).hexdigest()[:8]
    train_run = f"{base_name}-pbt{digest}"
    end = total_steps(int(pointer.get("step") or 0), float(pointer.get("epoch") or 0.0), max_steps, epochs)
    seed = seed_checkpoint(pointer, storage, train_run, end)
    return StartPlan(train_run=train_run, resume_from=seed, donor=pointer["trial_id"], pointer=pointer,
                     seed_step=_checkpoint_step(seed))


def _checkpoint_step(uri: str) -> int:
    from pipeline.data import storage as store
    from pipeline.distributed.checkpoint import META_FILE

    try:
        return int(json.loads(store.read_bytes(store.join(uri, META_FILE))).get("step", 0))
    except (OSError, ValueError):
        return 0


def seed_checkpoint(pointer: dict, storage: str, train_run: str, end: int | None = None, attempts: int = 5) -> str:
    """A private copy of the donor's checkpoint at ``<storage>/pbt-seeds/<train_run>`` (kept when present).

    When the pointed checkpoint is gone (the donor rotated it away), the donor run's newest checkpoint
    before step ``end`` is copied instead."""
    from pipeline.data import storage as store
    from pipeline.distributed.checkpoint import META_FILE, copy_checkpoint

    target = store.join(storage, SEEDS_DIR, train_run)
    if store.exists(store.join(target, META_FILE)):  # meta.json is copied last: the copy is complete
        return target
    last_error: Exception | None = None
    for _ in range(attempts):
        source = pointer["train_checkpoint"]
        if end is not None and int(pointer.get("step") or 0) >= end:
            raise NothingToExploit(f"the donor checkpoint (step {pointer.get('step')}) is at or past step {end}")
        if not store.exists(store.join(source, META_FILE)):
            source = newest_checkpoint(pointer["train_run_dir"], before=end)
            if source is None:
                raise NothingToExploit(f"the donor run {pointer['train_run_dir']} has no checkpoint before step {end}")
            print(f"[sparsegen] pbt: donor checkpoint {pointer['train_checkpoint']} was rotated away; "
                  f"using the donor run's newest checkpoint {source}", flush=True)
        try:
            return copy_checkpoint(source, target)  # every file the checkpoint lists, meta.json last
        except FileNotFoundError as exc:  # deleted while copying: take the newest one again
            last_error = exc
    raise RuntimeError(f"pbt: could not copy the donor checkpoint {pointer['train_checkpoint']} "
                       f"(nor a newer one of its run {pointer['train_run_dir']}): {last_error}")


def newest_checkpoint(run_dir: str, before: int | None = None) -> str | None:
    """The Ray Train checkpoint of ``run_dir`` with the highest step (below ``before``; complete ones only)."""
    from pipeline.data import storage as store
    from pipeline.distributed.checkpoint import META_FILE

    best, best_step = None, -1
    for name in store.list_dir(run_dir):
        if not name.startswith("checkpoint_") or name.endswith(".json"):  # not checkpoint_manager_snapshot.json
            continue
        try:
            meta = json.loads(store.read_bytes(store.join(run_dir, name, META_FILE)))
        except (OSError, ValueError):  # not a checkpoint directory, or being deleted
            continue
        if before is not None and int(meta.get("step", -1)) >= before:
            continue
        if int(meta.get("step", -1)) > best_step:
            best, best_step = store.join(run_dir, name), int(meta.get("step", -1))
    return best
