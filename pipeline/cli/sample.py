"""`sparsegen sample` and `sparsegen reconstruct`: use a trained generator from a run, a checkpoint or a model.

Both take exactly one source: ``--run ID`` (the run's checkpoint in Ray storage, else the copy the run keeps
in MLflow), ``--checkpoint URI`` or ``--model-uri URI`` (the logged ``mlflow.pytorch`` model, e.g.
``models:/NAME/1``); see ``pipeline.tracking.checkpoints.resolve_generator``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _add_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("generator (exactly one)")
    source.add_argument("--run", default=None, metavar="RUN_ID", help="MLflow run id of a training run")
    source.add_argument("--checkpoint", default=None, metavar="URI", help="checkpoint directory (local or s3://)")
    source.add_argument("--model-uri", default=None, metavar="URI",
                        help="logged MLflow model: models:/NAME/VERSION, models:/<model id>, runs:/<run>/generator")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the sqlite store under --workdir)")
    parser.add_argument("--workdir", default=None, help="as for `sparsegen train` (default: ./sparsegen-work)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior latents / Langevin noise")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")


def register(subparsers) -> None:
    sample = subparsers.add_parser(
        "sample", help="images from Z ~ N(0, I) of a trained generator (a grid, an interpolation strip, arrays)",
        description="Sample a trained generator. Examples:\n"
                    "  sparsegen sample --run RUN_ID -n 64 --out grid.png\n"
                    "  sparsegen sample --model-uri models:/sparsegen/1 --interpolate 3,7 --out strip.png\n"
                    "  sparsegen sample --checkpoint DIR -n 1000 --npz samples.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source(sample)
    sample.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", default=None, help="PNG grid (8 columns) or interpolation strip")
    sample.add_argument("--interpolate", default=None, metavar="A,B",
                        help="spherical interpolation between the prior latents drawn with seeds A and B")
    sample.add_argument("--steps", type=int, default=10, help="images in the interpolation strip (default 10)")
    sample.add_argument("--npz", default=None, help="also write the raw arrays: z (N, d), images (N, 3, R, R) in [-1, 1]")
    sample.set_defaults(func=run_sample)

    reconstruct = subparsers.add_parser(
        "reconstruct", help="infer Z for images by Langevin and show originals over reconstructions, with MSE",
        description="Reconstruct images (files, folders, or --data shards) through the generator's posterior "
                    "(evaluation.inference_* settings of its config). Examples:\n"
                    "  sparsegen reconstruct --run RUN_ID photos/ --out recon.png --json\n"
                    "  sparsegen reconstruct --checkpoint DIR --data s3://bucket/shards --split holdout -n 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source(reconstruct)
    reconstruct.add_argument("images", nargs="*", help="image files or folders of images")
    reconstruct.add_argument("--data", default=None, help="shards (local or s3://) instead of files")
    reconstruct.add_argument("--split", default="holdout", choices=["train", "holdout"], help="split of --data")
    reconstruct.add_argument("-n", type=int, default=16, help="images to take from --data or the folders (default 16)")
    reconstruct.add_argument("--out", default="reconstructions.png", help="PNG: originals row over reconstructions row")
    reconstruct.set_defaults(func=run_reconstruct)


def _fail(command: str, message: str) -> int:
    print(f"sparsegen {command}: error: {message}", file=sys.stderr)
    return 2


def _load(args, command: str):
    """(config, generator) or an error message."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from pipeline.cli.evaluate import _tracking_uri
    from pipeline.tracking.checkpoints import resolve_generator

    tracking_uri = _tracking_uri(args) if (args.run or args.model_uri) else None
    try:
        return resolve_generator(run_id=args.run, checkpoint=args.checkpoint, model_uri=args.model_uri,
                                 tracking_uri=tracking_uri), None
    except (ValueError, LookupError, FileNotFoundError, OSError) as exc:
        return None, str(exc).splitlines()[0]


