"""One trial of a search: a full distributed training run driven from inside a Ray Tune trial.

Ray 2.60's Train/Tune interop: the Tune trainable is a *driver function* that builds and fits a Ray Train
``TorchTrainer`` (here via ``pipeline.distributed.trainer.train``). The project's report relay
(``pipeline.tuning.relay``: a public ``ray.train.UserCallback`` in the Train run's ``RunConfig``) turns every
``ray.train.report`` of the workers (step, epoch, reconstruction_mse at each checkpoint) into a Tune result,
which is what ASHA and PBT see. When training and the end-of-training evaluation are done, the relay
delivers what is left and the driver adds one final result carrying the evaluation metrics and ``FINAL_KEY``
(how a finished trial is told apart from one a scheduler stopped).

Each trial's training run is named ``<search>-<trial_id>``: its MLflow run (a child of the search's
parent run) and its Ray Train storage are found again by that name when a restored search reruns it, or
when Tune restarts a failed trial (``--max-failures``), so the trial continues from its latest Train
checkpoint.

Under PBT every Train report reaches Tune with a Tune checkpoint pointing at the Train checkpoint
(``pipeline.tuning.pbt.PointerReporter``), and a trial that exploited another one continues in a fresh Train
run ``<search>-<trial_id>-pbt<hash>`` while logging into its one MLflow child run
(``pipeline.tuning.runs.attach_pbt_start``).
"""

from __future__ import annotations

from typing import Any

from pipeline.tuning import pbt, runs
from pipeline.tuning.settings import FINAL_KEY, StartPlan, TrialSetup, plain


def trial_config(setup: TrialSetup, values: dict[str, Any]):
    """The validated Config of a trial: preset + overrides + the space's fixed values + sampled values."""
    from pipeline.config import load_config

    overrides = {**setup.overrides, **{k: plain(v) for k, v in values.items()}}
    cfg = load_config(setup.preset, overrides)
    cfg.data.url = setup.data_url
    cfg.run.experiment = setup.experiment
    cfg.run.tracking_uri = setup.tracking_uri
    cfg.run.storage = setup.storage
    return cfg


def final_result(train_result: dict) -> dict[str, Any]:
    """The trial's last Tune result: the run's numeric metrics (last Train report + evaluation), ``FINAL_KEY``
    and where the run is."""
    final = {k: float(v) for k, v in train_result["metrics"].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update({FINAL_KEY: 1.0, "mlflow_run_id": train_result["run_id"], "run_name": train_result["name"],
                  "train_checkpoint": train_result["checkpoint"]})
    return final


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Tune trainable (a Train driver). ``config``: dotted key -> sampled value.

    Under PBT (``setup.scheduler == "pbt"``) a trial restarted from a Tune checkpoint (an exploit, a restart
    after a failure, a restored search) starts where that checkpoint points: see ``pipeline.tuning.pbt``.
    """
    import ray.tune

    from pipeline.distributed.trainer import train
    from pipeline.tuning.relay import ReportRelay

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(setup, config)
    cfg.run.name = runs.trial_run_name(setup.search_name, trial_id)
    tags = runs.trial_tags(setup.search_name, trial_id, list(config))
    resume_from = None
    if setup.scheduler == "pbt":
        start = _pbt_start(setup, trial_id, cfg, config)
        cfg.run.name, resume_from = start.train_run, start.resume_from
        relay = ReportRelay(pbt.PointerReporter(trial_id, cfg.run.name, cfg.run.storage, cfg.run.checkpoint_every_steps,
                                                cfg.training.max_steps, cfg.training.epochs))
    else:
        relay = ReportRelay()
    try:
        result = train(cfg, workdir=setup.workdir, parent_run_id=setup.parent_run_id, resume_from=resume_from,
                       callbacks=[relay.callback()], extra_tags=tags)
    except BaseException:
        relay.close()
        raise
    runs.mark_finished(setup.tracking_uri, result["run_id"])
    relay.finish(final_result(result))  # every Train report reaches Tune before this final one


def _pbt_start(setup: TrialSetup, trial_id: str, cfg, config: dict) -> StartPlan:
    """Where this start of a PBT trial trains, with its MLflow child run pointed there."""
    import ray.tune

    try:
        start = pbt.plan_start(pbt.read_pointer(ray.tune.get_checkpoint()), trial_id, cfg.run.name, config,
                               cfg.run.storage, cfg.training.max_steps, cfg.training.epochs)
    except pbt.NothingToExploit as exc:  # e.g. the donor finished meanwhile: keep its own run going
        own = runs.current_train_run(setup, trial_id, cfg.run.name)
        print(f"[sparsegen] pbt: trial {trial_id} continues its own Train run '{own}' ({exc})", flush=True)
        start = StartPlan(train_run=own)
    runs.attach_pbt_start(setup, trial_id, start, config)
    return start
