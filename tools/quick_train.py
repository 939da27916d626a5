"""Single-process learning experiment: Algorithm 1 on one core, no Ray, no MLflow, then the evaluation.

The "What makes the sparse model learn" rows of docs/results.md come from this script: the same learner, model and
evaluation as `sparsegen train` / `ablation`, without the pipeline around them, so that settings can be
compared quickly (two at a time on a 2-core machine). Training images are held in memory and visited in a
seeded random order; latents persist per example (one LatentBank over the whole train split).

    python tools/quick_train.py --data DIR --steps 400 --name s01 --set langevin.noise_sigma=0.1 ...
    python tools/quick_train.py --data DIR --steps 400 --name dense --dense --metrics mse,matching,parts,swd

Writes <out>/<name>/{result.json, samples.png, reconstructions.png, train_reconstructions.png,
generator.pt, evaluation artifacts} and prints one JSON line of metrics at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import open_dataset  # noqa: E402
from pipeline.evaluation.orchestration import evaluate, read_images  # noqa: E402
from pipeline.learning import ABPLearner, LatentBank  # noqa: E402
from pipeline.learning.learner import generate, prepare_module, reconstruct  # noqa: E402
from pipeline.model import build_critic, build_generator  # noqa: E402
from pipeline.tracking.images import image_grid  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="shards made by `sparsegen make-demo-data` / `ingest`")
    parser.add_argument("--steps", type=int, default=400, help="Algorithm 1 iterations (default 400)")
    parser.add_argument("--name", required=True, help="name of the output folder")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dense", action="store_true", help="every model.sparsity k null (the dense arm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--metrics", default="mse,matching,parts,swd",
                        help="evaluation metrics after training; 'none' skips the evaluation (pictures are still drawn)")
    parser.add_argument("--log-every", type=int, default=50, metavar="STEPS",
                        help="print the running means every STEPS iterations (default 50)")
    parser.add_argument("--init-gain", type=float, default=1.0, metavar="G",
                        help="multiply every generator kernel's initial draw by G (default 1: the model's own init)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="quick-train")
    args = parser.parse_args(argv)
    if args.log_every < 1 or args.steps < 1:
        parser.error("--steps and --log-every must be at least 1")
    if args.init_gain <= 0:
        parser.error("--init-gain must be positive")

    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.dense:
        base = load_config(args.preset, overrides)
        overrides += [f"model.sparsity.{name}=null" for name in base.layer_names()] + ["sparsity_schedule.kind=fixed"]
    cfg = load_config(args.preset, overrides)
    cfg.data.url = args.data
    torch.manual_seed(cfg.training.seed)
    device = torch.device("cpu")
    generator = build_generator(cfg)
    with torch.no_grad():  # biases start at zero, so scaling the kernels scales the whole initial draw
        for weight in (p for p in generator.parameters() if p.ndim > 1):
            weight.mul_(args.init_gain)
    generator = prepare_module(generator, cfg, device)
    critic = prepare_module(build_critic(cfg), cfg, device) if cfg.training.critic_weight > 0 else None
    info = open_dataset(args.data)
    indices, images = read_images(args.data, "train", info.num_train, cfg.model.resolution)
    bank = LatentBank(info.max_global_index + 1, cfg.model.latent_dim, seed=cfg.training.seed)
    learner = ABPLearner(cfg, generator, critic, bank, device)
    n, batch = images.shape[0], cfg.training.batch_size
    steps_per_epoch = math.ceil(n / batch)
    order_rng = torch.Generator().manual_seed(cfg.training.seed)
    started, step, window = time.perf_counter(), 0, []
    while step < args.steps:
        order = torch.randperm(n, generator=order_rng)
        for b in range(steps_per_epoch):
            if step >= args.steps:
                break
            chosen = order[b * batch:(b + 1) * batch]
            learner.set_epoch(step / steps_per_epoch)
            window.append(learner.step(indices[chosen], images[chosen]).as_floats())
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                mean = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                print(f"[{args.name}] step {step} epoch {step / steps_per_epoch:.1f} "
                      f"mse {mean['reconstruction_mse']:.4f} grad_norm_reconstruction {mean['grad_norm_reconstruction']:.3g} "
                      f"grad_norm_critic {mean['grad_norm_critic']:.3g} "
                      f"critic_share {mean['grad_norm_critic'] / max(mean['grad_norm_reconstruction'], 1e-12):.3g} "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
                window = []
    train_s = time.perf_counter() - started

    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "generator": generator.state_dict()}, out / "generator.pt")
    metrics = {}
    if args.metrics != "none":
        metrics, _ = evaluate(cfg, generator, args.data, args.metrics.split(","), out_dir=out, progress=False)
    image_grid(generate(generator, 32, cfg, seed=1234), columns=8).save(out / "samples.png")
    _, holdout = read_images(args.data, "holdout", 16, cfg.model.resolution)
    _, recon = reconstruct(generator, holdout, cfg, seed=0)
    image_grid(torch.cat([holdout, recon]), columns=16).save(out / "reconstructions.png")
    with torch.no_grad():
        persistent = generator(bank.gather(indices[:16]))
    image_grid(torch.cat([images[:16], persistent]), columns=16).save(out / "train_reconstructions.png")
    result = {"name": args.name, "steps": args.steps, "overrides": overrides, "init_gain": args.init_gain,
              "train_s": round(train_s, 1),
              **{k: v for k, v in metrics.items() if isinstance(v, float)}}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
