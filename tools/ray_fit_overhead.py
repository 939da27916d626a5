"""The fixed cost of one Ray Train run on this machine: ``TorchTrainer.fit()`` of a loop that only reports.

No model, no data, no MLflow: what is measured is Ray's own start-up (controller, placement group, worker
processes, torch.distributed process group) and shutdown. Every training, tuning and ablation test pays it
once per run (more after a crash), so it sets the floor under the test suite's time. A local Ray is started
first and not counted.

    python tools/ray_fit_overhead.py --workers 1 2 --repeats 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _report_once(_config):
    import ray.train

    ray.train.report({"step": 1})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker-group sizes to time (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per size (default: 2)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last stdout line")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(w < 1 for w in args.workers):
        print("ray_fit_overhead: --workers and --repeats must be >= 1", file=sys.stderr)
        return 2

    # The test suite's health-check interval, so the figure is the one its runs pay.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=max(4, max(args.workers)), include_dashboard=False, log_to_driver=False)
    fit_s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as storage:
        for workers in args.workers:
            for repeat in range(args.repeats):
                started = time.monotonic()
                TorchTrainer(_report_once, scaling_config=ray.train.ScalingConfig(num_workers=workers),
                             run_config=ray.train.RunConfig(name=f"fit-{workers}-{repeat}", storage_path=storage)).fit()
                fit_s.setdefault(str(workers), []).append(round(time.monotonic() - started, 2))
                if not args.json:
                    print(f"{workers} worker(s), run {repeat + 1}: {fit_s[str(workers)][-1]:.1f} s", flush=True)
    ray.shutdown()
    summary = {"fit_s": fit_s, "cpu_count": os.cpu_count()}
    print(json.dumps(summary) if args.json else f"fit seconds by worker count: {fit_s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
