"""A search's MLflow runs: one parent run per search (or ablation), one nested child run per trial.

Everything a search writes into MLflow, besides what ``train()`` logs into a trial's own run, is here:

* the tags that tie runs together (``sparsegen.kind`` search / trial / ablation / ablation-arm,
  ``sparsegen.search``, ``sparsegen.trial_id``, ``sparsegen.trial_status``, ``sparsegen.searched``) and a
  trial's run name ``<search>-<trial_id>``;
* the parent run: created (or found again by name when a search resumes) with the search's definition as
  params and ``space.yaml``; at the end the trials table, best config, Pareto front and plots, then FINISHED;
* child-run lookup (by search and trial tags: under PBT a child's ``sparsegen.run_name`` names its current
  Train run) and status: ``mark_trial`` marks a child as soon as Tune stops it or it errors (called by the search's Tune
  callback), ``record_restart`` counts a failed trial's restarts;
  ``reconcile_child_runs`` marks every child by outcome at the end (finished / stopped / failed /
  unfinished -> MLflow FINISHED / KILLED / FAILED / KILLED), creating a FAILED child for a trial that failed
  before training started;
* the PBT attachment (``attach_pbt_start``): before a trial trains in a fresh Train run (an exploit), its one
  child run is re-pointed at that Train run and the exploit is recorded (metric ``pbt_exploits``,
  ``pbt.<key>`` metrics, tags ``sparsegen.pbt_last_donor`` / ``_donor_checkpoint`` / ``_config`` /
  ``_train_run``).

Imports only ``settings`` of this package (no circle); MLflow through ``pipeline.tracking.mlflow_run``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.tuning.settings import StartPlan, TrialSetup, plain_config

TRIAL_TAG = "sparsegen.trial_id"
SEARCH_TAG = "sparsegen.search"
STATUS_TAG = "sparsegen.trial_status"
SEARCHED_TAG = "sparsegen.searched"
KIND_TAG = "sparsegen.kind"
STOPPED_BY_TAG = "sparsegen.stopped_by"
ERROR_TAG = "sparsegen.error"
RESTARTS_TAG = "sparsegen.trial_restarts"
SEARCH_STATUS_TAG = "sparsegen.search_status"
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED", "unfinished": "KILLED"}
# PBT's records in a trial's child run.
EXPLOITS_METRIC = "pbt_exploits"
DONOR_TAG = "sparsegen.pbt_last_donor"
DONOR_CHECKPOINT_TAG = "sparsegen.pbt_donor_checkpoint"
CONFIG_TAG = "sparsegen.pbt_config"
TRAIN_RUN_TAG = "sparsegen.pbt_train_run"


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def trial_tags(search_name: str, trial_id: str, searched: list[str], kind: str = "trial") -> dict[str, str]:
    """The tags a trial's child run is created with."""
    return {TRIAL_TAG: trial_id, SEARCH_TAG: search_name, STATUS_TAG: "running",
            SEARCHED_TAG: ",".join(sorted(searched)), KIND_TAG: kind}


# ---------------------------------------------------------------------------------------------------
# The parent run


def open_parent_run(tracking_uri: str, experiment: str, name: str, params: dict[str, Any], *, kind: str,
                    artifact_root: str, tags: dict[str, str] | None = None,
                    space_text: str | None = None) -> tuple[str, bool]:
    """(run id, resumed): the search's parent run, found again by name when the search resumes."""
    from pipeline.tracking import mlflow_run

    run_id, resumed = mlflow_run.get_or_create_run(
        tracking_uri, experiment, name, params, artifact_root=artifact_root,
        tags={KIND_TAG: kind, SEARCH_TAG: name, **(tags or {})})
    if not resumed and space_text is not None:
        log_text(tracking_uri, run_id, "space.yaml", space_text)
    return run_id, resumed


