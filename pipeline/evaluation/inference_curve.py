"""Holdout reconstruction MSE as a function of the inference chain length (``evaluation.inference_steps``).

Unseen images are inferred by Langevin from the prior, so the holdout MSE depends on how long that chain
runs and on whether it ends with noise-free steps. This tool measures the curve on a checkpoint so the
default of ``evaluation.inference_steps`` / ``inference_noise_free_steps`` can be chosen from data::

    python -m pipeline.evaluation.inference_curve --checkpoint URI --data URL --steps 10,20,50,100,200 [--json]

Each (steps, noise-free steps) point is its own chain from the same prior draw and the same per-batch
seeds as ``holdout_mse`` (``seed + batch number``), so the point at the configured settings equals the
``holdout_mse_pm1`` that ``sparsegen evaluate --metrics mse`` reports for the same images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def parse_int_list(text: str, *, name: str) -> list[int]:
    """"10,20,50" -> [10, 20, 50] (positive, order kept, duplicates dropped)."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name}: expected positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def parse_noise_free(text: str, configured: int) -> list[int | str]:
    """"0,cfg,all,10" -> [0, configured, "all", 10]: "cfg" is the config's value, "all" = every step noise-free."""
    out: list[int | str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "cfg":
            out.append(configured)
        elif item == "all":
            out.append("all")
        else:
            try:
                value = int(item)
            except ValueError:
                raise ValueError(f"--noise-free: expected integers, 'cfg' or 'all', got {item!r}") from None
            if value < 0:
                raise ValueError(f"--noise-free: expected non-negative integers, got {value}")
            out.append(value)
    if not out:
        raise ValueError("--noise-free: nothing given")
    return list(dict.fromkeys(out))


def inference_curve(
    generator: torch.nn.Module,
    cfg,
    images: torch.Tensor,
    steps: list[int],
    *,
    noise_free: list[int | str] = (0,),
    step_size: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per (steps, noise-free steps): per-pixel MSE of reconstructions of ``images`` (in [-1, 1]).

    ``noise_free`` entries are step counts (clamped to each chain's length) or "all". Rows carry
    ``mse_pm1``, ``mse_01`` (= /4, pixels in [0, 1]) and the wall-clock ``seconds`` of
    the chain, which grows linearly with ``steps``: the cost side of the trade-off.
    """
    from tqdm import tqdm

    from pipeline.learning.learner import reconstruct, unwrap

    generator = unwrap(generator)
    device = next(generator.parameters()).device
    batch_size = batch_size or cfg.training.batch_size
    batches = images.split(batch_size)
    points = [(s, s if q == "all" else min(int(q), s)) for s in steps for q in noise_free]
    points = list(dict.fromkeys(points))  # e.g. 10 steps with noise-free 20 and "all" are the same chain
    rows = []
    for total_steps, quiet in tqdm(points, desc="inference curve", disable=not progress, dynamic_ncols=True):
        squared_error, values = 0.0, 0
        started = time.perf_counter()
        for batch_number, batch in enumerate(batches):
            batch = batch.to(device)
            _, recon = reconstruct(generator, batch, cfg, steps=total_steps, noise_free_steps=quiet,
                                   step_size=step_size, seed=seed + batch_number)
            squared_error += float((recon.float() - batch).pow(2).sum())
            values += batch.numel()
        mse_pm1 = squared_error / values
        rows.append({
            "steps": total_steps,
            "noise_free_steps": quiet,
            "mse_pm1": mse_pm1,
            "mse_01": mse_pm1 / 4.0,
            "seconds": time.perf_counter() - started,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluation.inference_curve",
        description="Holdout reconstruction MSE vs Langevin inference steps (with and without a noise-free "
                    "closing) for a checkpoint, to choose evaluation.inference_steps.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint directory (local or s3://)")
    parser.add_argument("--data", default=None, metavar="URL",
                        help="dataset shards; default: the checkpoint config's data.url, else the built-in demo data "
                             "under --workdir (as `sparsegen train` made it)")
    parser.add_argument("--workdir", default=None, help="as for `sparsegen train` (default: $SPARSEGEN_WORKDIR)")
    parser.add_argument("--steps", default="10,20,50,100,200", help="comma-separated chain lengths")
    parser.add_argument("--noise-free", default="0,cfg",
                        help="comma-separated noise-free closing lengths: integers, 'cfg' (the config's "
                             "evaluation.inference_noise_free_steps) or 'all' (default: 0,cfg)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="delta of Eq. 13 (default: evaluation.inference_step_size, else langevin.step_size)")
    parser.add_argument("--images", type=int, default=None,
                        help="images of the split to reconstruct (default: evaluation.mse_images)")
    parser.add_argument("--split", default="holdout", choices=["holdout", "train"])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior draws and noise (as `evaluate`)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print rows and settings as one JSON object on the last line")
    args = parser.parse_args(argv)

    from pipeline.distributed.checkpoint import load_generator
    from pipeline.evaluation.orchestration import read_images

    try:
        cfg, generator = load_generator(args.checkpoint, args.device)
        steps = parse_int_list(args.steps, name="--steps")
        noise_free = parse_noise_free(args.noise_free, cfg.evaluation.inference_noise_free_steps)
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"inference_curve: {error}", file=sys.stderr)
        return 2
    data_url = args.data or cfg.data.url
    if data_url is None:
        from pipeline.runtime import ensure_demo_data, resolve_workdir

        data_url = ensure_demo_data(cfg, resolve_workdir(args.workdir), progress=not args.no_progress)
    from pipeline.data import open_dataset

    info = open_dataset(data_url)
    available = info.num_holdout if args.split == "holdout" else info.num_train
    if available == 0:
        print(f"inference_curve: {data_url} has no {args.split} images (try --split train)", file=sys.stderr)
        return 2
    n = min(args.images or cfg.evaluation.mse_images, available)
    _, images = read_images(data_url, args.split, n, cfg.model.resolution, batch_size=cfg.training.batch_size)
    rows = inference_curve(generator, cfg, images, steps, noise_free=noise_free, step_size=args.step_size,
                           seed=args.seed, progress=not args.no_progress)
    step_size = args.step_size or cfg.evaluation.inference_step_size or cfg.langevin.step_size
    print(f"{args.split} images: {n}, step size {step_size:g}, noise sigma {cfg.langevin.noise_sigma:g}, "
          f"configured: {cfg.evaluation.inference_steps} steps, last {cfg.evaluation.inference_noise_free_steps} "
          f"noise-free")
    print(f"{'steps':>6} {'noise-free':>10} {'mse [-1,1]':>12} {'mse [0,1]':>12} {'seconds':>8}")
    for row in rows:
        print(f"{row['steps']:>6} {row['noise_free_steps']:>10} {row['mse_pm1']:>12.5f} "
              f"{row['mse_01']:>12.5f} {row['seconds']:>8.2f}")
    if args.json:
        print(json.dumps({"rows": rows, "settings": {
            "checkpoint": args.checkpoint, "data_url": data_url, "split": args.split, "images": n,
            "step_size": step_size, "noise_sigma": cfg.langevin.noise_sigma, "seed": args.seed,
            "configured_inference_steps": cfg.evaluation.inference_steps,
            "configured_noise_free_steps": cfg.evaluation.inference_noise_free_steps}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
