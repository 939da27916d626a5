"""Where Table 4's matching score comes from: the same conv8 units scored several ways.

Table 4's basis function of a unit (``pipeline.evaluation.basis``) is its contribution with the ReLU / top-k
masks of the forward pass frozen. This script scores the units of ``matching_score`` (8 strongest units of
each of 8 Z's, support crop, gray NCC over the first 100 training images) four ways:

* ``frozen``: Table 4's number (``matching_score_conv8``);
* ``open_last_block``: the masks of the last block (conv32 for ``tiny``) opened, i.e. all ones;
* ``open_all``: every mask below the unit opened, so the basis function is the unit's linear pattern;
* ``posterior``: frozen masks, but the 8 Z's inferred from 8 other training images
  (``evaluation.inference_steps`` Langevin chain) instead of drawn from N(0, I); ``posterior_latent_std``
  is the standard deviation of those Z's entries (1 under the prior);
* ``per_channel``: frozen masks, but one unit per conv8 channel (its strongest over the 8 prior Z's), so the
  score is the dictionary's mean rather than that of the few channels with the largest activations;
* ``holdout_patches``: not the model's patterns but real image parts in their place: each ``frozen`` basis
  function's crop box filled with the pixels of a holdout image (the i-th box from holdout image i mod 64),
  scored the same way. It is what a basis function that looked exactly like a part of an unseen image, at
  the same size and place, would score: the ceiling of Table 4's number on these data (the pipeline reports
  it as ``matching_reference_holdout_conv8``, with one holdout image per box);
* ``dark_blobs``: each box filled with the same meaningless pattern, a dark isotropic Gaussian (sigma a
  quarter of the box side) on a zero ground, in all three channels: what a dictionary of one generic blob
  scores, a floor for "part-like" (``matching_reference_blob_conv8`` in the pipeline).

``weights_from_init`` says how much of each trained weight tensor is still its random start: per layer,
the coefficient c of W0 in W (W projected on the initial draw W0 of ``initial_generator``, 1 = untouched)
and ||W - W0|| / ||W0||.

The gap between ``frozen`` and ``open_all`` is what the frozen masks of the image do to a lone unit's
pattern; comparing it between a sparse and a dense model says whether Table 4 separates them by their
dictionaries or by their masks. Diagnostic only: the pipeline's metric stays ``frozen``.

    python tools/matching_diagnosis.py --checkpoint quick-train/NAME/generator.pt --data DIR --json
    python tools/matching_diagnosis.py --checkpoint <checkpoint URI> --data DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.basis import active_units, basis_functions, forward_with_masks  # noqa: E402
from pipeline.evaluation.matching import dark_blob_patterns, image_patch_patterns, match_basis_functions  # noqa: E402
from pipeline.evaluation.orchestration import read_images  # noqa: E402
from pipeline.learning.learner import infer_latents, initial_generator  # noqa: E402

LAYER = "conv8"


def load(checkpoint: str):
    """(cfg, generator in eval mode) from a quick_train ``generator.pt`` or a pipeline checkpoint URI."""
    if checkpoint.endswith(".pt"):
        from pipeline.config import config_from_dict
        from pipeline.model import build_generator

        state = torch.load(checkpoint, weights_only=False)
        cfg = config_from_dict(state["config"])
        generator = build_generator(cfg)
        generator.load_state_dict(state["generator"])
    else:
        from pipeline.distributed.checkpoint import load_generator

        cfg, generator = load_generator(checkpoint)
    return cfg, generator.eval()


def opened(masks: dict, prefixes: tuple[str, ...]) -> dict:
    """The masks with those of the named blocks replaced by ones."""
    return {k: torch.ones_like(v) if k.startswith(prefixes) else v for k, v in masks.items()}


def units_and_bases(generator, z, open_blocks: tuple[str, ...] = (), per_channel: bool = False):
    _, activations, masks = forward_with_masks(generator, z)
    if per_channel:
        strongest = {}  # active_units ranks within each Z; rank over all 8 Z's before keeping a channel's first
        for unit in sorted(active_units(activations, LAYER), key=lambda u: -u.activation):
            strongest.setdefault(unit.channel, unit)
        units = list(strongest.values())
    else:
        units = active_units(activations, LAYER, top=8)
    return basis_functions(generator, opened(masks, open_blocks), units)


def score_patterns(patterns_chw: list[np.ndarray], images_hwc) -> float:
    return float(match_basis_functions(patterns_chw, images_hwc)["score"])


def score(generator, z, images_hwc, open_blocks: tuple[str, ...] = (), per_channel: bool = False) -> float:
    return score_patterns([b.image for b in units_and_bases(generator, z, open_blocks, per_channel)], images_hwc)


def weights_from_init(cfg, generator) -> dict:
    """{weight name: {"init_coefficient": c, "relative_change": ||W - W0|| / ||W0||}} for every kernel."""
    start = initial_generator(cfg).state_dict()
    out = {}
    for name, trained in generator.state_dict().items():
        if trained.ndim > 1:
            w, w0 = trained.float(), start[name].float()
            out[name] = {"init_coefficient": round(float((w * w0).sum() / w0.square().sum()), 3),
                         "relative_change": round(float((w - w0).norm() / w0.norm()), 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="quick_train generator.pt or a checkpoint URI")
    parser.add_argument("--data", required=True, help="the shards the model was trained on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object on the last stdout line")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg, generator = load(args.checkpoint)
    _, images = read_images(args.data, "train", 108, cfg.model.resolution)
    images_hwc = np.moveaxis(images[:100].numpy().astype(np.float64), 1, -1)
    prior = torch.randn(8, cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))
    blocks = [f"block{i}." for i in range(len(generator.blocks))]
    posterior = infer_latents(generator, images[100:108], cfg, seed=0)
    _, holdout = read_images(args.data, "holdout", 64, cfg.model.resolution)
    frozen = units_and_bases(generator, prior)
    boxes = [b.box for b in frozen]
    result = {
        "frozen": score_patterns([b.image for b in frozen], images_hwc),
        "open_last_block": score(generator, prior, images_hwc, (blocks[-1],)),
        "open_all": score(generator, prior, images_hwc, tuple(blocks[1:])),
        "posterior": score(generator, posterior, images_hwc),
        "per_channel": score(generator, prior, images_hwc, per_channel=True),
        "holdout_patches": score_patterns(image_patch_patterns(boxes, holdout.numpy()), images_hwc),
        "dark_blobs": score_patterns(dark_blob_patterns(boxes), images_hwc),
        # How far the latents of real images lie from N(0, I): 1 for the prior.
        "posterior_latent_std": float(posterior.std()),
        "weights_from_init": weights_from_init(cfg, generator),
    }
    if not args.json:
        for name, value in result.items():
            if isinstance(value, dict):
                for layer, figures in value.items():
                    print(f"{name} {layer:<18} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()))
            else:
                print(f"{name:<20} {value:.4f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