def log_search_summary(summary: dict, trials: list[dict], space, tracking_uri: str, parent_id: str) -> None:
    """Trials table, best config, Pareto front and plots into the parent run; the parent is FINISHED.
    Adds the table's rows to ``summary["table"]``."""
    import yaml

    from pipeline.tracking import mlflow_run
    from pipeline.tuning.report import plot_metric_vs_params, plot_pareto, to_csv, trials_table

    front_ids = {p["trial_id"] for p in summary.get("pareto", [])}
    rows = trials_table(trials, space.keys, space.metric, front_ids)
    summary["table"] = rows
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        files = {"trials.csv": to_csv(rows), "summary.json": json.dumps(
            {k: v for k, v in summary.items() if k not in ("table", "best_config")}, indent=1, default=str)}
        if "best_config" in summary:
            files["best_config.yaml"] = yaml.safe_dump(summary["best_config"], sort_keys=False)
        if "pareto" in summary:
            files["pareto.csv"] = to_csv([r for r in rows if r.get("pareto")])
        for name, text in files.items():
            (out / name).write_text(text)
            mlflow_run.log_artifact(tracking_uri, parent_id, str(out / name))
        for metric in space.metric:
            path = plot_metric_vs_params(trials, space.keys, metric, str(out / f"{metric}_vs_params.png"),
                                         front_ids, title=f"search '{summary['name']}': {metric} per trial")
            if path:
                mlflow_run.log_artifact(tracking_uri, parent_id, path, "plots")
        if len(space.metric) == 2:
            path = plot_pareto(trials, space.metric, space.mode, str(out / "pareto.png"))
            if path:
                mlflow_run.log_artifact(tracking_uri, parent_id, path, "plots")
    metrics = {f"trials_{k}": float(summary[f"trials_{k}"]) for k in ("finished", "stopped", "failed", "unfinished")}
    if "best" in summary:
        metrics[f"best_{space.metric[0]}"] = float(summary["best"][space.metric[0]])
    if "pareto" in summary:
        metrics["pareto_size"] = float(len(summary["pareto"]))
    if EXPLOITS_METRIC in summary:
        metrics[EXPLOITS_METRIC] = float(summary[EXPLOITS_METRIC])
    mlflow_run.log_metrics(tracking_uri, parent_id, metrics, step=0)
    tags = {SEARCH_STATUS_TAG: "finished"}
    if "best" in summary:
        tags["sparsegen.best_trial"] = summary["best"]["trial_id"]
        tags["sparsegen.best_run_id"] = summary["best"]["run_id"] or ""
    mlflow_run.set_tags(tracking_uri, parent_id, tags)
    mlflow_run.finish_run(tracking_uri, parent_id, "FINISHED")


