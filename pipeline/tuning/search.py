"""A hyperparameter search: Ray Tune over full Ray Train runs, one MLflow parent run, one child per trial.

``run_search(settings)`` orchestrates:

1. ``prepare``: validates the search space against the config (``SpaceError`` before Ray starts) and
   resolves the search (``SearchPlan``: algorithm, scheduler, trials, concurrency, failure budget);
2. makes the demo shards once when no ``--data`` is given (so trials do not race to make them);
3. finds or creates the search's parent MLflow run by name (``pipeline.tuning.runs``);
4. fits a ``tune.Tuner`` whose trainable is ``pipeline.tuning.trial.run_trial`` (a Train driver), or, when
   ``<storage>/tune/<name>`` holds an interrupted search, ``tune.Tuner.restore`` it (unfinished and
   errored trials run again, continuing their own Ray Train checkpoints; finished trials are kept). A trial
   that fails is restarted up to ``--max-failures`` times, from its latest checkpoint;
5. lists the trials from Tune's ``ResultGrid`` (``collect_trials``), has ``runs`` mark each child run by
   outcome and log the space, trials table, best config, Pareto front and plots into the parent run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.distributed.placement import trial_driver_resources
from pipeline.tuning import pbt, runs
from pipeline.tuning.settings import (DEFAULT_MAX_FAILURES, FINAL_KEY, SchedulerOptions, SearchPlan,
                                      SearchSettings, TrialSetup, parse_overrides, plain)
from pipeline.tuning.space import (INTERMEDIATE_METRIC, INTERMEDIATE_METRICS, SearchSpace, SpaceError, load_space,
                                   required_evaluations)
from pipeline.tuning.trial import run_trial, trial_config

# CPUs a trial's driver (the Tune trainable: MLflow, end-of-training evaluation) claims, besides its
# Train workers; small so concurrent trials leave CPUs to the workers they start.
TRIAL_DRIVER_CPUS = 0.5
SETTINGS_FILE = "sparsegen-search.json"

class SearchError(RuntimeError):
    pass


def prepare(settings: SearchSettings) -> tuple[SearchSpace, Any, SearchPlan]:
    """Validate everything that can be validated without Ray: (space, base config, plan)."""
    from pipeline.config import load_config

    space = load_space(settings.space, preset=settings.preset, overrides=settings.overrides,
                       search=settings.search, metric=settings.metric, mode=settings.mode)
    overrides = parse_overrides(settings.overrides)
    overrides.update(space.fixed)
    base = load_config(settings.preset, overrides)
    needed = [e for e in required_evaluations(space.metric) if e not in base.evaluation.at_end]
    if needed:  # an objective computed at the end of training needs its evaluation
        overrides["evaluation.at_end"] = list(base.evaluation.at_end) + needed
        print(f"[sparsegen] objective {space.metric} needs evaluation.at_end += {needed}", flush=True)
        base = load_config(settings.preset, overrides)

    mapping = dict(space.scheduler)
    if settings.scheduler and settings.scheduler != mapping.get("kind"):
        mapping = {"kind": settings.scheduler}
    scheduler = SchedulerOptions.from_mapping(mapping)
    if scheduler.kind != "none":
        objective_is_intermediate = len(space.metric) == 1 and space.metric[0] in INTERMEDIATE_METRICS
        if scheduler.metric is None:
            scheduler.metric = space.metric[0] if objective_is_intermediate else INTERMEDIATE_METRIC
        if scheduler.mode is None:
            scheduler.mode = space.mode[0] if objective_is_intermediate else "min"
        if scheduler.metric not in INTERMEDIATE_METRICS:
            raise SpaceError(space.source, [
                f"scheduler.metric: {scheduler.metric!r} is not reported during training; the scheduler "
                f"can only use {' or '.join(map(repr, INTERMEDIATE_METRICS))} (reported at every Ray Train checkpoint)"])
    search = settings.search or space.search or "optuna"
    if scheduler.kind == "pbt":
        problems = pbt.check_space(space)
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
        scheduler.options.setdefault("perturbation_interval", pbt.DEFAULT_PERTURBATION_INTERVAL)
    if search == "grid":
        bad = [p.key for p in space.parameters if not p.is_categorical()]
        if bad:
            raise SpaceError(space.source, [f"parameters.{k}: grid search needs 'choice' values" for k in bad])
    trials = space.grid_size() if search == "grid" else (settings.trials or space.trials or 4)
    per_trial = TRIAL_DRIVER_CPUS + base.run.workers * base.run.cpus_per_worker
    max_failures = DEFAULT_MAX_FAILURES if settings.max_failures is None else settings.max_failures
    plan = SearchPlan(search=search, scheduler=scheduler, trials=trials, per_trial_cpus=per_trial,
                      max_concurrent=settings.max_concurrent or space.max_concurrent, overrides=overrides,
                      max_failures=max_failures)
    return space, base, plan


def run_search(settings: SearchSettings) -> dict:
    """Run (or resume) the search named ``settings.name``; returns the summary printed by the CLI."""
    from ray import tune

    from pipeline.data import storage as store
    from pipeline.runtime import ensure_demo_data, init_ray, resolve_workdir, storage_path
    from pipeline.tracking import mlflow_run

    started = time.monotonic()
    space, base, plan = prepare(settings)  # a malformed space fails here, before anything is created
    workdir = resolve_workdir(settings.workdir)
    root = settings.storage.rstrip("/") if settings.storage else str(workdir)
    if not store.is_s3(root):
        root = str(Path(root).resolve())
    tune_root, runs_storage = store.join(root, "tune"), store.join(root, "runs")
    tune_storage_path, tune_filesystem = storage_path(tune_root)
    experiment_path = store.join(tune_root, settings.name)
    stored = _load_stored_settings(experiment_path)
    resuming = tune.Tuner.can_restore(store.join(tune_storage_path, settings.name), storage_filesystem=tune_filesystem)
    if resuming and stored is not None:
        settings = _merge_stored(settings, stored)
        space, base, plan = prepare(settings)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    data_url = settings.data_url or base.data.url or ensure_demo_data(base, workdir)
    tracking_uri = settings.tracking_uri or base.run.tracking_uri or mlflow_run.default_tracking_uri(workdir)
    experiment = base.run.experiment

    parent_params = {
        "search.name": settings.name, "search.algorithm": plan.search,
        "search.scheduler": json.dumps(plan.scheduler.to_dict(), sort_keys=True),
        "search.metric": ",".join(space.metric), "search.mode": ",".join(space.mode),
        "search.trials": plan.trials, "search.preset": settings.preset, "search.space_file": space.source,
        "search.seed": settings.seed, "search.data": data_url, "search.max_failures": plan.max_failures,
        **{f"space.{p.key}": p.describe() for p in space.parameters},
        **{f"set.{k}": v for k, v in plan.overrides.items()},
    }
    parent_id, parent_resumed = runs.open_parent_run(
        tracking_uri, experiment, settings.name, parent_params, kind="search",
        artifact_root=str(workdir / "mlartifacts"), tags={"sparsegen.preset": settings.preset},
        space_text=Path(space.source).read_text())
    print(f"[sparsegen] search '{settings.name}': parent MLflow run {parent_id} at {tracking_uri}"
          f"{' (resumed)' if parent_resumed else ''}", flush=True)

    init_ray(settings.address, math.ceil((plan.max_concurrent or 1) * plan.per_trial_cpus))
    require_storage_on_every_node(root, explicit=settings.storage is not None)
    max_concurrent = plan.max_concurrent or _default_concurrency(plan.per_trial_cpus)
    setup = TrialSetup(preset=settings.preset, overrides=plan.overrides, data_url=data_url, workdir=str(workdir),
                       tracking_uri=tracking_uri, experiment=experiment, storage=runs_storage,
                       search_name=settings.name, parent_run_id=parent_id, scheduler=plan.scheduler.kind)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_driver_resources(TRIAL_DRIVER_CPUS))
    if plan.scheduler.kind == "pbt" and settings.seed is not None:
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
            param_space=space.param_space(plan.search),
            tune_config=tune.TuneConfig(
                # A grid enumerates its own trials (every combination of the choices).
                num_samples=1 if plan.search == "grid" else plan.trials,
                # Tune applies max_concurrent_trials to a Searcher; a BasicVariantGenerator (random, grid)
                # ignores it, so that one takes the limit itself (_search_algorithm).
                max_concurrent_trials=None if plan.search in ("random", "grid") else max_concurrent,
                search_alg=_search_algorithm(plan.search, space, settings.seed, max_concurrent),
                scheduler=_scheduler(plan.scheduler, space),
            ),
            run_config=tune_run_config(settings.name, tune_storage_path, tune_filesystem, plan, tracking_uri,
                                       experiment),
        )
    if any(m not in INTERMEDIATE_METRICS for m in space.metric) or plan.scheduler.metric == "holdout_mse_pm1":
        # Objectives computed at the end of training are absent from the intermediate results, and the
        # holdout MSE is absent from the reports of ranks other than 0.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    mlflow_run.set_tags(tracking_uri, parent_id, {runs.SEARCH_STATUS_TAG: "running"})
    results = tuner.fit()

    trials = collect_trials(results, space, settings.name)
    runs.reconcile_child_runs(trials, setup)
    summary = summarize(trials, space, settings, plan, setup, experiment_path)
    summary["resumed"] = bool(resuming)
    summary["max_concurrent"] = max_concurrent
    summary["duration_s"] = round(time.monotonic() - started, 1)
    log_summary(summary, trials, space, setup)
    return summary


# ---------------------------------------------------------------------------------------------------
# Tune pieces


def tune_run_config(name: str, storage_path: str, filesystem, plan: SearchPlan, tracking_uri: str, experiment: str):
    """The search's ``tune.RunConfig``: where Tune keeps its state, the trials' failure budget
    (``tune.FailureConfig(max_failures=plan.max_failures)``: Tune restarts a failed trial, which continues
    from its latest Ray Train checkpoint) and the callback that marks child runs."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=[TrialStatusCallback(tracking_uri, experiment, name)],
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        verbose=1,
    )


