"""Population-based training (``--scheduler pbt``) over Ray Train runs.

PBT exploits by restarting a weak trial from a strong trial's *Tune* checkpoint with perturbed
hyperparameters. Trials are Ray Train drivers, so the pieces are:

* **Every Train checkpoint becomes a Tune checkpoint.** ``TuneCheckpointCallback`` (a Ray Train
  ``UserCallback``, run in the Train controller) hands each report's metrics and Train checkpoint path to
  the trial process through a one-slot Ray queue; ``CheckpointPump`` (a thread of the trial process) turns
  each into ``ray.tune.report(metrics, checkpoint=...)`` whose checkpoint is a tiny directory holding a
  pointer file (``POINTER_FILE``: the Train checkpoint's URI, its Train run, the trial). The weights stay
  where Ray Train wrote them; nothing is copied at every checkpoint. The run's last checkpoint (its last
  step) is reported without a Tune checkpoint: a trial exploiting it would have nothing left to train.
* **A restarted trial starts from the pointer** (``plan_start``). Its own pointer (a paused trial, or a
  restored search) continues its own Train run (Ray Train resumes that run's latest checkpoint). Another
  trial's pointer (an exploit) starts a *fresh* Train run named ``<search>-<trial_id>-pbt<hash>`` (the
  hash of the donor checkpoint and the new config: the same exploit re-run after an interruption finds
  its run again; a new exploit never resumes an old run) from a private copy of the donor's checkpoint
  (``<storage>/pbt-seeds/<run>``), taken at once because the donor keeps rotating its own checkpoints
  (``run.checkpoints_to_keep``); if the pointed checkpoint is already gone, the donor run's newest one is
  used (the newest before the trial's last step; none: the trial keeps its own Train run). With fast
  checkpoints and the default ``run.checkpoints_to_keep: 2`` that fallback is the rule, not the exception.
* **One MLflow child run per trial.** ``train()`` finds its MLflow run by the tag ``sparsegen.run_name``;
  before a fresh Train run the trial's child run (found by its search and trial tags) is re-tagged with the
  new Train run's name, so the trial keeps logging into its one child run. Exploits are recorded as the
  metric ``pbt_exploits`` (count, at the step the trial continues from), ``pbt.<key>`` metrics of the numeric searched
  values, and tags ``sparsegen.pbt_last_donor``, ``sparsegen.pbt_donor_checkpoint``, ``sparsegen.pbt_config``
  (the trial's current searched values, JSON) and ``sparsegen.pbt_train_run``. MLflow params stay the
  trial's initial values (params are immutable).
* **No pausing in turns**: asynchronous PBT would pause a trial at a perturbation point whenever another
  one waits; here trials run to the end instead (pausing kills the trial's Train run), so a population larger
  than ``--max-concurrent`` runs in waves and exploits happen among the trials running together.
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
import threading
from typing import Any

POINTER_FILE = "sparsegen-train-checkpoint.json"
SEEDS_DIR = "pbt-seeds"
EXPLOITS_METRIC = "pbt_exploits"
DONOR_TAG = "sparsegen.pbt_last_donor"
DONOR_CHECKPOINT_TAG = "sparsegen.pbt_donor_checkpoint"
CONFIG_TAG = "sparsegen.pbt_config"
TRAIN_RUN_TAG = "sparsegen.pbt_train_run"
DEFAULT_PERTURBATION_INTERVAL = 2
# Keys that change parameter shapes (generator or critic) or the latent bank's size: a trial cannot load
# another trial's checkpoint when these differ.
SHAPE_KEYS = (
    "model.resolution", "model.latent_dim", "model.fc_channels", "model.first_layer", "model.cell_channels",
    "model.widths", "model.convs_per_block", "model.critic_widths", "model.critic_first_width",
    "model.critic_convs_per_block", "data.demo_images", "data.limit", "data.holdout_fraction",
)
CHECKPOINT_PATH_KEY = "checkpoint_path"  # the metric TuneReportCallback reports too


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


def make_scheduler(options: dict, space, final_key: str):
    """``PopulationBasedTraining`` on Tune results (one per Train checkpoint), ignoring the final result."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    from ray.tune.experiment import Trial

    class TrainCheckpointPBT(PopulationBasedTraining):
        def on_trial_result(self, tune_controller, trial, result):
            # The result a trial adds after training (end-of-training metrics) is no perturbation point:
            # exploiting there would restart a finished trial.
            if result.get(final_key):
                return TrialScheduler.CONTINUE
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.PAUSE and trial.status != Trial.PAUSED and not self._synch:
                # Asynchronous PBT pauses a trial at a perturbation point whenever another one waits
                # (PENDING, or PAUSED while an exploit restarts it) to share resources in turns. Pausing
                # a Train driver kills its Train run (a restart costs a worker-group start), so trials run
                # to the end instead; waiting trials start when one finishes (size the population to
                # --max-concurrent for every trial to take part in exploits).
                return TrialScheduler.CONTINUE
            return decision

    return TrainCheckpointPBT(
        time_attr="training_iteration", metric=options["metric"], mode=options["mode"],
        perturbation_interval=float(options.get("perturbation_interval", DEFAULT_PERTURBATION_INTERVAL)),
        burn_in_period=float(options.get("burn_in_period", 0)),
        quantile_fraction=float(options.get("quantile_fraction", 0.25)),
        resample_probability=float(options.get("resample_probability", 0.25)),
        hyperparam_mutations=mutations(space), custom_explore_fn=clamp_to_space(space),
        # Reports of ranks other than 0 may lack holdout_mse_pm1; such results are simply no perturbation point.
        require_attrs=False,
    )


