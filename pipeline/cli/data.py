"""``sparsegen ingest`` and ``sparsegen make-demo-data``: build sharded datasets (see pipeline.data)."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_DATA_ERROR = 2


def register(subparsers) -> None:
    ingest = subparsers.add_parser(
        "ingest",
        help="convert a folder / zip / tar / LMDB of images into WebDataset shards + a Parquet manifest",
        description=(
            "Centre-crop and resize every image of SOURCE (a folder searched recursively for "
            "jpg/png/webp/bmp, a zip or tar archive, or an LSUN-style LMDB export) to SIZE x SIZE RGB PNG, "
            "in sorted name order, and write tar shards plus manifest.parquet to DEST (a local path or "
            "s3://bucket/prefix; S3 honours AWS_ENDPOINT_URL). Bad images are converted or skipped and counted."
        ),
    )
    ingest.add_argument("source", metavar="SOURCE", help="folder, .zip, .tar[.gz] or LMDB directory of images")
    ingest.add_argument("--out", metavar="DEST", required=True, help="output directory or s3://bucket/prefix")
    ingest.add_argument("--size", type=int, default=64, help="output side length in pixels (default 64)")
    ingest.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    ingest.add_argument("--limit", type=int, default=None, metavar="N", help="keep the first N images in sorted order")
    ingest.add_argument(
        "--holdout", type=float, default=0.0, metavar="FRACTION", help="fraction held out for evaluation (default 0)"
    )
    ingest.add_argument("--workers", type=int, default=None, metavar="N", help="decode processes (default: all cores)")
    ingest.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")
    ingest.set_defaults(func=_run_ingest)

    demo = subparsers.add_parser(
        "make-demo-data",
        help="generate the built-in demo dataset (compositional scenes with part ground truth)",
        description=(
            "Render N scenes from a known AND-OR grammar (faces, cars, houses made of typed parts with "
            "variants) and write them as shards like `ingest`, with each part's type, variant and box "
            "stored in the sample JSON and the manifest."
        ),
    )
    demo.add_argument("--out", metavar="DEST", required=True, help="output directory or s3://bucket/prefix")
    demo.add_argument("--n", type=int, required=True, metavar="N", help="number of images")
    demo.add_argument("--size", type=int, default=64, help="side length in pixels (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="grammar sampling seed (default 0)")
    demo.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    demo.add_argument(
        "--holdout", type=float, default=0.1, metavar="FRACTION", help="fraction held out for evaluation (default 0.1)"
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on the last stdout line")
    demo.set_defaults(func=_run_make_demo_data)


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    print(f"wrote {summary['written']} images ({summary['num_train']} train, {summary['num_holdout']} holdout) "
          f"in {len(summary['shards'])} shards; manifest {summary['manifest']}")
    if summary["skipped"]:
        print(f"skipped {summary['skipped']}: {summary['skipped_by_reason']}")
    if summary["converted"]:
        print(f"converted to RGB: {summary['converted']}")


def _write_and_report(command: str, write, json_output: bool) -> int:
    """Run ``write()`` (returns a summary dict); a DataError becomes one stderr line and EXIT_DATA_ERROR."""
    from pipeline.data import DataError

    try:
        summary = write()
    except DataError as error:
        print(f"sparsegen {command}: error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    _report(summary, json_output)
    return 0


def _run_ingest(args: argparse.Namespace) -> int:
    from pipeline.data.ingest import ingest

    return _write_and_report("ingest", lambda: ingest(
        args.source, args.out, size=args.size, shard_size=args.shard_size, limit=args.limit,
        holdout_fraction=args.holdout, workers=args.workers, progress=True,
    ), args.json)


def _run_make_demo_data(args: argparse.Namespace) -> int:
    from pipeline.data.demo import make_demo_data

    return _write_and_report("make-demo-data", lambda: make_demo_data(
        args.out, args.n, size=args.size, seed=args.seed, shard_size=args.shard_size,
        holdout_fraction=args.holdout, progress=True,
    ), args.json)
