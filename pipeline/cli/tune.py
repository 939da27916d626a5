"""`sparsegen tune`: hyperparameter search, each trial a full distributed training run (Ray Tune over Ray Train)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    tune = subparsers.add_parser(
        "tune",
        help="search hyperparameters (k per layer, sparsity schedule, Langevin settings, critic weight) with Ray Tune",
        description=(
            "Run a Ray Tune search whose trials are full Ray Train runs of `sparsegen train`. The search space is "
            "a YAML file (or the name of a shipped one: paper, cpu-small) mapping dotted config keys to "
            "distributions, e.g. 'parameters: {langevin.steps: {choice: [10, 20]}, langevin.step_size: "
            "{loguniform: [0.05, 0.5]}}'. ASHA stops weak trials early on an intermediate metric reported at every checkpoint (holdout_mse_pm1 or the training reconstruction_mse); "
            "PBT (--scheduler pbt, with search random or grid) instead restarts weak trials from a strong trial's checkpoint "
            "with perturbed hyperparameters every 'perturbation_interval' checkpoints (keys that change parameter shapes cannot be searched). "
            "MLflow gets one parent run per search and one nested child run per trial. Running the same --name "
            "again resumes an interrupted search."
        ),
    )
    tune.add_argument("--preset", default="tiny", help="base preset of every trial (default: tiny)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a base config value for every trial (repeatable)")
    tune.add_argument("--data", default=None, help="shards URL (local dir or s3://...); default: built-in demo data")
    tune.add_argument("--space", required=True, metavar="SPACE.yaml",
                      help="search-space YAML file, or a shipped space name (paper, cpu-small)")
    tune.add_argument("--trials", type=int, default=None, metavar="N",
                      help="number of trials (default: the space's 'trials', else 4; grid: every combination)")
    tune.add_argument("--max-concurrent", type=int, default=None, metavar="M",
                      help="trials running at once (default: the space's, else as many as the CPUs allow)")
    tune.add_argument("--scheduler", choices=["asha", "pbt", "none"], default=None,
                      help="asha: stop weak trials early; pbt: population-based training (weak trials continue from strong "
                           "trials' checkpoints with perturbed hyperparameters; needs --search random or grid); "
                           "none (default: the space's, else asha)")
    tune.add_argument("--search", choices=["optuna", "random", "grid"], default=None,
                      help="search algorithm (default: the space's, else optuna)")
    tune.add_argument("--metric", default=None, metavar="NAME[,NAME]",
                      help="objective(s); two comma-separated names for a Pareto search "
                           "(default: the space's, else reconstruction_mse)")
    tune.add_argument("--mode", default=None, metavar="min|max[,min|max]", help="one mode per metric")
    tune.add_argument("--name", default=None, help="search name; running the same name again resumes it")
    tune.add_argument("--seed", type=int, default=None, help="seed of the search algorithm")
    tune.add_argument("--workdir", default=None, help="runs, Tune state, MLflow store and demo data (default: ./sparsegen-work)")
    tune.add_argument("--storage", default=None, metavar="PATH|s3://BUCKET/PREFIX",
                      help="trial checkpoints (<storage>/runs) and Tune state (<storage>/tune): a path every node "
                           "of the cluster shares, or s3:// (default: the --workdir, on one machine only)")
    tune.add_argument("--max-failures", type=int, default=None, metavar="N",
                      help="restarts of a failed trial (a lost node, a crashed worker or driver), each from the "
                           "trial's latest checkpoint (default: 1; 0: a failed trial stays failed)")
    tune.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or a local sqlite store)")
    tune.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    tune.add_argument("--check", action="store_true", help="validate the space and the config, print the plan, exit")
    tune.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    tune.set_defaults(func=run_tune)


def settings_from_args(args: argparse.Namespace):
    import time

    from pipeline.tuning.settings import SearchSettings

    split = lambda text: [v.strip() for v in text.split(",") if v.strip()] if text else None  # noqa: E731
    name = args.name or f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    return SearchSettings(
        name=name, space=args.space, preset=args.preset, overrides=list(args.overrides), data_url=args.data,
        workdir=args.workdir, storage=args.storage, tracking_uri=args.tracking_uri, address=args.address, trials=args.trials,
        max_concurrent=args.max_concurrent, scheduler=args.scheduler, search=args.search,
        metric=split(args.metric), mode=split(args.mode), seed=args.seed, max_failures=args.max_failures,
    )


def run_tune(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.data.errors import DataError
    from pipeline.preflight import PreflightError, report
    from pipeline.tuning.space import SpaceError

    settings = settings_from_args(args)
    for flag, value in (("--trials", args.trials), ("--max-concurrent", args.max_concurrent)):
        if value is not None and value < 1:
            print(f"sparsegen: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.max_failures is not None and args.max_failures < 0:
        print(f"sparsegen: --max-failures must be >= 0, got {args.max_failures}", file=sys.stderr)
        return 2
    try:
        if args.check:
            from pipeline.tuning.search import prepare

            space, base, resolved = prepare(settings)
            plan = {"name": settings.name, "space": space.source, "parameters": {p.key: p.describe() for p in space.parameters},
                    "metric": space.metric, "mode": space.mode, "search": resolved.search,
                    "scheduler": resolved.scheduler.to_dict(), "trials": resolved.trials,
                    "max_concurrent": resolved.max_concurrent, "max_failures": resolved.max_failures,
                    "overrides": resolved.overrides}
            if not args.json:
                print(f"search space {space.source} is valid:")
                for key, text in plan["parameters"].items():
                    print(f"  {key:<34} {text}")
            print(json.dumps(plan, default=str))
            return 0
        from pipeline.tuning.search import SearchError, prepare, run_search

        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # run_search prepares (and prints) again
            base = prepare(settings)[1]  # config mistakes first, then data, storage, MLflow, Ray
        _preflight(settings, base)
        summary = run_search(settings)
    except (SpaceError, ConfigError) as exc:
        print(f"sparsegen: {exc}", file=sys.stderr)
        return 2
    except (PreflightError, DataError, SearchError) as exc:  # the user's input: one line naming the fix
        return report("sparsegen tune", exc, args)
    if not args.json:
        _print_summary(summary)
    else:
        print(json.dumps({k: v for k, v in summary.items() if k != "best_config"}, default=str))
    return 0 if summary["trials_finished"] > 0 else 1


def _preflight(settings, base) -> None:
    """What the search needs from outside (pipeline.preflight), checked at once before any trial starts."""
    import os

    from pipeline.preflight import check_command

    check_command(tracking_uri=settings.tracking_uri or base.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                  address=settings.address or os.environ.get("RAY_ADDRESS"), data=settings.data_url or base.data.url,
                  data_option="--data" if settings.data_url else "data.url", storage=settings.storage)


def _print_summary(summary: dict) -> None:
    from pipeline.tuning.report import format_table

    print()
    print(f"search '{summary['name']}' ({summary['search']}, scheduler {summary['scheduler']}): "
          f"{summary['trials_finished']} finished, {summary['trials_stopped']} stopped early, "
          f"{summary['trials_failed']} failed, {summary['trials_unfinished']} unfinished "
          f"in {summary['duration_s']} s")
    print(format_table(summary["table"]))
    if "best" in summary:
        best = summary["best"]
        metric = summary["metric"][0]
        print(f"best trial {best['trial_id']}: {metric}={best[metric]:.5g} with "
              + ", ".join(f"{k}={v}" for k, v in best["params"].items()) + f" (MLflow run {best['run_id']})")
    if "pareto" in summary:
        print(f"Pareto front over {', '.join(f'{m} ({d})' for m, d in zip(summary['metric'], summary['mode']))}: "
              + ", ".join(p["trial_id"] for p in summary["pareto"]))
    if summary.get("warning"):
        print(f"warning: {summary['warning']}")
    print(f"parent MLflow run {summary['parent_run_id']} in experiment '{summary['experiment']}'")
    print(f"  compare the trials:  sparsegen compare --experiment {summary['experiment']} --tracking-uri {summary['tracking_uri']}")
    print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000")
