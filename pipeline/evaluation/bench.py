"""Evaluation benchmark: how long MSE and Table 4 matching take on ``num_images`` images for a model, and the
FID feature-extraction throughput.

The FID figure uses **randomly initialised Inception weights: it is a throughput benchmark only**, never a FID
value (the real weights cannot be downloaded here). Run::

    python -m pipeline.evaluation.bench --images 1000 --preset tiny --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def bench_evaluation(
    *,
    preset: str = "tiny",
    num_images: int = 1000,
    fid_images: int = 16,
    fid_batch_size: int = 8,
    matching_latents: int = 8,
    matching_units_per_latent: int = 8,
    threads: int | None = None,
    workdir: str | None = None,
    seed: int = 0,
) -> dict:
    """Time holdout MSE and matching on ``num_images`` demo images, and Inception feature extraction.

    Builds a randomly initialised generator of ``preset`` and demo data with ``num_images`` holdout and
    ``num_images`` training images. Returns seconds and images/s per part plus the settings used.
    """
    import torch

    from pipeline.config import load_config
    from pipeline.data import make_demo_data
    from pipeline.evaluation.orchestration import holdout_mse, read_images
    from pipeline.evaluation.fid import extract_features
    from pipeline.evaluation.inception import FIDInceptionV3
    from pipeline.evaluation.matching import matching_score
    from pipeline.learning.learner import prepare_module
    from pipeline.model import build_generator

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(preset, [f"evaluation.mse_images={num_images}", f"evaluation.matching_images={num_images}"])
    torch.manual_seed(seed)
    generator = prepare_module(build_generator(cfg), cfg, torch.device("cpu")).eval()
    root = workdir or tempfile.mkdtemp(prefix="sparsegen-bench-eval-")
    data = os.path.join(root, "data")
    started = time.perf_counter()
    # holdout_fraction 0.5 -> about num_images in each split.
    make_demo_data(data, n=2 * num_images + 40, size=cfg.model.resolution, seed=seed, holdout_fraction=0.5)
    data_seconds = time.perf_counter() - started

    started = time.perf_counter()
    mse = holdout_mse(generator, cfg, data, num_images=num_images, seed=seed)
    mse_seconds = time.perf_counter() - started

    started = time.perf_counter()
    _, images = read_images(data, "train", num_images, cfg.model.resolution)
    matching = matching_score(generator, images, cfg.evaluation.matching_layer, latent_dim=cfg.model.latent_dim,
                              num_latents=matching_latents, units_per_latent=matching_units_per_latent, seed=seed)
    matching_seconds = time.perf_counter() - started

    inception = FIDInceptionV3()  # RANDOM weights: throughput only
    with torch.no_grad():
        fake = generator(torch.randn(fid_images, cfg.model.latent_dim))
    extract_features(inception, [fake[:2]], progress=False)  # warm-up
    started = time.perf_counter()
    extract_features(inception, fake.split(fid_batch_size), progress=False)
    fid_seconds = time.perf_counter() - started
    return {
        "preset": preset,
        "threads": torch.get_num_threads(),
        "num_images": num_images,
        "demo_data_seconds": data_seconds,
        "mse_images": int(mse["holdout_mse_images"]),
        "mse_seconds": mse_seconds,
        "mse_images_per_s": mse["holdout_mse_images"] / mse_seconds,
        # holdout MSE runs the inference chain (evaluation.inference_*), not training's langevin.steps.
        "inference_steps": cfg.evaluation.inference_steps,
        "inference_noise_free_steps": cfg.evaluation.inference_noise_free_steps,
        "matching_images": matching["num_images"],
        "matching_units": matching["scored"],
        "matching_seconds": matching_seconds,
        "mse_plus_matching_seconds": mse_seconds + matching_seconds,
        "fid_feature_images": fid_images,
        "fid_feature_seconds": fid_seconds,
        "fid_feature_images_per_s_RANDOM_WEIGHTS_THROUGHPUT_ONLY": fid_images / fid_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--fid-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(bench_evaluation(preset=args.preset, num_images=args.images, fid_images=args.fid_images,
                                      threads=args.threads), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
