"""One trial of a search: a full distributed training run driven from inside a Ray Tune trial.

Ray 2.60's Train/Tune interop: the Tune trainable is a *driver function* that builds and fits a Ray Train
``TorchTrainer`` (here via ``pipeline.distributed.trainer.train``) with
``ray.tune.integration.ray_train.TuneReportCallback`` in its ``RunConfig(callbacks=...)``; every
``ray.train.report`` of the workers (step, epoch, reconstruction_mse at each checkpoint) becomes a Tune
result, which is what ASHA sees. When training and the end-of-training evaluation are done, the driver adds
one final result carrying the evaluation metrics and ``FINAL_KEY`` (how a finished trial is told apart from
one a scheduler stopped).

Each trial's training run is named ``<search>-<trial_id>``: its MLflow run (a child of the search's
parent run) and its Ray Train storage are found again by that name when a restored search reruns it, so an
interrupted trial continues from its latest Train checkpoint.

Under PBT the Train reports reach Tune through ``pipeline.tuning.pbt`` instead (each Train checkpoint a
Tune checkpoint), and a trial that exploited another one continues in a fresh Train run
``<search>-<trial_id>-pbt<hash>`` while logging into its one MLflow child run.
"""

from __future__ import annotations

from typing import Any

FINAL_KEY = "sparsegen_final"
TRIAL_TAG = "sparsegen.trial_id"
SEARCH_TAG = "sparsegen.search"
STATUS_TAG = "sparsegen.trial_status"
SEARCHED_TAG = "sparsegen.searched"
KIND_TAG = "sparsegen.kind"


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def plain(value: Any) -> Any:
    """numpy scalars (what some Tune domains sample) -> Python scalars, so config type checks pass."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def trial_config(setup: dict, values: dict[str, Any]):
    """The validated Config of a trial: preset + overrides + the space's fixed values + sampled values."""
    from pipeline.config import load_config

    overrides = {**setup["overrides"], **{k: plain(v) for k, v in values.items()}}
    cfg = load_config(setup["preset"], overrides)
    cfg.data.url = setup["data_url"]
    cfg.run.experiment = setup["experiment"]
    cfg.run.tracking_uri = setup["tracking_uri"]
    cfg.run.storage = setup["storage"]
    return cfg


def run_trial(config: dict, setup: dict) -> None:
    """The Tune trainable (a Train driver). ``config``: dotted key -> sampled value; ``setup``: see search.py.

    Under PBT (``setup["scheduler"] == "pbt"``) every Train checkpoint is reported to Tune as a Tune
    checkpoint, and a trial restarted from a checkpoint (an exploit, a pause, a restored search) starts
    from it: see ``pipeline.tuning.pbt``.
    """
    import ray.tune
    from ray.train._internal.session import get_session

    from pipeline.distributed.trainer import train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(setup, config)
    cfg.run.name = trial_run_name(setup["search_name"], trial_id)
    tags = {
        TRIAL_TAG: trial_id,
        SEARCH_TAG: setup["search_name"],
        STATUS_TAG: "running",
        SEARCHED_TAG: ",".join(sorted(config)),
        KIND_TAG: "trial",
    }
    resume_from = None
    pump = None
    if setup.get("scheduler") == "pbt":
        from pipeline.tuning import pbt

        try:
            plan = pbt.plan_start(pbt.read_pointer(ray.tune.get_checkpoint()), trial_id, cfg.run.name, config,
                                  cfg.run.storage, cfg.training.max_steps, cfg.training.epochs)
        except pbt.NothingToExploit as exc:  # e.g. the donor finished meanwhile: keep its own run going
            own = pbt.current_train_run(setup, trial_id, cfg.run.name)
            print(f"[sparsegen] pbt: trial {trial_id} continues its own Train run '{own}' ({exc})", flush=True)
            plan = {"train_run": own, "resume_from": None, "donor": None, "pointer": None}
        pbt.attach_mlflow_run(setup, trial_id, plan, config)
        cfg.run.name, resume_from = plan["train_run"], plan["resume_from"]
        pump = pbt.CheckpointPump(trial_id, cfg.run.name, cfg.run.storage, cfg.training.max_steps,
                                  cfg.training.epochs)
        callbacks = [pump.callback()]
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    result = train(cfg, workdir=setup["workdir"], parent_run_id=setup["parent_run_id"], resume_from=resume_from,
                   callbacks=callbacks, extra_tags=tags)

    from pipeline.tracking import mlflow_run

    mlflow_run.set_tags(setup["tracking_uri"], result["run_id"], {STATUS_TAG: "finished"})
    final = {k: float(v) for k, v in result["metrics"].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update({FINAL_KEY: 1.0, "mlflow_run_id": result["run_id"], "run_name": result["name"],
                  "train_checkpoint": result["checkpoint"]})
    if pump is not None:
        pump.close()  # every Train report delivered to Tune (the pump reports them one at a time)
    else:
        _wait_until_reports_delivered(get_session())
    ray.tune.report(final)


def _wait_until_reports_delivered(session, settle_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """Block until Tune has taken every Train report TuneReportCallback handed over.

    Those reports reach Tune through the session's inter-actor queue, which the trial's main thread
    drains; a report from this thread while one of them is still being handed over would race it for
    the session's one-slot result queue. Both queues empty for ``settle_s`` means the hand-over is done.
    """
    import time

    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        inter = session._inter_actor_queue
        idle = (inter is None or inter.empty()) and session.result_queue.empty()
        if not idle:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle_s:
            return
        time.sleep(0.1)