def _search_algorithm(kind: str, space: SearchSpace, seed: int | None, max_concurrent: int = 0):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if kind in ("random", "grid"):
        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)
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


def _scheduler(options: SchedulerOptions, space: SearchSpace):
    if options.kind == "none":
        return None
    if options.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="training_iteration", metric=options.metric, mode=options.mode,
                             max_t=int(options.get("max_t", 1000)), grace_period=int(options.get("grace_period", 1)),
                             reduction_factor=float(options.get("reduction_factor", 2)))
    if options.kind == "pbt":
        return pbt.make_scheduler(options, space)
    raise ValueError(f"unsupported scheduler {options.kind!r}")


def _default_concurrency(per_trial_cpus: float) -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // per_trial_cpus))


def _ray_tune_callback_base():
    from ray.tune import Callback

    return Callback


class TrialStatusCallback(_ray_tune_callback_base()):
    """Tune's trial events (driver side) -> the trials' child runs (``pipeline.tuning.runs``): marked as soon
    as Tune stops one (a scheduler's decision) or it errors for good; each restart of a failed one counted."""

    def __init__(self, tracking_uri: str, experiment: str, search_name: str):
        self.tracking_uri, self.experiment, self.search_name = tracking_uri, experiment, search_name
        self.restarts: dict[str, int] = {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not (trial.last_result or {}).get(FINAL_KEY):
            runs.mark_trial(self.tracking_uri, self.experiment, self.search_name, trial.trial_id, "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        runs.mark_trial(self.tracking_uri, self.experiment, self.search_name, trial.trial_id, "failed")

    def on_trial_recover(self, iteration, trials, trial, **info):
        count = self.restarts[trial.trial_id] = self.restarts.get(trial.trial_id, 0) + 1
        print(f"[sparsegen] trial {trial.trial_id} failed; restarting it (restart {count}), from its latest "
              f"checkpoint", flush=True)
        runs.record_restart(self.tracking_uri, self.experiment, self.search_name, trial.trial_id, count)


# ---------------------------------------------------------------------------------------------------
# After the search


def collect_trials(results, space: SearchSpace, search_name: str) -> list[dict]:
    """Plain trial records from Tune's ``ResultGrid`` (public: each ``Result``'s ``metrics`` = the trial's last
    result, with Tune's auto-filled ``trial_id`` and ``done``; ``config``; ``error``).

    status: failed (an error), finished (the final result, ``FINAL_KEY``), stopped (done without it: a
    scheduler stopped it), unfinished (neither: the search was interrupted)."""
    records = []
    for result in results:
        last = dict(result.metrics or {})
        trial_id = str(last.get("trial_id"))
        if result.error is not None:
            status = "failed"
        elif last.get(FINAL_KEY):
            status = "finished"
        elif last.get("done"):
            status = "stopped"
        else:
            status = "unfinished"
        metrics = {k: float(v) for k, v in last.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in (FINAL_KEY, "done")}
        params = {k: plain((result.config or {}).get(k)) for k in space.keys}
        records.append({"trial_id": trial_id, "status": status, "params": params, "metrics": metrics,
                        "run_id": last.get("mlflow_run_id"), "run_name": runs.trial_run_name(search_name, trial_id),
                        "error": _error_text(result.error) if status == "failed" else None})
    return records


def summarize(trials: list[dict], space: SearchSpace, settings: SearchSettings, plan: SearchPlan,
              setup: TrialSetup, experiment_path) -> dict:
    from pipeline.tuning.report import best_trial, pareto_front

    counts = {s: sum(t["status"] == s for t in trials) for s in ("finished", "stopped", "failed", "unfinished")}
    summary: dict[str, Any] = {
        "name": settings.name, "parent_run_id": setup.parent_run_id, "tracking_uri": setup.tracking_uri,
        "experiment": setup.experiment, "experiment_path": str(experiment_path),
        "search": plan.search, "scheduler": plan.scheduler.kind, "max_failures": plan.max_failures,
        "metric": space.metric, "mode": space.mode, "trials": len(trials), **{f"trials_{k}": v for k, v in counts.items()},
        "trial_runs": {t["trial_id"]: t["run_id"] for t in trials},
    }
    if plan.scheduler.kind == "pbt":  # restarts of trials from other trials' checkpoints
        summary[runs.EXPLOITS_METRIC] = int(sum(t["metrics"].get(runs.EXPLOITS_METRIC, 0) for t in trials))
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


def log_summary(summary: dict, trials: list[dict], space: SearchSpace, setup: TrialSetup) -> None:
    """The summary into the search's parent run (``runs.log_search_summary``)."""
    runs.log_search_summary(summary, trials, space, setup.tracking_uri, setup.parent_run_id)


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


# ---------------------------------------------------------------------------------------------------
# helpers


def _load_stored_settings(experiment_path: str) -> dict | None:
    from pipeline.data import storage as store

    try:
        return json.loads(store.read_bytes(store.join(experiment_path, SETTINGS_FILE)))
    except (OSError, ValueError, LookupError):
        return None
    except Exception:  # noqa: BLE001 - botocore's NoSuchKey and friends: no stored search
        return None


def _merge_stored(current: SearchSettings, stored: dict) -> SearchSettings:
    """Resuming: the stored search's definition wins; say which command-line choices were ignored."""
    keep = SearchSettings(**{k: v for k, v in stored.items() if k in SearchSettings.__dataclass_fields__})
    # Where things live may legitimately be given differently (same store, another spelling).
    for key in ("workdir", "storage", "tracking_uri", "address"):
        setattr(keep, key, getattr(current, key) or getattr(keep, key))
    # (max_failures: Tune restores the stored experiment's FailureConfig.)
    ignored = [k for k in ("space", "preset", "overrides", "data_url", "trials", "max_concurrent", "scheduler",
                           "search", "metric", "mode", "seed", "max_failures")
               if getattr(current, k) not in (None, [], getattr(keep, k))]
    if ignored:
        print(f"[sparsegen] resuming search '{current.name}' as it was defined; ignoring changed "
              f"{', '.join(ignored)}", flush=True)
    return keep


def _error_text(error) -> str:
    text = str(error) if error is not None else ""
    return text[-4000:] if text.strip() else "trial failed (see the Tune trial directory)"