def log_text(tracking_uri: str, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    from pipeline.tracking import mlflow_run

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_text(text)
        mlflow_run.log_artifact(tracking_uri, run_id, str(path), artifact_path)


# ---------------------------------------------------------------------------------------------------
# Child runs: lookup and status


def find_trial_run(tracking_uri: str, experiment: str, search_name: str, trial_id: str, run_name: str | None = None):
    """A trial's child run, by its search and trial tags (its ``sparsegen.run_name`` changes under PBT),
    else by ``run_name``."""
    from pipeline.tracking import mlflow_run

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


def find_run_by_name(tracking_uri: str, experiment: str, run_name: str):
    from pipeline.tracking import mlflow_run

    exp = mlflow_run.client(tracking_uri).get_experiment_by_name(experiment)
    return None if exp is None else mlflow_run.find_run(tracking_uri, exp.experiment_id, run_name)


def mark_finished(tracking_uri: str, run_id: str) -> None:
    """The trial trained and was evaluated (``train()`` sets the MLflow status itself)."""
    from pipeline.tracking import mlflow_run

    mlflow_run.set_tags(tracking_uri, run_id, {STATUS_TAG: "finished"})


def mark_run(tracking_uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """A child run's outcome: the ``sparsegen.trial_status`` tag and the MLflow status (``MLFLOW_STATUS``)."""
    from pipeline.tracking import mlflow_run

    tags = {STATUS_TAG: status}
    if status == "stopped":
        tags[STOPPED_BY_TAG] = "scheduler"
    if error:
        tags[ERROR_TAG] = error[-4000:]
    mlflow_run.set_tags(tracking_uri, run_id, tags)
    mlflow_run.finish_run(tracking_uri, run_id, MLFLOW_STATUS[status])


def mark_failed_by_name(tracking_uri: str, experiment: str, run_name: str, error: str) -> None:
    """Mark the run named ``run_name`` failed, if it exists (bookkeeping never hides the failure itself)."""
    try:
        run = find_run_by_name(tracking_uri, experiment, run_name)
        if run is not None:
            mark_run(tracking_uri, run.info.run_id, "failed", error=error)
    except Exception as exc:  # noqa: BLE001
        print(f"[sparsegen] could not mark {run_name} as failed in MLflow: {exc}", flush=True)


def reconcile_child_runs(trials: list[dict], setup: TrialSetup) -> None:
    """Every trial has a child run marked with its outcome (a trial that failed before training started
    gets a FAILED child run carrying its sampled params and the error). Sets each record's ``run_id``;
    under PBT also its ``pbt_exploits`` metric."""
    from pipeline.tracking import mlflow_run

    for trial in trials:
        run = find_trial_run(setup.tracking_uri, setup.experiment, setup.search_name, trial["trial_id"],
                             trial["run_name"])
        if run is None:
            if trial["status"] != "failed":
                continue
            run_id, _ = mlflow_run.get_or_create_run(
                setup.tracking_uri, setup.experiment, trial["run_name"], trial["params"],
                parent_run_id=setup.parent_run_id,
                tags=trial_tags(setup.search_name, trial["trial_id"], list(trial["params"])))
        else:
            run_id = run.info.run_id
            if setup.scheduler == "pbt":
                trial["metrics"][EXPLOITS_METRIC] = float(run.data.metrics.get(EXPLOITS_METRIC, 0.0))
        trial["run_id"] = run_id
        mark_run(setup.tracking_uri, run_id, trial["status"], error=trial.get("error"))


def mark_trial(tracking_uri: str, experiment: str, search_name: str, trial_id: str, status: str) -> None:
    """Mark a trial's child run by its id (as soon as Tune stops it or it errors; no run yet: nothing)."""
    try:
        run = find_trial_run(tracking_uri, experiment, search_name, trial_id, trial_run_name(search_name, trial_id))
        if run is not None:
            mark_run(tracking_uri, run.info.run_id, status)
    except Exception as exc:  # noqa: BLE001 - never break the search over bookkeeping
        print(f"[sparsegen] could not mark trial {trial_id} as {status} in MLflow: {exc}", flush=True)


def record_restart(tracking_uri: str, experiment: str, search_name: str, trial_id: str, count: int) -> None:
    """A failed trial restarts (its failure budget, ``--max-failures``): tag its child run with the count."""
    from pipeline.tracking import mlflow_run

    try:
        run = find_trial_run(tracking_uri, experiment, search_name, trial_id, trial_run_name(search_name, trial_id))
        if run is not None:
            mlflow_run.set_tags(tracking_uri, run.info.run_id, {RESTARTS_TAG: str(count)})
    except Exception as exc:  # noqa: BLE001 - never break the search over bookkeeping
        print(f"[sparsegen] could not record the restart of trial {trial_id} in MLflow: {exc}", flush=True)


# ---------------------------------------------------------------------------------------------------
# PBT: the trial's one child run across its Train runs


def current_train_run(setup: TrialSetup, trial_id: str, default: str) -> str:
    """The Train run the trial's child run logs now (its ``sparsegen.run_name``), else ``default``."""
    from pipeline.tracking import mlflow_run

    run = find_trial_run(setup.tracking_uri, setup.experiment, setup.search_name, trial_id)
    return (run.data.tags.get(mlflow_run.RUN_NAME_TAG) if run is not None else None) or default


def attach_pbt_start(setup: TrialSetup, trial_id: str, start: StartPlan, config: dict) -> None:
    """Point the trial's child run at this start's Train run and record an exploit (idempotently: the same
    exploit re-run after an interruption is recorded once). No child run yet: ``train()`` creates it."""
    from pipeline.tracking import mlflow_run

    run = find_trial_run(setup.tracking_uri, setup.experiment, setup.search_name, trial_id,
                         trial_run_name(setup.search_name, trial_id))
    if run is None:
        return
    tags = run.data.tags
    values = plain_config(config)
    updates = {CONFIG_TAG: json.dumps(values, sort_keys=True, default=str)}
    if tags.get(mlflow_run.RUN_NAME_TAG) != start.train_run:
        updates[mlflow_run.RUN_NAME_TAG] = start.train_run
    if start.donor is not None and tags.get(TRAIN_RUN_TAG) != start.train_run:
        exploits = int(run.data.metrics.get(EXPLOITS_METRIC, 0)) + 1
        step = int(start.seed_step or (start.pointer or {}).get("step") or 0)
        numeric = {f"pbt.{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow_run.log_metrics(setup.tracking_uri, run.info.run_id, {EXPLOITS_METRIC: exploits, **numeric}, step)
        updates.update({DONOR_TAG: start.donor, DONOR_CHECKPOINT_TAG: start.pointer["train_checkpoint"],
                        TRAIN_RUN_TAG: start.train_run})
        print(f"[sparsegen] pbt: trial {trial_id} continues from trial {start.donor}'s checkpoint "
              f"(step {step}) as Train run '{start.train_run}' (exploit {exploits})", flush=True)
    mlflow_run.set_tags(setup.tracking_uri, run.info.run_id, updates)
