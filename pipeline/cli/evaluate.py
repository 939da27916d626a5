"""`sparsegen evaluate`: FID, holdout MSE, Table 4 matching, the AND-OR tree, part interpretability and SWD."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_UNAVAILABLE = 3  # a metric asked for explicitly (e.g. --metrics fid without weights) cannot be computed


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained generator (FID, MSE, matching, AND-OR tree, parts, SWD) and log to its MLflow run",
        description=(
            "Evaluate a checkpoint. With --run the checkpoint is the run's (its Ray-storage checkpoint, else the copy the run keeps in MLflow) and results "
            "are logged into that run; with --checkpoint they are logged into the run named in the checkpoint's "
            "meta.json when the tracking store has it, else only printed. Metrics: fid (needs the TF Inception "
            "weights: --inception-weights or $SPARSEGEN_INCEPTION_WEIGHTS), mse, matching, tree, parts (demo data), "
            "swd (sliced Wasserstein distance on Laplacian-pyramid patches, x 1e3, no download)."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", default=None, metavar="RUN_ID", help="MLflow run id of a training run")
    source.add_argument("--checkpoint", default=None, metavar="URI", help="checkpoint directory (local or s3://)")
    parser.add_argument("--data", default=None, metavar="URL",
                        help="dataset shards (local or s3://); default: the checkpoint config's data.url, else the "
                             "built-in demo data under --workdir (as `sparsegen train` made it)")
    parser.add_argument("--workdir", default=None,
                        help="where local runs, the MLflow store and demo data live (default: $SPARSEGEN_WORKDIR or "
                             "./sparsegen-work, as for `sparsegen train`)")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated subset of fid,mse,matching,tree,parts,swd or 'all' (default: the config's "
                             "evaluation.at_end). Metrics named here are required: if one cannot be computed the "
                             f"command exits {EXIT_UNAVAILABLE}")
    parser.add_argument("--samples", type=int, default=None,
                        help="generated images for FID (default: as many as training images, as the paper)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH|URL|S3_URI",
                        help="pt_inception-2015-12-05-6726825d.pth (default: $SPARSEGEN_INCEPTION_WEIGHTS)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the checkpoint config's run.tracking_uri, else "
                             "MLFLOW_TRACKING_URI, else the sqlite store under --workdir, as for `sparsegen train`)")
    parser.add_argument("--out", default=None, help="directory for artifacts (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the latents drawn for FID, SWD, matching and the tree, and of SWD's patches")
    parser.add_argument("--no-log", action="store_true", help="do not log into MLflow, only print")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object on the last stdout line")
    parser.set_defaults(func=run_evaluate)


def _tracking_uri(args, cfg=None) -> str:
    """The same store `sparsegen train` uses: flag, config, $MLFLOW_TRACKING_URI, sqlite under the workdir."""
    if args.tracking_uri:
        return args.tracking_uri
    if cfg is not None and cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    from pipeline.runtime import resolve_workdir
    from pipeline.tracking.mlflow_run import default_tracking_uri

    return default_tracking_uri(resolve_workdir(args.workdir))


def run_evaluate(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from pipeline.evaluation.orchestration import (
        MetricUnavailable,
        checkpoint_of_run,
        evaluate,
        log_to_mlflow,
        parse_metrics,
        run_exists,
    )

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        requested = parse_metrics(args.metrics) if args.metrics is not None else None
    except ValueError as error:
        print(f"sparsegen evaluate: {error}", file=sys.stderr)
        return 2

    # Which checkpoint, and which run (if any) to log into.
    log_run, tracking_uri = None, None
    if args.run:
        tracking_uri = _tracking_uri(args)
        try:
            checkpoint = checkpoint_of_run(args.run, tracking_uri)
        except Exception as error:  # noqa: BLE001 - MlflowException / LookupError, reported the same way
            print(f"sparsegen evaluate: cannot find the checkpoint of run {args.run}: {error}", file=sys.stderr)
            return 2
        log_run = args.run
    else:
        checkpoint = args.checkpoint

    from pipeline.distributed.checkpoint import META_FILE, load_generator

    try:
        cfg, generator = load_generator(checkpoint, args.device)
    except (FileNotFoundError, OSError) as error:
        print(f"sparsegen evaluate: {error}", file=sys.stderr)
        return 2
    if log_run is None and not args.no_log:
        meta = _read_meta(checkpoint, META_FILE)
        candidate = meta.get("mlflow_run_id")
        tracking_uri = _tracking_uri(args, cfg) if candidate else None
        if candidate and run_exists(candidate, tracking_uri):
            log_run = candidate
        elif candidate:
            print(f"sparsegen evaluate: checkpoint names MLflow run {candidate}, which the tracking store "
                  f"{tracking_uri} does not have; printing only", file=sys.stderr)

    metrics = requested if requested is not None else parse_metrics(cfg.evaluation.at_end)
    data_url = args.data or cfg.data.url
    if data_url is None and set(metrics) & {"fid", "mse", "matching", "parts", "swd"}:
        # The run trained on the built-in demo data: the same shards, made once under the workdir.
        from pipeline.runtime import ensure_demo_data, resolve_workdir

        data_url = ensure_demo_data(cfg, resolve_workdir(args.workdir), progress=not args.no_progress)
    out_dir = args.out or tempfile.mkdtemp(prefix="sparsegen-eval-")
    try:
        results, artifacts = evaluate(
            cfg, generator, data_url, metrics, samples=args.samples, inception_weights=args.inception_weights,
            out_dir=out_dir, progress=not args.no_progress, strict=requested is not None, seed=args.seed)
    except MetricUnavailable as error:
        print(f"sparsegen evaluate: {error.metric}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    summary = json.loads(open(artifacts["summary"]).read())
    for metric, reason in summary.get("unavailable", {}).items():
        print(f"sparsegen evaluate: {metric} not computed: {reason}", file=sys.stderr)

    if log_run and not args.no_log:
        log_to_mlflow(log_run, results, artifacts, tracking_uri=tracking_uri)
        from pipeline.tracking.models import log_generator, model_uri_of_run

        if model_uri_of_run(tracking_uri, log_run) is None:  # e.g. a run trained before models were logged
            print(f"logged the generator as MLflow model {log_generator(tracking_uri, log_run, generator, cfg)}",
                  file=sys.stderr)
        print(f"logged {len(results)} metrics and {len(artifacts)} artifacts into MLflow run {log_run}", file=sys.stderr)
    for name, value in results.items():
        print(f"{name:40s} {value:.6g}")
    print(f"artifacts in {out_dir}")
    if args.json:
        import math

        # Strict JSON: non-finite values (e.g. a NaN score with nothing scored) become null.
        print(json.dumps({k: (v if math.isfinite(v) else None) for k, v in results.items()}, sort_keys=True))
    return 0


def _read_meta(checkpoint: str, name: str) -> dict:
    from pipeline.data import storage

    uri = checkpoint[len("file://"):] if checkpoint.startswith("file://") else checkpoint
    try:
        return json.loads(storage.read_bytes(storage.join(uri, name)))
    except (FileNotFoundError, OSError, ValueError):
        return {}
