"""`sparsegen compare`: a table of training runs (differing params, metrics) and their pictures side by side."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    compare = subparsers.add_parser(
        "compare",
        help="compare training runs from MLflow: differing params, metrics, sample grids and AND-OR trees",
        description=(
            "Print a table of MLflow runs -- every training run of an experiment (default 'sparsegen'), one "
            "search's trials (--search), or the given run ids -- with the params whose values differ between "
            "them and their latest metrics. --png places each run's latest sample grid and AND-OR tree side by "
            "side in one picture."
        ),
    )
    compare.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="MLflow run ids (default: every run of --experiment)")
    compare.add_argument("--experiment", default=None, help="MLflow experiment name (default: sparsegen)")
    compare.add_argument("--search", default=None, metavar="SEARCH_NAME", help="only the trials of this search")
    compare.add_argument("--include-searches", action="store_true", help="also list the searches' parent runs")
    compare.add_argument("--metrics", default=None, metavar="NAME[,NAME...]",
                         help="metrics to show (default: holdout MSE, FID, matching scores, reconstruction MSE...)")
    compare.add_argument("--png", default=None, metavar="OUT.png", help="write the runs' sample grids and AND-OR trees side by side")
    compare.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the workdir's sqlite store)")
    compare.add_argument("--workdir", default=None, help="workdir whose MLflow store to read (default: ./sparsegen-work)")
    compare.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    compare.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pipeline.tracking import mlflow_run
    from pipeline.tuning.compare import CompareError, compare_runs, side_by_side_png
    from pipeline.tuning.report import format_table

    if args.tracking_uri:
        tracking_uri = args.tracking_uri
    else:
        workdir = Path(args.workdir or os.environ.get("SPARSEGEN_WORKDIR") or "sparsegen-work").resolve()
        tracking_uri = mlflow_run.default_tracking_uri(workdir)
        if tracking_uri.startswith("sqlite:") and not (workdir / "mlflow.db").exists():
            print(f"sparsegen: no MLflow store at {workdir / 'mlflow.db'}; give --tracking-uri or --workdir", file=sys.stderr)
            return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        result = compare_runs(tracking_uri, experiment=args.experiment, run_ids=args.run_ids or None,
                              metrics=metrics, search=args.search, include_searches=args.include_searches)
        if args.png:
            rows = result["runs"]
            titles = [f"{r['run']}" for r in rows]
            result["png"] = args.png
            result["pictures"] = side_by_side_png(tracking_uri, [r["run_id"] for r in rows], args.png, titles)
    except CompareError as exc:
        print(f"sparsegen: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        columns = ["run", "status"] + (["trial_status"] if any(r["trial_status"] for r in result["runs"]) else [])
        columns += result["params"] + result["metrics"]
        print(format_table(result["runs"], columns))
        print()
        for row in result["runs"]:
            print(f"{row['run']}: {row['url']}")
        print()
        print(f"{len(result['runs'])} runs; params that differ: {', '.join(result['params']) or 'none'}")
        if args.png:
            print(f"sample grids and AND-OR trees side by side: {args.png}")
        if not tracking_uri.startswith(("http://", "https://")):
            print(f"(the links need the MLflow UI on the same store:  {result['ui']})")
    else:
        print(json.dumps(result, default=str))
    return 0
