"""`sparsegen bench ray`: what Ray Train costs over the bare training loop.

Runs the same steps three ways on the same data: the bare loop in this process (``ABPLearner.step`` over
the shard loader), Ray Train with 1 worker, and Ray Train with 2 workers. Steady-state throughput is the
median of the per-window ``images_per_s`` that the workers log (the first window, which holds start-up,
is dropped); time to first step is measured from the driver's ``fit()`` call.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from pipeline.config import Config


def bare_loop_images_per_s(cfg: Config, steps: int) -> dict:
    from pipeline.data import make_loader, open_dataset
    from pipeline.learning import ABPLearner, LatentBank
    from pipeline.learning.learner import prepare_module
    from pipeline.model import build_critic, build_generator

    torch.manual_seed(cfg.training.seed)
    info = open_dataset(cfg.data.url)
    cpu = torch.device("cpu")
    generator = prepare_module(build_generator(cfg), cfg, cpu)
    critic = prepare_module(build_critic(cfg), cfg, cpu) if cfg.training.critic_weight > 0 else None
    learner = ABPLearner(cfg, generator, critic, LatentBank(info.max_global_index + 1, cfg.model.latent_dim),
                         cpu)
    loader = make_loader(info, batch_size=cfg.training.batch_size, seed=cfg.training.seed,
                         image_size=cfg.model.resolution)
    rates, done, epoch = [], 0, 0
    window = cfg.run.log_every_steps
    while done < steps:
        loader.set_epoch(epoch)
        start, images_seen = time.perf_counter(), 0
        for indices, images in loader:
            learner.step(indices, images)
            images_seen += images.shape[0]
            done += 1
            if done % window == 0:
                rates.append(images_seen / (time.perf_counter() - start))
                start, images_seen = time.perf_counter(), 0
            if done >= steps:
                break
        epoch += 1
    steady = rates[1:] or rates
    return {"images_per_s": statistics.median(steady), "windows": len(rates)}


def ray_images_per_s(cfg: Config, workers: int, steps: int, workdir: str) -> dict:
    from pipeline.distributed.trainer import train
    from pipeline.tracking import mlflow_run

    cfg.run.workers = workers
    cfg.training.max_steps = steps
    cfg.run.name = f"bench-ray-{workers}w-{int(time.time())}"
    cfg.evaluation.at_end = []
    cfg.run.eval_every_steps = steps  # grids only at the end: they are not part of the training step
    cfg.run.checkpoint_every_steps = steps
    start = time.perf_counter()
    result = train(cfg, workdir=workdir)
    wall_s = time.perf_counter() - start
    client = mlflow_run.client(result["tracking_uri"])
    history = sorted(client.get_metric_history(result["run_id"], "images_per_s"), key=lambda m: m.step)
    steady = [m.value for m in history[1:]] or [m.value for m in history]
    first = client.get_metric_history(result["run_id"], "time_to_first_step_s")
    return {
        "images_per_s": statistics.median(steady),
        "time_to_first_step_s": first[0].value if first else None,
        "wall_s": wall_s,
    }


def bench_ray(cfg: Config, steps: int = 40, workdir: str | None = None, progress=None) -> dict:
    from pipeline.runtime import ensure_demo_data, resolve_workdir

    say = progress or (lambda message: None)
    workdir_path = resolve_workdir(workdir or tempfile.mkdtemp(prefix="sparsegen-bench-ray-"))
    if cfg.data.url is None:
        cfg.data.url = ensure_demo_data(cfg, workdir_path, progress=False)
    say("bare loop")
    # The bare loop gets the same thread budget as one Ray worker.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    try:
        bare = bare_loop_images_per_s(cfg, steps)
    finally:
        torch.set_num_threads(threads)
    say("Ray Train, 1 worker")
    one = ray_images_per_s(cfg, 1, steps, str(workdir_path))
    say("Ray Train, 2 workers")
    two = ray_images_per_s(cfg, 2, steps, str(workdir_path))
    return {
        "preset": cfg.preset,
        "steps": steps,
        "batch_size": cfg.training.batch_size,
        "bare_images_per_s": bare["images_per_s"],
        "ray_1_worker_images_per_s": one["images_per_s"],
        "ray_2_workers_images_per_s": two["images_per_s"],
        "ray_overhead_fraction": 1 - one["images_per_s"] / bare["images_per_s"],
        "scaling_2_over_1": two["images_per_s"] / one["images_per_s"],
        "time_to_first_step_s_1_worker": one["time_to_first_step_s"],
        "time_to_first_step_s_2_workers": two["time_to_first_step_s"],
    }
