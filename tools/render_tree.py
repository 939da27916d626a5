"""Render the AND-OR tree (Fig. 1) and its OR view of one prior Z from a checkpoint, without MLflow.

    python tools/render_tree.py --checkpoint PATH [--seed 0] [--roots 6] [--children 3] [--out DIR]
        [--pick-seed N] [--docs]

Writes what ``pipeline.evaluation.tree.write_tree`` writes (and_or_tree.png/.json/.npz, and_or_tree_or.*) into
--out. ``--pick-seed N`` tries seeds 0..N-1 and keeps the one whose roots spread over the most distinct grid
positions (so the OR view covers several positions); ``--docs`` also copies the two PNGs to docs/.
``sparsegen evaluate --metrics tree`` makes the same pictures from Z = randn with its --seed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.distributed.checkpoint import load_generator  # noqa: E402
from pipeline.evaluation.tree import build_tree, write_tree  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pick-seed", type=int, default=0, metavar="N")
    parser.add_argument("--roots", type=int, default=6)
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--or-latents", type=int, default=64)
    parser.add_argument("--out", default="trees")
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg, generator = load_generator(args.checkpoint)

    def latent(seed: int) -> torch.Tensor:
        return torch.randn(1, cfg.model.latent_dim, generator=torch.Generator().manual_seed(seed))

    seed = args.seed
    if args.pick_seed:
        def spread(s: int) -> int:
            document, _ = build_tree(generator, latent(s), roots=args.roots, children=1)
            return len({tuple(r["position"]) for r in document["nodes"]})

        seed = max(range(args.pick_seed), key=lambda s: (spread(s), -s))
    paths, document = write_tree(generator, latent(seed), args.out, roots=args.roots, children=args.children,
                                 or_latents=args.or_latents)
    print(f"seed {seed}: {document['num_nodes']} nodes, {len(document['nodes'])} roots")
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.docs:
        docs = Path(__file__).resolve().parent.parent / "docs"
        shutil.copyfile(paths["tree_png"], docs / "and_or_tree.png")
        shutil.copyfile(paths["tree_or_png"], docs / "and_or_tree_or.png")
        print(f"copied to {docs}/and_or_tree.png, and_or_tree_or.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