def _slerp(a, b, t: float):
    import torch

    a_n, b_n = a / a.norm(), b / b.norm()
    omega = torch.arccos((a_n * b_n).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def run_sample(args: argparse.Namespace) -> int:
    if args.n < 1 or args.steps < 2:
        return _fail("sample", "-n must be >= 1 and --steps >= 2")
    if not (args.out or args.npz):
        return _fail("sample", "nothing to write: give --out grid.png and/or --npz samples.npz")
    interpolate = None
    if args.interpolate:
        try:
            interpolate = [int(v) for v in args.interpolate.split(",")]
            assert len(interpolate) == 2
        except (ValueError, AssertionError):
            return _fail("sample", f"--interpolate wants two integer seeds A,B, got {args.interpolate!r}")
    loaded, error = _load(args, "sample")
    if error:
        return _fail("sample", error)
    cfg, generator = loaded
    import numpy as np
    import torch

    from pipeline.tracking.images import image_grid

    d = cfg.model.latent_dim
    if interpolate:
        ends = [torch.randn(d, generator=torch.Generator().manual_seed(seed)) for seed in interpolate]
        z = torch.stack([_slerp(ends[0], ends[1], t) for t in np.linspace(0.0, 1.0, args.steps)])
    else:
        z = torch.randn(args.n, d, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        images = torch.cat([generator(chunk) for chunk in z.split(256)])
    report = {"n": int(z.shape[0]), "resolution": int(images.shape[-1]), "latent_dim": d,
              "source": args.run or args.checkpoint or args.model_uri, "interpolate": interpolate,
              "interpolation": "spherical" if interpolate else None, "out": None, "npz": None}
    if args.out:
        columns = z.shape[0] if interpolate else min(8, z.shape[0])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=columns).save(args.out)
        report["out"] = str(Path(args.out).resolve())
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.npz, z=z.numpy(), images=images.numpy())
        report["npz"] = str(Path(args.npz).resolve())
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['n']} images at {report['resolution']} px -> {report.get('out') or report.get('npz')}")
    return 0


def _image_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no image or folder at {raw}")
    return files


def _read_files(files: list[Path], size: int):
    """(names, images (N, 3, size, size) in [-1, 1]): decoded, centre-cropped and resized as ingest does."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from pipeline.data.ingest import prepare_image

    names, arrays = [], []
    for path in files:
        result = prepare_image(str(path), size)
        if result[0] != "ok":
            raise ValueError(f"cannot read {path}: {result[1]} ({result[2]})")
        pixels = np.asarray(Image.open(io.BytesIO(result[1])).convert("RGB"), np.float32)
        arrays.append(torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0)
        names.append(str(path))
    return names, torch.stack(arrays)


def run_reconstruct(args: argparse.Namespace) -> int:
    if bool(args.images) == bool(args.data):
        return _fail("reconstruct", "give image files/folders or --data URL (one of them)")
    if args.n < 1:
        return _fail("reconstruct", "-n must be >= 1")
    loaded, error = _load(args, "reconstruct")
    if error:
        return _fail("reconstruct", error)
    cfg, generator = loaded
    import torch

    from pipeline.learning.learner import reconstruct
    from pipeline.tracking.images import image_grid

    try:
        if args.data:
            from pipeline.evaluation.orchestration import read_images

            indices, images = read_images(args.data, args.split, args.n, cfg.model.resolution)
            names = [f"{args.split}:{int(i)}" for i in indices]
        else:
            files = _image_files(args.images)[: args.n]
            if not files:
                return _fail("reconstruct", f"no images ({', '.join(IMAGE_SUFFIXES)}) in {' '.join(args.images)}")
            names, images = _read_files(files, cfg.model.resolution)
    except Exception as exc:  # noqa: BLE001 - DataError, FileNotFoundError, a bad image: one line
        return _fail("reconstruct", str(exc).splitlines()[0])
    _, recon = reconstruct(generator, images, cfg, seed=args.seed)
    per_image = (recon.detach() - images).pow(2).flatten(1).mean(1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat([images, recon.detach()]), columns=len(names)).save(args.out)
    report = {"mean_mse": float(per_image.mean()), "out": str(Path(args.out).resolve()),
              "per_image": [{"image": n, "mse": float(m)} for n, m in zip(names, per_image)],
              "pixels": "[-1, 1]", "inference_steps": cfg.evaluation.inference_steps}
    if args.json:
        print(json.dumps(report))
    else:
        for item in report["per_image"]:
            print(f"{item['mse']:.5f}  {item['image']}")
        print(f"mean MSE {report['mean_mse']:.5f} (pixels in [-1, 1]) -> {report['out']}")
    return 0
