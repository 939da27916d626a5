"""`sparsegen ablation`: Table 4 of the paper as one command (sparse vs dense, trained alike, evaluated alike)."""

from __future__ import annotations

import argparse
import json
import sys

# Kept in step with pipeline.tuning.ablation (which is not imported here, so --help stays fast).
_ARMS = "sparse, dense, sparse-nocritic, dense-nocritic"


def _budget_help() -> str:
    from pipeline.tuning.ablation import ABLATION_MAX_STEPS  # stdlib-only module scope: cheap

    steps = ", ".join(f"{p} {'its epochs' if n is None else n}" for p, n in ABLATION_MAX_STEPS.items())
    return (f"optimiser steps per arm (default per preset, pipeline.tuning.ablation.ABLATION_MAX_STEPS: {steps}; "
            f"'its epochs' = the preset's training.epochs)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablation",
        help="Table 4: train a sparse and a dense generator alike and compare matching score, NMI and MSE",
        description=(
            "Train the arms (sparse = the preset as it is; dense = every model.sparsity k null and "
            "sparsity_schedule.kind fixed; suffix -nocritic = training.critic_weight 0) with the same seed, data "
            "and budget as Ray Train runs, a Ray Tune grid over the arms (each a nested MLflow child run of one "
            "parent run). Then evaluate each trained arm and its untrained initialisation (same seed, the "
            "generator before any step): holdout_mse_pm1, swd (when available), matching_score_<layer> (max NCC, "
            "crop to support), _image_mean, _field (fixed projective-field window), the reference points "
            "matching_reference_blob_<layer> / _holdout_<layer> (a dark blob / unseen image patches in the same "
            "boxes) and, on demo data, parts "
            "purity / NMI. Prints the table with sparse/dense ratios and logs ablation.json, ablation.md and a "
            "side-by-side PNG of the arms' part-level basis functions into the parent run."
        ),
    )
    parser.add_argument("--preset", default="tiny", help="preset of every arm (default: tiny)")
    parser.add_argument("--data", default=None, metavar="URL",
                        help="shards (local dir or s3://), or a folder of images (ingested once); default: the "
                             "built-in demo data under --workdir")
    parser.add_argument("--arms", default="sparse,dense", metavar="ARM[,ARM...]",
                        help=f"comma-separated arms from {_ARMS} (default: sparse,dense)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help=_budget_help())
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="Ray Train workers per arm (default: the preset's run.workers)")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="M",
                        help="arms training at once (default: every arm when the cores hold their workers, "
                             "e.g. 2 arms x 1 worker on 2 cores)")
    parser.add_argument("--name", default=None,
                        help="ablation name: the parent MLflow run, arms '<name>-<arm>' (default: ablation-<preset>-<time>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value of every arm, e.g. --set langevin.steps=20 (repeatable)")
    parser.add_argument("--workdir", default=None,
                        help="runs, Tune state, MLflow store and demo data (default: $SPARSEGEN_WORKDIR or ./sparsegen-work)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the sqlite store under --workdir)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    parser.set_defaults(func=run_ablation)


def input_problems(settings) -> list[str]:
    """Every mistake in --arms, the budget flags, --preset and --set (one message each), checked together."""
    from pipeline.config import ConfigError, load_config
    from pipeline.tuning.ablation import AblationError, parse_arms

    problems = []
    try:
        parse_arms(settings.arms)
    except AblationError as exc:
        problems.append(str(exc))
    for flag, value in (("--max-steps", settings.max_steps), ("--workers", settings.workers),
                        ("--max-concurrent", settings.max_concurrent)):
        if value is not None and value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    try:
        load_config(settings.preset, list(settings.overrides))
    except ConfigError as exc:
        problems.extend(exc.problems)
    return problems


def run_ablation(args: argparse.Namespace) -> int:
    import os
    import time

    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.preflight import PreflightError, check_command, report
    from pipeline.tuning.ablation import AblationError, AblationSettings, format_table, prepare, summary_json

    name = args.name or f"ablation-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = AblationSettings(
        name=name, preset=args.preset, arms=args.arms, data_url=args.data, max_steps=args.max_steps,
        workers=args.workers, max_concurrent=args.max_concurrent, overrides=list(args.overrides),
        workdir=args.workdir, tracking_uri=args.tracking_uri, address=args.address)
    problems = input_problems(settings)
    if problems:  # every mistake in the arms, budget, preset and --set at once, before anything starts
        return report("sparsegen ablation", AblationError("; ".join(problems)), args)
    try:
        plan = prepare(settings)
        check_command(tracking_uri=args.tracking_uri or plan.base.run.tracking_uri
                      or os.environ.get("MLFLOW_TRACKING_URI"),
                      address=args.address or os.environ.get("RAY_ADDRESS"), data=args.data)
        from pipeline.tuning.ablation import run_ablation as run

        summary = run(settings)
    except (AblationError, DataError, PreflightError) as exc:
        return report("sparsegen ablation", exc, args)
    except ConfigError as exc:
        return report("sparsegen ablation", AblationError(f"invalid configuration: {'; '.join(exc.problems)}"), args)
    if summary["failed"]:
        for arm, error in summary["failed"].items():
            last = (error.strip().splitlines() or ["?"])[-1]
            print(f"sparsegen ablation: arm {arm} failed: {last}", file=sys.stderr)
    print()
    print(f"ablation '{summary['name']}' ({summary['preset']}, "
          + (f"{summary['max_steps']} steps" if summary["max_steps"] else f"{summary['epochs']:g} epochs")
          + f" per arm, seed {summary['seed']}) in {summary['wall_time_s']} s:")
    print(format_table(summary, summary["layer"]))
    print(f"parent MLflow run {summary['parent_run_id']} in experiment '{summary['experiment']}' "
          f"(ablation.json, ablation.md, basis functions PNG)")
    print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000")
    if args.json:
        print(json.dumps(summary_json(summary)))
    return 1 if summary["failed"] else 0
