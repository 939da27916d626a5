"""`sparsegen train` and `sparsegen demo`."""

from __future__ import annotations

import argparse
import json
import sys


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset / --config / --set, shared by every command that builds a config."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="preset name: paper64, celeba64, fashion64, cars64, bedroom64, tiny")
    source.add_argument("--config", default=None, help="YAML config file (may name its base with 'preset: NAME')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set langevin.steps=20 (repeatable)")


def config_from_args(args: argparse.Namespace, default_preset: str = "paper64"):
    """The validated config named by --preset/--config/--set, or print the problems and exit 2."""
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(args.config or args.preset or default_preset, args.overrides)
    except ConfigError as exc:
        print(f"sparsegen: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a sparse generator (Algorithm 1) on Ray Train",
        description="Train on Ray Train: an embedded local Ray by default, a cluster with --address / RAY_ADDRESS.",
    )
    add_config_arguments(train)
    train.add_argument("--data", default=None, help="shards URL (local dir or s3://bucket/prefix); default: built-in demo data")
    train.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: run.workers)")
    train.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 = CPU + gloo)")
    steps = train.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    steps.add_argument("--epochs", type=float, default=None, help="stop after this many epochs")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="also stop after this many minutes of training (training.max_train_minutes), at the "
                            "first log interval past it, with the final checkpoint and evaluation")
    train.add_argument("--name", default=None, help="run name; running the same name again resumes it")
    train.add_argument("--storage", default=None, help="checkpoint storage: a local path or s3://bucket/prefix")
    train.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or a local sqlite store)")
    train.add_argument("--experiment", default=None, help="MLflow experiment name")
    train.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    train.add_argument("--resume-from", default=None, metavar="CHECKPOINT_URI|MLFLOW_RUN_ID",
                       help="start a new run from a checkpoint (a checkpoint directory URI or an MLflow run id)")
    train.add_argument("--register-model", default=None, metavar="NAME",
                       help="register the trained generator in the MLflow model registry under NAME (run.register_model)")
    train.add_argument("--workdir", default=None, help="where local runs, the MLflow store and demo data live (default: ./sparsegen-work)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and layer table, then exit")
    train.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    train.set_defaults(func=run_train)

    demo = subparsers.add_parser(
        "demo",
        help="make demo data and train the tiny preset on 2 local Ray workers for a few minutes",
        description="The README's run command: demo data -> shards -> Ray Train (2 workers, tiny) -> MLflow.",
    )
    demo.add_argument("--workdir", default=None, help="working directory (default: ./sparsegen-work)")
    demo.add_argument("--workers", type=int, default=2)
    from pipeline.distributed.trainer import DEMO_MAX_STEPS, DEMO_TRAIN_MINUTES

    demo.add_argument("--max-steps", type=int, default=DEMO_MAX_STEPS,
                      help=f"at most this many training steps of the workers (default {DEMO_MAX_STEPS})")
    demo.add_argument("--max-minutes", type=float, default=DEMO_TRAIN_MINUTES,
                      help=f"at most this many minutes of training, whichever of the two limits comes first "
                           f"(default {DEMO_TRAIN_MINUTES}; 0 = no time limit)")
    demo.add_argument("--images", type=int, default=1024, help="demo images to generate")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=run_demo)


def apply_cli_options(cfg, args: argparse.Namespace):
    """Fold the command-line flags into the config (flags win over the preset and --set)."""
    from pipeline.config import validate

    if getattr(args, "data", None):
        cfg.data.url = args.data
    if getattr(args, "workers", None) is not None:
        cfg.run.workers = args.workers
    if getattr(args, "gpus_per_worker", None) is not None:
        cfg.run.gpus_per_worker = args.gpus_per_worker
    if getattr(args, "max_steps", None) is not None:
        cfg.training.max_steps = args.max_steps
    if getattr(args, "max_minutes", None) is not None:
        cfg.training.max_train_minutes = args.max_minutes
    if getattr(args, "epochs", None) is not None:
        cfg.training.epochs = args.epochs
        cfg.training.max_steps = None
    for flag, key in (("name", "name"), ("storage", "storage"), ("tracking_uri", "tracking_uri"), ("experiment", "experiment"),
                      ("register_model", "register_model")):
        if getattr(args, flag, None):
            setattr(cfg.run, key, getattr(args, flag))
    validate(cfg)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_config

    try:
        cfg = apply_cli_options(load_config(args.config or args.preset or "paper64", args.overrides), args)
    except ConfigError as exc:
        problems = list(exc.problems)
        try:  # the flags' own mistakes too, checked on the config without the --set values
            apply_cli_options(load_config(args.config or args.preset or "paper64"), args)
        except ConfigError as flags:
            problems += [p for p in flags.problems if p not in problems]
        print(f"sparsegen train: error: {ConfigError(problems)}", file=sys.stderr)
        return 2
    if args.dry_run:
        from pipeline.model import describe_layers

        report = {"config": cfg.to_dict(), "layers": describe_layers(cfg)}
        if not args.json:
            _print_layers(report["layers"])
        print(json.dumps(report))
        return 0
    import os

    from pipeline.data.errors import DataError
    from pipeline.distributed.trainer import TrainingError, train
    from pipeline.preflight import PreflightError, check_command, report

    try:
        # Data, storage, MLflow and Ray at once, within seconds, before anything starts.
        check_command(tracking_uri=cfg.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                      address=args.address or os.environ.get("RAY_ADDRESS"), data=cfg.data.url,
                      data_option="--data" if args.data else "data.url", storage=cfg.run.storage)
        result = train(cfg, address=args.address, resume_from=args.resume_from, workdir=args.workdir)
    except (PreflightError, DataError, ConfigError) as exc:  # the user's input: one line naming the fix
        return report("sparsegen train", exc, args)
    except TrainingError as exc:
        print(f"sparsegen: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"run {result['name']} finished: MLflow run {result['run_id']}, checkpoint {result['checkpoint']}, "
              f"model {result['model_uri']}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from pipeline.distributed.trainer import run_demo as demo

    # Bad limits are config errors (load_config inside, before any work): main() reports them in one line.
    result = demo(workdir=args.workdir, workers=args.workers, max_steps=args.max_steps,
                  max_train_minutes=args.max_minutes or None, images=args.images)
    if args.json:
        print(json.dumps(result))
    return 0


def _print_layers(layers: dict) -> None:
    for kind, rows in layers.items():
        print(f"{kind}:")
        print(f"  {'layer':<16}{'output shape':<20}{'k':>8}{'parameters':>14}")
        for row in rows:
            shape = "x".join(map(str, row["output_shape"]))
            k = "-" if row["k"] is None else row["k"]
            print(f"  {row['name']:<16}{shape:<20}{k:>8}{row['parameters']:>14,}")
