"""`sparsegen bench step | data | ray`: the benchmarks behind the README's Performance section."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli.train import add_config_arguments, config_from_args


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: one ABP iteration, the data path, Ray's overhead")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND")
    kinds.required = True

    step = kinds.add_parser("step", help="time one Algorithm 1 iteration vs two baseline implementations",
                            description="Median time of a full Algorithm 1 iteration and of its Langevin loop, "
                                        "dense-equivalent FLOPs per image, achieved FLOP/s vs this machine's "
                                        "measured dense peak, and the speed-ups over a naive implementation "
                                        "(parameter gradients in every Langevin step) and over a competent "
                                        "plain-PyTorch one (parameters frozen in Langevin, dense convs, default "
                                        "layout). The iteration and the baselines are timed in turn, as are "
                                        "the Langevin loop and the dense peak, so a shared machine slows all "
                                        "sides alike.")
    add_config_arguments(step)
    step.add_argument("--batch", type=int, default=8, help="images per iteration")
    step.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    step.add_argument("--steps", type=int, default=5, help="timed repeats (medians), after one warm-up")
    step.add_argument("--no-baseline", action="store_true",
                      help="skip the naive baseline (parameter gradients in every Langevin step)")
    step.add_argument("--no-plain", action="store_true",
                      help="skip the competent plain-PyTorch baseline (frozen parameters in Langevin, dense convs)")
    step.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads (default: torch's, the number of cores); 1 keeps timings "
                           "stable on a machine whose cores other jobs keep busy")
    step.add_argument("--json", action="store_true")
    step.set_defaults(func=run_step)

    data = kinds.add_parser("data", help="shard ingest and read throughput vs the trainer's consumption",
                            description="Ingest (folder of JPEGs -> shards) and read (local, and S3 on loopback) "
                                        "throughput, next to how fast the trainer consumes images for a preset.")
    add_config_arguments(data)
    data.add_argument("--source", default=None, help="a folder of images (default: generated photo-like JPEGs)")
    data.add_argument("--n", type=int, default=2000, help="generated images when --source is not given")
    data.add_argument("--size", type=int, default=None,
                      help="image side for ingest and read (default: the preset's resolution)")
    data.add_argument("--batch", type=int, default=32, help="trainer batch for the consumption rate")
    data.add_argument("--s3-loopback", action="store_true", help="also read from a moto_server on 127.0.0.1")
    data.add_argument("--json", action="store_true")
    data.set_defaults(func=run_data)

    ray_parser = kinds.add_parser("ray", help="Ray Train (1 and 2 workers) vs the bare loop",
                                  description="Steady-state images/s of the bare loop, Ray Train with 1 worker and "
                                              "with 2 workers on the same steps, and time to first step.")
    add_config_arguments(ray_parser)
    ray_parser.add_argument("--steps", type=int, default=40)
    ray_parser.add_argument("--workdir", default=None)
    ray_parser.add_argument("--json", action="store_true")
    ray_parser.set_defaults(func=run_ray)


def _emit(result: dict, as_json: bool) -> int:
    if not as_json:
        width = max(map(len, result))
        for key, value in result.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    print(json.dumps(result))
    return 0


def run_step(args: argparse.Namespace) -> int:
    from pipeline.learning.bench import bench_step

    cfg = config_from_args(args, default_preset="tiny")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    result = bench_step(cfg, args.batch, device=args.device, repeats=args.steps,
                        with_baseline=not args.no_baseline, with_plain=not args.no_plain, progress=_progress)
    return _emit(result, args.json)


def run_data(args: argparse.Namespace) -> int:
    import os

    from pipeline.data.bench import _start_loopback_moto, bench_data
    from pipeline.learning.bench import bench_step

    cfg = config_from_args(args, default_preset="tiny")
    server, endpoint, s3_url = None, None, None
    if args.s3_loopback:
        for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(name, value)
        server, endpoint = _start_loopback_moto()
    try:
        _progress("ingest and read")
        result = bench_data(args.source, n_images=args.n, size=args.size or cfg.model.resolution, s3_url=s3_url,
                            s3_endpoint=endpoint)
    finally:
        if server is not None:
            server.kill()
            server.wait()
    _progress(f"trainer consumption ({cfg.preset}, batch {args.batch})")
    step = bench_step(cfg, args.batch, repeats=2, with_baseline=False, with_plain=False)
    result["trainer_images_per_s"] = step["iteration_images_per_s"]
    read_key = next((k for k in ("local_read_images_per_s", "read_images_per_s") if k in result), None)
    if read_key:
        result["reader_over_trainer"] = result[read_key] / step["iteration_images_per_s"]
    return _emit(result, args.json)


def run_ray(args: argparse.Namespace) -> int:
    from pipeline.distributed.bench import bench_ray

    cfg = config_from_args(args, default_preset="tiny")
    result = bench_ray(cfg, steps=args.steps, workdir=args.workdir, progress=_progress)
    return _emit(result, args.json)