# ---------------------------------------------------------------------------------------------------
# Train -> Tune checkpoints (trial side)


def _user_callback_base():
    from ray.train.v2.api.callback import UserCallback

    return UserCallback


class TuneCheckpointCallback(_user_callback_base()):
    """Runs in the Train controller: each report's rank-0 metrics and checkpoint path -> the trial's pump."""

    def __init__(self, queue):
        self._queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._queue.put(item)  # blocks while the trial has not taken the previous report (one slot)


class CheckpointPump:
    """A thread of the trial process: Train reports from ``TuneCheckpointCallback`` -> ``ray.tune.report``,
    each Train checkpoint as a Tune checkpoint holding a pointer file."""

    _STOP = "__sparsegen_stop__"

    def __init__(self, trial_id: str, train_run: str, storage: str, max_steps: int | None = None,
                 epochs: float = 0.0):
        from ray.util.queue import Queue

        self.trial_id, self.train_run, self.storage = trial_id, train_run, storage
        self.max_steps, self.epochs = max_steps, epochs
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.reported = 0
        self._thread = threading.Thread(target=self._run, name="sparsegen-checkpoint-pump", daemon=True)
        self._thread.start()

    def callback(self) -> TuneCheckpointCallback:
        return TuneCheckpointCallback(self.queue)

    def close(self, timeout_s: float | None = 300.0) -> None:
        """After ``train()`` returned: deliver what is queued, then stop (blocks until Tune took it all)."""
        try:
            self.queue.put(self._STOP, timeout=timeout_s)
        except Exception:
            pass
        self._thread.join(timeout_s)
        try:
            self.queue.shutdown()
        except Exception:
            pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(block=True, timeout=1.0)
            except Empty:
                continue
            except Exception:  # the queue actor is gone: the trial is ending
                return
            if item == self._STOP:
                return
            try:
                self._report(item)
            except Exception as exc:  # keep draining, or the Train controller would block on its next put
                print(f"[sparsegen] could not report a Train result to Tune: {exc!r}", flush=True)

    def _report(self, metrics: dict) -> None:
        import ray.tune

        path = metrics.get(CHECKPOINT_PATH_KEY)
        step, epoch = int(metrics.get("step") or 0), float(metrics.get("epoch") or 0.0)
        last = total_steps(step, epoch, self.max_steps, self.epochs)
        if not path or (last is not None and step >= last):
            # The run's last checkpoint is no Tune checkpoint: a trial exploiting it would have nothing left
            # to train (PBT skips donors without a checkpoint).
            ray.tune.report(metrics)
            self.reported += 1
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
        self.reported += 1


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
               max_steps: int | None = None, epochs: float = 0.0) -> dict:
    """Where a trial starts: {train_run, resume_from, donor (None unless an exploit), pointer}.

    Raises ``NothingToExploit`` when an exploit's donor has no checkpoint before this trial's last step
    (``max_steps`` / ``epochs``: this trial's own, possibly perturbed, length)."""
    if pointer is None:
        return {"train_run": base_name, "resume_from": None, "donor": None, "pointer": None}
    if pointer.get("trial_id") == trial_id:
        # Its own checkpoint (paused by PBT, or a restored search): continue its own Train run, which
        # Ray Train resumes from its latest checkpoint (the pointed one is the fallback).
        return {"train_run": pointer["train_run"], "resume_from": pointer["train_checkpoint"], "donor": None,
                "pointer": pointer}
    digest = hashlib.sha1(json.dumps([pointer["train_checkpoint"], _plain_config(config)], sort_keys=True,
                                     default=str).encode()).hexdigest()[:8]
    train_run = f"{base_name}-pbt{digest}"
    end = total_steps(int(pointer.get("step") or 0), float(pointer.get("epoch") or 0.0), max_steps, epochs)
    seed = seed_checkpoint(pointer, storage, train_run, end)
    return {"train_run": train_run, "resume_from": seed, "donor": pointer["trial_id"], "pointer": pointer,
            "seed_step": _checkpoint_step(seed)}


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


