"""`sparsegen compare`: a table of training runs (differing params, metrics) and their pictures side by side."""

from __future__ import annotations

import argparse
import json
import re
import sys


def register(subparsers) -> None:
    compare = subparsers.add_parser(
        "compare",
        help="compare training runs from MLflow: differing params, metrics, sample grids and AND-OR trees",
        description=(
            "Print a table of MLflow runs -- every training run of an experiment (default 'sparsegen'), one "
            "search's trials (--search), or the given run ids -- with the params whose values differ between "
            "them and their latest metrics. --png places each run's latest sample grid and AND-OR tree side by "
            "side in one picture; --samples-grid only the sample grids, captioned with the run names. Each run "
            "comes with its MLflow UI link (key 'url' in --json): the server's page on an http(s) tracking URI, "
            "else the page of `mlflow ui --backend-store-uri <store> --port 5000` (the command is printed)."
        ),
    )
    compare.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="MLflow run ids (default: every run of --experiment)")
    compare.add_argument("--experiment", default=None, help="MLflow experiment name (default: sparsegen)")
    compare.add_argument("--search", default=None, metavar="SEARCH_NAME", help="only the trials of this search")
    compare.add_argument("--include-searches", action="store_true", help="also list the searches' parent runs")
    compare.add_argument("--metrics", default=None, metavar="NAME[,NAME...]",
                         help="metrics to show (default: holdout MSE, FID, matching scores, reconstruction MSE...)")
    compare.add_argument("--png", default=None, metavar="OUT.png", help="write the runs' sample grids and AND-OR trees side by side")
    compare.add_argument("--samples-grid", default=None, metavar="OUT.png",
                         help="write only the runs' latest sample grids (artifacts samples/samples_step<step>.png, "
                              "highest step) side by side in one PNG, each captioned with its run name")
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
        if args.samples_grid:
            result["samples_grid"] = args.samples_grid
            result["sample_grids"] = samples_side_by_side(tracking_uri, result["runs"], args.samples_grid)
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
        if args.samples_grid:
            missing = [r["run"] for r in result["runs"] if not result["sample_grids"][r["run_id"]]]
            print(f"latest sample grids side by side: {args.samples_grid}"
                  + (f" (no samples/ grid in: {', '.join(map(str, missing))})" if missing else ""))
        if not tracking_uri.startswith(("http://", "https://")):
            print(f"(the links need the MLflow UI on the same store:  {result['ui']})")
    else:
        print(json.dumps(result, default=str))
    return 0


_SAMPLES_ARTIFACT = re.compile(r"samples_step(\d+)\.png$")
_CAPTION_PX = 18
_GAP_PX = 8


def latest_samples_artifact(client, run_id: str) -> str | None:
    """The run's sample grid artifact with the highest step (samples/samples_step<step>.png), else None."""
    from pipeline.tuning.compare import _latest, _list_pngs

    return _latest([p for p in _list_pngs(client, run_id, "samples") if _SAMPLES_ARTIFACT.search(p)])


def samples_side_by_side(tracking_uri: str, rows: list[dict], out_path: str) -> dict:
    """One PNG: each run's latest sample grid at its own size, left to right in the table's order, with the run
    name above it; a run without a grid gets a grey 'no samples' tile. Returns {run_id: artifact or None}."""
    import tempfile
    from pathlib import Path

    from PIL import Image, ImageDraw, ImageFont

    from pipeline.tracking import mlflow_run
    from pipeline.tuning.compare import _download

    client = mlflow_run.client(tracking_uri)
    font = ImageFont.load_default()
    found: dict[str, str | None] = {}
    tiles = []
    with tempfile.TemporaryDirectory(prefix="sparsegen-compare-") as directory:
        for row in rows:
            artifact = latest_samples_artifact(client, row["run_id"])
            picture = None
            if artifact:
                local = _download(client, row["run_id"], artifact, directory)
                try:
                    if local is None:
                        raise OSError("not downloadable")
                    with Image.open(local) as image:
                        picture = image.convert("RGB")
                except OSError:  # listed but not downloadable, or not an image: shown as missing
                    artifact = None
            found[row["run_id"]] = artifact
            if picture is None:
                picture = Image.new("RGB", (128, 128), (220, 220, 220))
                ImageDraw.Draw(picture).text((64, 64), "no samples", fill=(90, 90, 90), font=font, anchor="mm")
            caption = str(row.get("run") or row["run_id"][:8])
            if artifact:
                caption += f"  (step {int(_SAMPLES_ARTIFACT.search(artifact).group(1))})"
            tiles.append((caption, picture))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(p.width, int(measure.textlength(c, font=font)) + 4) for c, p in tiles]
    height = _CAPTION_PX + max(p.height for _, p in tiles)
    canvas = Image.new("RGB", (sum(widths) + _GAP_PX * (len(tiles) + 1), height + 2 * _GAP_PX), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = _GAP_PX
    for (caption, picture), width in zip(tiles, widths):
        draw.text((left + width // 2, _GAP_PX + _CAPTION_PX // 2), caption, fill=(0, 0, 0), font=font, anchor="mm")
        canvas.paste(picture, (left + (width - picture.width) // 2, _GAP_PX + _CAPTION_PX))
        left += width + _GAP_PX
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return found
