"""A hyperparameter search: Ray Tune over full Ray Train runs, one MLflow parent run, one child per trial.

``run_search(settings)``:

1. validates the search space against the config (``SpaceError`` before Ray starts);
2. makes the demo shards once when no ``--data`` is given (so trials do not race to make them);
3. finds or creates the search's parent MLflow run by name (tag ``sparsegen.run_name``);
4. fits a ``tune.Tuner`` whose trainable is ``pipeline.tuning.trial.run_trial`` (a Train driver), or, when
   ``<workdir>/tune/<name>`` holds an interrupted search, ``tune.Tuner.restore`` it (unfinished and
   errored trials run again, continuing their own Ray Train checkpoints; finished trials are kept);
5. marks each child run by outcome (``sparsegen.trial_status`` = finished / stopped / failed; MLflow status
   FINISHED / KILLED / FAILED) and logs the space, the trials table, the best config, the Pareto front and a
   plot of the objective against every searched parameter into the parent run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.tuning.space import INTERMEDIATE_METRIC, INTERMEDIATE_METRICS, SearchSpace, SpaceError, load_space, required_evaluations
from pipeline.tuning.trial import (FINAL_KEY, KIND_TAG, SEARCH_TAG, SEARCHED_TAG, STATUS_TAG, TRIAL_TAG,
                                   trial_config, trial_run_name)

# CPUs a trial's driver (the Tune trainable: MLflow, end-of-training evaluation) claims, besides its
# Train workers; small so concurrent trials leave CPUs to the workers they start.
TRIAL_DRIVER_CPUS = 0.5
SETTINGS_FILE = "sparsegen-search.json"
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED", "unfinished": "KILLED"}


class SearchError(RuntimeError):
    pass


@dataclass
class SearchSettings:
    name: str
    space: str
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    data_url: str | None = None
    workdir: str | None = None
    # Trial checkpoints (<storage>/runs) and Tune state (<storage>/tune): a path every node sees, or s3://.
    storage: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    trials: int | None = None
    max_concurrent: int | None = None
    scheduler: str | None = None
    search: str | None = None
    metric: list[str] | None = None
    mode: list[str] | None = None
    seed: int | None = None


def prepare(settings: SearchSettings) -> tuple[SearchSpace, Any, dict]:
    """Validate everything that can be validated without Ray: (space, base config, resolved choices)."""
    from pipeline.config import ConfigError, load_config

    space = load_space(settings.space, preset=settings.preset, overrides=settings.overrides,
                       search=settings.search, metric=settings.metric, mode=settings.mode)
    overrides = _overrides_dict(settings.overrides)
    overrides.update(space.fixed)
    base = load_config(settings.preset, overrides)
    needed = [e for e in required_evaluations(space.metric) if e not in base.evaluation.at_end]
    if needed:  # an objective computed at the end of training needs its evaluation
        overrides["evaluation.at_end"] = list(base.evaluation.at_end) + needed
        print(f"[sparsegen] objective {space.metric} needs evaluation.at_end += {needed}", flush=True)
        base = load_config(settings.preset, overrides)

    scheduler = dict(space.scheduler)
    if settings.scheduler:
        if settings.scheduler != scheduler.get("kind"):
            scheduler = {"kind": settings.scheduler}
    scheduler.setdefault("kind", "asha")
    if scheduler["kind"] != "none":
        objective_is_intermediate = len(space.metric) == 1 and space.metric[0] in INTERMEDIATE_METRICS
        scheduler.setdefault("metric", space.metric[0] if objective_is_intermediate else INTERMEDIATE_METRIC)
        scheduler.setdefault("mode", space.mode[0] if objective_is_intermediate else "min")
        if scheduler["metric"] not in INTERMEDIATE_METRICS:
            raise SpaceError(space.source, [
                f"scheduler.metric: {scheduler['metric']!r} is not reported during training; the scheduler "
                f"can only use {' or '.join(map(repr, INTERMEDIATE_METRICS))} (reported at every Ray Train checkpoint)"])
    search = settings.search or space.search or "optuna"
    if scheduler["kind"] == "pbt":
        from pipeline.tuning.pbt import DEFAULT_PERTURBATION_INTERVAL, check_space

        problems = check_space(space)
        if search == "optuna":
            # PBT explores by perturbing its own population; Tune refuses it with a search algorithm that
            # suggests configs (Optuna). Random (or grid) sampling only draws the initial population.
            if settings.search or space.search:
                problems.append("search optuna: scheduler pbt needs search 'random' (or 'grid'): PBT perturbs "
                                "its own population and cannot be combined with Optuna")
            else:
                search = "random"
                print("[sparsegen] scheduler pbt: sampling the initial population with search 'random' "
                      "(PBT does not combine with Optuna)", flush=True)
        if problems:
            raise SpaceError(space.source, problems)
        scheduler.setdefault("perturbation_interval", DEFAULT_PERTURBATION_INTERVAL)
    if search == "grid":
        bad = [p.key for p in space.parameters if not p.is_categorical()]
        if bad:
            raise SpaceError(space.source, [f"parameters.{k}: grid search needs 'choice' values" for k in bad])
    trials = space.grid_size() if search == "grid" else (settings.trials or space.trials or 4)
    per_trial = TRIAL_DRIVER_CPUS + base.run.workers * base.run.cpus_per_worker
    resolved = {"search": search, "scheduler": scheduler, "trials": trials, "per_trial_cpus": per_trial,
                "max_concurrent": settings.max_concurrent or space.max_concurrent, "overrides": overrides}
    return space, base, resolved


def run_search(settings: SearchSettings) -> dict:
    """Run (or resume) the search named ``settings.name``; returns the summary printed by the CLI."""
    from ray import tune

    from pipeline.distributed.trainer import ensure_demo_data, resolve_workdir
    from pipeline.tracking import mlflow_run

    started = time.monotonic()
    space, base, resolved = prepare(settings)  # a malformed space fails here, before anything is created
    from pipeline.data import storage as store
    from pipeline.distributed.trainer import _storage_path

    workdir = resolve_workdir(settings.workdir)
    root = settings.storage.rstrip("/") if settings.storage else str(workdir)
    if not store.is_s3(root):
        root = str(Path(root).resolve())
    tune_root, runs_storage = store.join(root, "tune"), store.join(root, "runs")
    tune_storage_path, tune_filesystem = _storage_path(tune_root)
    experiment_path = store.join(tune_root, settings.name)
    stored = _load_stored_settings(experiment_path)
    resuming = tune.Tuner.can_restore(store.join(tune_storage_path, settings.name), storage_filesystem=tune_filesystem)
    if resuming and stored is not None:
        settings = _merge_stored(settings, stored)
        space, base, resolved = prepare(settings)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    data_url = settings.data_url or base.data.url or ensure_demo_data(base, workdir)
    tracking_uri = settings.tracking_uri or base.run.tracking_uri or mlflow_run.default_tracking_uri(workdir)
    experiment = base.run.experiment
    artifact_root = str(workdir / "mlartifacts")

    parent_params = {
        "search.name": settings.name, "search.algorithm": resolved["search"],
        "search.scheduler": json.dumps(resolved["scheduler"], sort_keys=True),
        "search.metric": ",".join(space.metric), "search.mode": ",".join(space.mode),
        "search.trials": resolved["trials"], "search.preset": settings.preset, "search.space_file": space.source,
        "search.seed": settings.seed, "search.data": data_url,
        **{f"space.{p.key}": p.describe() for p in space.parameters},
        **{f"set.{k}": v for k, v in resolved["overrides"].items()},
    }
    parent_id, parent_resumed = mlflow_run.get_or_create_run(
        tracking_uri, experiment, settings.name, parent_params, artifact_root=artifact_root,
        tags={KIND_TAG: "search", SEARCH_TAG: settings.name, "sparsegen.preset": settings.preset},
    )
    if not parent_resumed:
        _log_text(tracking_uri, parent_id, "space.yaml", Path(space.source).read_text())
    print(f"[sparsegen] search '{settings.name}': parent MLflow run {parent_id} at {tracking_uri}"
          f"{' (resumed)' if parent_resumed else ''}", flush=True)

    _init_ray(settings.address, resolved)
    require_storage_on_every_node(root, explicit=settings.storage is not None)
    max_concurrent = resolved["max_concurrent"] or _default_concurrency(resolved["per_trial_cpus"])
    setup = {
        "preset": settings.preset, "overrides": resolved["overrides"], "data_url": data_url,
        "workdir": str(workdir), "tracking_uri": tracking_uri, "experiment": experiment,
        "storage": runs_storage, "search_name": settings.name, "parent_run_id": parent_id,
        "scheduler": resolved["scheduler"]["kind"],
    }
    from pipeline.tuning.trial import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_DRIVER_CPUS})
    status_callback = TrialStatusCallback(tracking_uri, experiment, settings.name, parent_id)
    if resolved["scheduler"]["kind"] == "pbt" and settings.seed is not None:
        import random

        random.seed(settings.seed)  # PBT draws its exploits and perturbations from Python's random module
    if resuming:
        print(f"[sparsegen] resuming the interrupted search at {experiment_path}: finished trials are kept, "
              f"unfinished and errored ones run again from their latest checkpoints", flush=True)
        tuner = tune.Tuner.restore(store.join(tune_storage_path, settings.name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True, storage_filesystem=tune_filesystem)
    else:
        store.write_bytes(store.join(experiment_path, SETTINGS_FILE), json.dumps(asdict(settings), indent=1).encode())
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(resolved["search"]),
            tune_config=tune.TuneConfig(
                # A grid enumerates its own trials (every combination of the choices).
                num_samples=1 if resolved["search"] == "grid" else resolved["trials"],
                max_concurrent_trials=max_concurrent,
                search_alg=_search_algorithm(resolved["search"], space, settings.seed),
                scheduler=_scheduler(resolved["scheduler"], space),
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=tune_storage_path,
                storage_filesystem=tune_filesystem,
                callbacks=[status_callback],
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    if any(m not in INTERMEDIATE_METRICS for m in space.metric) or resolved["scheduler"].get("metric") == "holdout_mse_pm1":
        # Objectives computed at the end of training are absent from the intermediate results, and the
        # holdout MSE is absent from the reports of ranks other than 0.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    mlflow_run.set_tags(tracking_uri, parent_id, {"sparsegen.search_status": "running"})
    results = tuner.fit()

    trials = collect_trials(results, space, settings.name)
    reconcile_child_runs(trials, tracking_uri, experiment, parent_id, setup)
    summary = summarize(trials, space, settings, resolved, setup, parent_id, tracking_uri, experiment_path)
    summary["resumed"] = bool(resuming)
    summary["max_concurrent"] = max_concurrent
    summary["duration_s"] = round(time.monotonic() - started, 1)
    log_summary(summary, trials, space, settings, tracking_uri, parent_id)
    return summary


# ---------------------------------------------------------------------------------------------------
# Tune pieces


def _search_algorithm(kind: str, space: SearchSpace, seed: int | None):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if kind in ("random", "grid"):
        return BasicVariantGenerator(random_state=seed)
    from ray.tune.search.optuna import OptunaSearch

    class OptunaSearchSkippingMissing(OptunaSearch):
        # Intermediate results lack objectives computed at the end of training; Optuna only needs the
        # final result of each trial (and prunes nothing itself: the scheduler does).
        def on_trial_result(self, trial_id: str, result: dict):
            if isinstance(self.metric, str) and self.metric not in result:
                return
            super().on_trial_result(trial_id, result)

    metric = space.metric[0] if len(space.metric) == 1 else list(space.metric)
    mode = space.mode[0] if len(space.mode) == 1 else list(space.mode)
    return OptunaSearchSkippingMissing(metric=metric, mode=mode, seed=seed)


def _scheduler(options: dict, space: SearchSpace):
    kind = options["kind"]
    if kind == "none":
        return None
    if kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="training_iteration", metric=options["metric"], mode=options["mode"],
                             max_t=int(options.get("max_t", 1000)), grace_period=int(options.get("grace_period", 1)),
                             reduction_factor=float(options.get("reduction_factor", 2)))
    if kind == "pbt":
        from pipeline.tuning.pbt import make_scheduler

        return make_scheduler(options, space, FINAL_KEY)
    raise ValueError(f"unsupported scheduler {kind!r}")


def _init_ray(address: str | None, resolved: dict) -> None:
    """Join a cluster, reuse an initialised Ray, or start a local one sized for the concurrent trials."""
    from pipeline.distributed.trainer import init_ray

    concurrent = resolved["max_concurrent"] or 1
    init_ray(address, math.ceil(concurrent * resolved["per_trial_cpus"]))


def _default_concurrency(per_trial_cpus: float) -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // per_trial_cpus))


def _ray_tune_callback_base():
    from ray.tune import Callback

    return Callback


class TrialStatusCallback(_ray_tune_callback_base()):
    """Marks a trial's MLflow run as soon as Tune stops it (ASHA) or it errors (driver side)."""

    def __init__(self, tracking_uri: str, experiment: str, search_name: str, parent_id: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.search_name, self.parent_id = search_name, parent_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not (trial.last_result or {}).get(FINAL_KEY):
            self._mark(trial.trial_id, "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._mark(trial.trial_id, "failed")

    def _mark(self, trial_id: str, status: str) -> None:
        try:
            run = find_child_run(self.tracking_uri, self.experiment, trial_run_name(self.search_name, trial_id),
                                 self.search_name, trial_id)
            if run is not None:
                mark_run(self.tracking_uri, run.info.run_id, status)
        except Exception as exc:  # never break the search over bookkeeping
            print(f"[sparsegen] could not mark trial {trial_id} as {status} in MLflow: {exc}", flush=True)


# ---------------------------------------------------------------------------------------------------
# After the search


def collect_trials(results, space: SearchSpace, search_name: str) -> list[dict]:
    """Plain trial records from Tune's results (status: finished / stopped / failed / unfinished)."""
    analysis = getattr(results, "_experiment_analysis", None)
    tune_trials = list(analysis.trials) if analysis is not None else []
    records = []
    for trial in tune_trials:
        last = dict(trial.last_result or {})
        if trial.status == "ERROR":
            status = "failed"
        elif trial.status == "TERMINATED":
            status = "finished" if last.get(FINAL_KEY) else "stopped"
        else:
            status = "unfinished"
        metrics = {k: float(v) for k, v in last.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != FINAL_KEY}
        params = {k: _plain(trial.config.get(k)) for k in space.keys}
        records.append({"trial_id": trial.trial_id, "status": status, "params": params, "metrics": metrics,
                        "run_id": last.get("mlflow_run_id"), "run_name": trial_run_name(search_name, trial.trial_id),
                        "error": _error_text(trial) if status == "failed" else None})
    return records


def reconcile_child_runs(trials: list[dict], tracking_uri: str, experiment: str, parent_id: str, setup: dict) -> None:
    """Every trial has a child run marked with its outcome (a trial that failed before training started
    gets a FAILED child run carrying its sampled params and the error)."""
    from pipeline.tracking import mlflow_run

    for trial in trials:
        run = find_child_run(tracking_uri, experiment, trial["run_name"], setup["search_name"], trial["trial_id"])
        if run is None:
            if trial["status"] != "failed":
                continue
            run_id, _ = mlflow_run.get_or_create_run(
                tracking_uri, experiment, trial["run_name"], trial["params"], parent_run_id=parent_id,
                tags={TRIAL_TAG: trial["trial_id"], SEARCH_TAG: setup["search_name"], KIND_TAG: "trial",
                      SEARCHED_TAG: ",".join(sorted(trial["params"]))})
        else:
            run_id = run.info.run_id
            if setup.get("scheduler") == "pbt":
                from pipeline.tuning.pbt import EXPLOITS_METRIC

                trial["metrics"][EXPLOITS_METRIC] = float(run.data.metrics.get(EXPLOITS_METRIC, 0.0))
        trial["run_id"] = run_id
        mark_run(tracking_uri, run_id, trial["status"], error=trial.get("error"))


def find_child_run(tracking_uri: str, experiment: str, run_name: str, search_name: str | None = None,
                   trial_id: str | None = None):
    """A trial's child run: by its search and trial tags when given (under PBT its ``sparsegen.run_name``
    names its current Train run), else by run name."""
    from pipeline.tracking import mlflow_run

    if search_name and trial_id:
        from pipeline.tuning.pbt import find_trial_run

        return find_trial_run(tracking_uri, experiment, search_name, trial_id, run_name)
    exp = mlflow_run.client(tracking_uri).get_experiment_by_name(experiment)
    return None if exp is None else mlflow_run.find_run(tracking_uri, exp.experiment_id, run_name)


def mark_run(tracking_uri: str, run_id: str, status: str, error: str | None = None) -> None:
    from pipeline.tracking import mlflow_run

    tags = {STATUS_TAG: status}
    if status == "stopped":
        tags["sparsegen.stopped_by"] = "scheduler"
    if error:
        tags["sparsegen.error"] = error[-4000:]
    mlflow_run.set_tags(tracking_uri, run_id, tags)
    mlflow_run.finish_run(tracking_uri, run_id, MLFLOW_STATUS[status])


def summarize(trials, space, settings, resolved, setup, parent_id, tracking_uri, experiment_path) -> dict:
    from pipeline.tuning.report import best_trial, pareto_front

    counts = {s: sum(t["status"] == s for t in trials) for s in ("finished", "stopped", "failed", "unfinished")}
    summary: dict[str, Any] = {
        "name": settings.name, "parent_run_id": parent_id, "tracking_uri": tracking_uri,
        "experiment": setup["experiment"], "experiment_path": str(experiment_path),
        "search": resolved["search"], "scheduler": resolved["scheduler"]["kind"],
        "metric": space.metric, "mode": space.mode, "trials": len(trials), **{f"trials_{k}": v for k, v in counts.items()},
        "trial_runs": {t["trial_id"]: t["run_id"] for t in trials},
    }
    if resolved["scheduler"]["kind"] == "pbt":  # restarts of trials from other trials' checkpoints
        summary["pbt_exploits"] = int(sum(t["metrics"].get("pbt_exploits", 0) for t in trials))
    if len(space.metric) == 1:
        best = best_trial(trials, space.metric[0], space.mode[0])
        if best is not None:
            cfg = trial_config(setup, best["params"])
            summary["best"] = {"trial_id": best["trial_id"], "run_id": best["run_id"], "params": best["params"],
                               space.metric[0]: best["metrics"][space.metric[0]]}
            summary["best_config"] = cfg.to_dict()
    else:
        front = pareto_front(trials, space.metric, space.mode)
        summary["pareto"] = [{"trial_id": t["trial_id"], "run_id": t["run_id"], "params": t["params"],
                              **{m: t["metrics"][m] for m in space.metric}} for t in front]
    if not any(t["status"] == "finished" for t in trials):
        summary["warning"] = "no trial finished"
    elif not any(m in t["metrics"] for t in trials for m in space.metric):
        summary["warning"] = f"no trial reported {space.metric}: is the metric name right?"
    return summary


def log_summary(summary: dict, trials: list[dict], space: SearchSpace, settings: SearchSettings,
                tracking_uri: str, parent_id: str) -> None:
    """Trials table, best config, Pareto front and plots into the parent run; the parent is FINISHED."""
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
                                         front_ids, title=f"search '{settings.name}': {metric} per trial")
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
    if "pbt_exploits" in summary:
        metrics["pbt_exploits"] = float(summary["pbt_exploits"])
    mlflow_run.log_metrics(tracking_uri, parent_id, metrics, step=0)
    tags = {"sparsegen.search_status": "finished"}
    if "best" in summary:
        tags["sparsegen.best_trial"] = summary["best"]["trial_id"]
        tags["sparsegen.best_run_id"] = summary["best"]["run_id"] or ""
    mlflow_run.set_tags(tracking_uri, parent_id, tags)
    mlflow_run.finish_run(tracking_uri, parent_id, "FINISHED")


# ---------------------------------------------------------------------------------------------------
# helpers


def _overrides_dict(overrides: list[str] | dict | None) -> dict[str, Any]:
    from pipeline.config import ConfigError, _parse_overrides

    problems: list[str] = []
    parsed = _parse_overrides(overrides, problems)
    if problems:
        raise ConfigError(problems)
    return parsed


def _load_stored_settings(experiment_path: str) -> dict | None:
    from pipeline.data import storage as store

    try:
        return json.loads(store.read_bytes(store.join(experiment_path, SETTINGS_FILE)))
    except (OSError, ValueError, LookupError):
        return None
    except Exception:  # noqa: BLE001 - botocore's NoSuchKey and friends: no stored search
        return None


def require_storage_on_every_node(root: str, *, explicit: bool) -> None:
    """Refuse a local search storage that some node of the Ray cluster cannot see, before any trial starts.

    A trial's Ray Train workers and its Tune driver may run on any node, and each writes checkpoints under
    the storage: a path that only the driver's node has fails at the first checkpoint. The driver writes a
    marker file under ``root``; one task pinned to each other alive node (``NodeAffinitySchedulingStrategy``)
    looks for it. s3:// needs no check.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.data import storage as store

    if store.is_s3(root):
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    marker = Path(root) / f".storage-check-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("sparsegen")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return Path(path).exists()

    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(str(marker)) for node in others], timeout=60)
    finally:
        marker.unlink(missing_ok=True)
    if not all(seen):
        what = f"--storage {root}" if explicit else f"the local workdir {root} (no --storage given)"
        raise SearchError(f"{sum(not s for s in seen)} of {len(others) + 1} nodes of the Ray cluster cannot see "
                          f"{what}: give --storage a path every node shares, or s3://bucket/prefix")


def _merge_stored(current: SearchSettings, stored: dict) -> SearchSettings:
    """Resuming: the stored search's definition wins; say which command-line choices were ignored."""
    keep = SearchSettings(**{k: v for k, v in stored.items() if k in SearchSettings.__dataclass_fields__})
    # Where things live may legitimately be given differently (same store, another spelling).
    for key in ("workdir", "storage", "tracking_uri", "address"):
        setattr(keep, key, getattr(current, key) or getattr(keep, key))
    ignored = [k for k in ("space", "preset", "overrides", "data_url", "trials", "max_concurrent", "scheduler",
                           "search", "metric", "mode", "seed")
               if getattr(current, k) not in (None, [], getattr(keep, k))]
    if ignored:
        print(f"[sparsegen] resuming search '{current.name}' as it was defined; ignoring changed "
              f"{', '.join(ignored)}", flush=True)
    return keep


def _log_text(tracking_uri: str, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    from pipeline.tracking import mlflow_run

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_text(text)
        mlflow_run.log_artifact(tracking_uri, run_id, str(path), artifact_path)


def _plain(value: Any) -> Any:
    from pipeline.tuning.trial import plain

    return plain(value)


def _error_text(trial) -> str | None:
    try:
        path = trial.error_file if hasattr(trial, "error_file") else None
        if path and os.path.exists(path):
            return Path(path).read_text()[-4000:]
    except Exception:
        pass
    return "trial failed (see the Tune trial directory)"