# ---------------------------------------------------------------------------------------------------
# MLflow: the trial's one child run


def find_trial_run(tracking_uri: str, experiment: str, search_name: str, trial_id: str, run_name: str | None = None):
    """A trial's child run, by its search and trial tags (its ``sparsegen.run_name`` changes under PBT)."""
    from pipeline.tracking import mlflow_run
    from pipeline.tuning.trial import SEARCH_TAG, TRIAL_TAG

    client = mlflow_run.client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], max_results=2,
        filter_string=f"tags.`{SEARCH_TAG}` = '{search_name}' and tags.`{TRIAL_TAG}` = '{trial_id}'")
    if runs:
        return runs[0]
    return mlflow_run.find_run(tracking_uri, exp.experiment_id, run_name) if run_name else None


def current_train_run(setup: dict, trial_id: str, default: str) -> str:
    """The Train run the trial's child run logs now (its ``sparsegen.run_name``), else ``default``."""
    from pipeline.tracking import mlflow_run

    run = find_trial_run(setup["tracking_uri"], setup["experiment"], setup["search_name"], trial_id)
    return (run.data.tags.get(mlflow_run.RUN_NAME_TAG) if run is not None else None) or default


def attach_mlflow_run(setup: dict, trial_id: str, plan: dict, config: dict) -> None:
    """Point the trial's child run at this start's Train run and record an exploit (idempotently)."""
    from pipeline.tracking import mlflow_run
    from pipeline.tuning.trial import trial_run_name

    run = find_trial_run(setup["tracking_uri"], setup["experiment"], setup["search_name"], trial_id,
                         trial_run_name(setup["search_name"], trial_id))
    if run is None:
        return  # train() creates it
    tags = run.data.tags
    updates = {CONFIG_TAG: json.dumps(_plain_config(config), sort_keys=True, default=str)}
    if tags.get(mlflow_run.RUN_NAME_TAG) != plan["train_run"]:
        updates[mlflow_run.RUN_NAME_TAG] = plan["train_run"]
    if plan["donor"] is not None and tags.get(TRAIN_RUN_TAG) != plan["train_run"]:
        exploits = int(run.data.metrics.get(EXPLOITS_METRIC, 0)) + 1
        step = int(plan.get("seed_step") or plan["pointer"].get("step") or 0)
        numeric = {f"pbt.{k}": float(v) for k, v in _plain_config(config).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow_run.log_metrics(setup["tracking_uri"], run.info.run_id, {EXPLOITS_METRIC: exploits, **numeric}, step)
        updates.update({DONOR_TAG: plan["donor"], DONOR_CHECKPOINT_TAG: plan["pointer"]["train_checkpoint"],
                        TRAIN_RUN_TAG: plan["train_run"]})
        print(f"[sparsegen] pbt: trial {trial_id} continues from trial {plan['donor']}'s checkpoint "
              f"(step {step}) as Train run '{plan['train_run']}' (exploit {exploits})", flush=True)
    mlflow_run.set_tags(setup["tracking_uri"], run.info.run_id, updates)


def _plain_config(config: dict) -> dict:
    from pipeline.tuning.trial import plain

    return {k: plain(v) for k, v in sorted(config.items())}
