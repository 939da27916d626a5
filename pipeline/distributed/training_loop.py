"""The per-worker training loop that Ray Train runs on every rank (Algorithm 1 under DDP).

Stages, in order:
  1. setup       -- rank, device, models (DDP when world_size > 1), loader over this rank's stable
                    partition, a latent bank of that partition's rows only, learner
  2. restore     -- from Ray's latest checkpoint (worker restart / same --name) or --resume-from, at any
                    world size: this rank's latents from the parts that overlap its partition
  3. loop        -- per batch: sparsity schedule, Algorithm 1 step, fault injection
  4. log         -- every run.log_every_steps: metrics averaged over ranks, rank 0 -> MLflow; the
                    training.max_train_minutes budget is checked here (same step on every rank)
  5. evaluate    -- every run.eval_every_steps: sample and reconstruction grids (rank 0) -> MLflow
  6. checkpoint  -- every run.checkpoint_every_steps and at the end: every rank writes its latents part,
                    rank 0 adds state, config and meta, every rank reports its directory to Ray (which
                    merges them into one checkpoint)

Epoch position. The loop tracks (epoch index, step at which that epoch began) and saves both in
meta.json, because steps per epoch depend on the world size: resuming at another world size continues
at the same epoch, not at ``step // steps_per_epoch``. A checkpoint taken mid-epoch and resumed at another
world size cannot finish that epoch (which examples the old partition still had to read is not known
to the new one), so it starts the next epoch; examples not reached in the interrupted one have one chain
fewer (``visits`` in the latents shows it).

Ray's ``report`` is a synchronisation point that costs up to the controller's poll interval, so the loop
reports only at checkpoints; per-step metrics go straight to MLflow from rank 0.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch

from pipeline.distributed.progress import console, make_progress, progress_line
from pipeline.distributed.progress import send as send_progress


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function: the loop below, with MLflow's system metrics monitored on rank 0."""
    import ray.train

    from pipeline.tracking.lineage import system_metrics

    rank = ray.train.get_context().get_world_rank()
    with system_metrics(loop_config["tracking_uri"], loop_config["mlflow_run_id"], enabled=rank == 0):
        _train_loop(loop_config)


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from pipeline.config import config_from_dict
    from pipeline.data import make_loader, open_dataset
    from pipeline.distributed.checkpoint import LoadedCheckpoint, checkpoint_uri, write_checkpoint, write_latent_part
    from pipeline.host_memory import configure_host_allocator
    from pipeline.learning import ABPLearner, LatentBank
    from pipeline.learning.learner import prepare_module, unwrap
    from pipeline.model import build_critic, build_generator
    from pipeline.tracking import mlflow_run

    # -- 1. setup ---------------------------------------------------------------------------------------
    configure_host_allocator()  # Ray starts this worker process; its allocator is tuned here, once
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.run.gpus_per_worker > 0 else torch.device("cpu")
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    tracking_uri, run_id = loop_config["tracking_uri"], loop_config["mlflow_run_id"]
    is_logger = rank == 0

    # Same initial weights on every rank (DDP also broadcasts them); per-rank seeds for Langevin noise.
    torch.manual_seed(cfg.training.seed)
    generator = prepare_module(build_generator(cfg), cfg, device)
    critic = prepare_module(build_critic(cfg), cfg, device) if cfg.training.critic_weight > 0 else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = open_dataset(cfg.data.url)
    loader = make_loader(
        info, split="train", batch_size=cfg.training.batch_size, rank=rank, world_size=world_size,
        seed=cfg.training.seed, epoch=0, on_error=cfg.data.on_error, image_size=cfg.model.resolution,
    )
    # Only this rank's partition: N / world_size rows (the loader reads the same examples every epoch).
    bank = LatentBank(info.max_global_index + 1, cfg.model.latent_dim, seed=cfg.training.seed,
                      indices=loader.partition_indices)

    # -- 2. restore ---------------------------------------------------------------------------------------
    loaded: LoadedCheckpoint | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        uri = checkpoint_uri(checkpoint.path, checkpoint.filesystem)
        if uri is not None:  # read in place: only the latents parts this rank needs are fetched
            loaded = _restore(uri, bank, device)
        else:
            with checkpoint.as_directory() as directory:
                loaded = _restore(directory, bank, device)
    elif loop_config.get("initial_checkpoint"):
        loaded = _restore(loop_config["initial_checkpoint"], bank, device)
    if distributed:
        kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        generator = torch.nn.parallel.DistributedDataParallel(generator, **kwargs)
        if critic is not None:
            critic = torch.nn.parallel.DistributedDataParallel(critic, **kwargs)
    learner = ABPLearner(cfg, generator, critic, bank, device)
    if loaded is not None:
        learner.load_state_dict(loaded.state)
    learner.rng.manual_seed(cfg.training.seed * 1000 + rank + 7919 * learner.step_count)
    steps_per_epoch = len(loader)
    step = learner.step_count
    epoch_index, epoch_start_step = resume_position(loaded.meta if loaded else None, step, steps_per_epoch,
                                                    world_size, announce=is_logger)
    total_steps = cfg.training.max_steps or epoch_start_step + math.ceil(
        (cfg.training.epochs - epoch_index) * steps_per_epoch)
    if is_logger:
        console(f"[sparsegen] rank 0/{world_size}: {steps_per_epoch} steps/epoch, {bank.num_rows} latents per rank "
                f"({bank.memory_bytes / 1e6:.1f} MB), training to step {total_steps}"
                f"{f', resumed at step {step} (epoch {epoch_index})' if step else ''}")

    # Fixed images and prior latents for the grids, so pictures are comparable across steps.
    grid_z = torch.randn(32, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1234)).to(device)
    grid_images = None
    # A fixed holdout batch for the intermediate holdout MSE that Tune's ASHA stops trials on.
    holdout_images = None
    if is_logger and info.num_holdout > 0:
        holdout_loader = make_loader(info, split="holdout", batch_size=min(32, info.num_holdout), shuffle=False,
                                     on_error=cfg.data.on_error, image_size=cfg.model.resolution)
        holdout_images = next(iter(holdout_loader))[1].to(device)
    crash_marker = loop_config.get("crash_marker")
    progress_queue = loop_config.get("progress_queue") if is_logger else None

    # -- 3. loop ------------------------------------------------------------------------------------------
    window_start, window_images, window_steps = time.perf_counter(), 0, 0
    loop_start_s, loop_start_step = time.perf_counter(), step
    budget_minutes = cfg.training.max_train_minutes
    budget_s = None if budget_minutes is None else 60.0 * budget_minutes
    metric_sums: dict[str, float] = {}
    first_step_pending = True
    while step < total_steps:
        skip = step - epoch_start_step  # resumed mid-epoch: skip the batches already trained on
        loader.set_epoch(epoch_index)
        for batch_index, (indices, images) in enumerate(loader):
            if batch_index < skip:
                continue
            if grid_images is None:
                grid_images = images[:16].clone()
            learner.set_epoch(epoch_index + (step - epoch_start_step) / steps_per_epoch)
            metrics = learner.step(indices, images).as_floats()
            step += 1
            window_images += images.shape[0]
            window_steps += 1
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value
            _maybe_crash(cfg, rank, step, crash_marker)
            if first_step_pending and is_logger and loop_config.get("driver_start_time"):
                # Wall time from the driver calling fit() to the end of the first step (Ray's start-up cost).
                mlflow_run.log_metrics(tracking_uri, run_id,
                                       {"time_to_first_step_s": time.time() - loop_config["driver_start_time"]}, step)
            first_step_pending = False

            last = step >= total_steps
            # -- 4. log -------------------------------------------------------------------------------
            if step % cfg.run.log_every_steps == 0 or last:
                elapsed_s = time.perf_counter() - window_start
                logged = {k: v / window_steps for k, v in metric_sums.items()}
                logged["images_per_s_per_worker"] = window_images / max(elapsed_s, 1e-9)
                loop_elapsed_s = time.perf_counter() - loop_start_s
                logged["train_minutes"] = loop_elapsed_s / 60.0
                # Averaged over ranks, so every rank reads the same value and stops at the same step.
                logged = _average_over_ranks(logged, device) if distributed else logged
                if budget_minutes is not None and not last and logged["train_minutes"] >= budget_minutes:
                    total_steps, last = step, True
                    if is_logger:
                        console(f"[sparsegen] training.max_train_minutes={budget_minutes:g} reached at step {step}: "
                                f"stopping here (final checkpoint and evaluation follow)")
                        mlflow_run.set_tags(tracking_uri, run_id, {"sparsegen.stopped_by": "max_train_minutes"})
                logged["images_per_s"] = logged["images_per_s_per_worker"] * world_size
                logged["epoch"] = epoch_index + (step - epoch_start_step) / steps_per_epoch
                logged.update(_sparsity_metrics(unwrap(generator), grid_z))
                for key, value in loader.stats.items():
                    logged[f"data_{key}"] = float(value)
                if is_logger:
                    mlflow_run.log_metrics(tracking_uri, run_id, logged, step)
                    progress = make_progress(step, total_steps, logged, loop_elapsed_s, step - loop_start_step,
                                             budget_s=budget_s)
                    if progress_queue is not None:  # the driver draws a bar on its terminal
                        send_progress(progress_queue, progress)
                    else:
                        console(progress_line(progress))
                window_start, window_images, window_steps, metric_sums = time.perf_counter(), 0, 0, {}
            # -- 5. evaluate ----------------------------------------------------------------------------
            if is_logger and (step % cfg.run.eval_every_steps == 0 or last):
                _log_grids(cfg, unwrap(generator), grid_z, grid_images, tracking_uri, run_id, step)
            # -- 6. checkpoint ----------------------------------------------------------------------------
            if step % cfg.run.checkpoint_every_steps == 0 or last:
                epoch_progress = epoch_index + (step - epoch_start_step) / steps_per_epoch
                report = {"step": step, "epoch": epoch_progress, "reconstruction_mse": metrics["reconstruction_mse"]}
                if is_logger and holdout_images is not None:
                    report["holdout_mse_pm1"] = _holdout_mse(cfg, unwrap(generator), holdout_images)
                    mlflow_run.log_metrics(tracking_uri, run_id, {"holdout_mse_pm1": report["holdout_mse_pm1"]}, step)
                # Where the next step resumes: the next epoch's start once this epoch's batches are done.
                epoch_done = step - epoch_start_step >= steps_per_epoch
                with tempfile.TemporaryDirectory() as directory:
                    # Every rank writes its own latents; Ray merges the ranks' directories into one checkpoint.
                    part = write_latent_part(directory, bank, rank=rank, world_size=world_size)
                    parts = _all_gather(part) if distributed else [part]
                    if is_logger:
                        meta = {"step": step, "epoch": epoch_progress, "world_size": world_size,
                                "epoch_index": epoch_index + 1 if epoch_done else epoch_index,
                                "epoch_start_step": step if epoch_done else epoch_start_step,
                                "mlflow_run_id": run_id, "run_name": loop_config["run_name"]}
                        write_checkpoint(directory, cfg, learner.state_dict(), None, meta, latent_parts=parts)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
            if last:
                break
        else:
            epoch_index, epoch_start_step = epoch_index + 1, step
            continue
        break


def _restore(uri: str, bank, device: torch.device):
    """The checkpoint at ``uri`` without its latents, after restoring this rank's rows into ``bank``."""
    from pipeline.distributed.checkpoint import load_checkpoint, restore_latents

    loaded = load_checkpoint(uri, map_location=device, latents=False)
    restored = restore_latents(uri, bank, loaded.meta)
    if restored != bank.num_rows:
        print(f"[sparsegen] warning: the checkpoint holds {restored} of this rank's {bank.num_rows} latents; "
              "the others start from their initial N(0, I) draw", flush=True)
    return loaded


def resume_position(meta: dict | None, step: int, steps_per_epoch: int, world_size: int,
                    announce: bool = False) -> tuple[int, int]:
    """(epoch index, step at which that epoch began) to continue at ``step`` (see the module docstring)."""
    if meta is None:
        epoch = step // steps_per_epoch
        return epoch, epoch * steps_per_epoch
    if "epoch_index" in meta:
        epoch, start = int(meta["epoch_index"]), int(meta["epoch_start_step"])
    else:  # written before epoch positions were saved: "epoch" is step / steps_per_epoch at its world size
        written_epoch = float(meta.get("epoch", step / steps_per_epoch))
        epoch = int(math.floor(written_epoch + 1e-9))
        fraction = written_epoch - epoch
        if meta.get("world_size", world_size) == world_size:
            start = step - round(fraction * steps_per_epoch)
        else:  # the writer's steps per epoch are unknown: only "mid-epoch or not" carries over
            start = step - (1 if fraction > 1e-9 else 0)
    if step > start and meta.get("world_size", world_size) != world_size:
        if announce:
            print(f"[sparsegen] warning: the checkpoint from {meta['world_size']} workers was taken in the middle "
                  f"of epoch {epoch}; on {world_size} workers training continues with epoch {epoch + 1}", flush=True)
        epoch, start = epoch + 1, step
    return epoch, start


def _all_gather(obj):
    """``obj`` of every rank, in rank order (a few integers per rank: the latents part records)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _maybe_crash(cfg, rank: int, step: int, marker: str | None) -> None:
    """Fault injection for tests: crash ``run.crash_rank`` once when it reaches ``run.crash_at_step``."""
    if rank != cfg.run.crash_rank or step != cfg.run.crash_at_step or not marker:
        return
    if os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"crashed rank {rank} at step {step}\n")
    print(f"[sparsegen] fault injection: crashing rank {rank} at step {step}", flush=True)
    os._exit(17)


def _average_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.cpu().tolist()))


@torch.no_grad()
def _sparsity_metrics(generator, z: torch.Tensor) -> dict[str, float]:
    """Measured fraction of non-zero units per sparsified layer (on fixed prior samples)."""
    _, activations = generator(z[:8], return_activations=True)
    return {f"active_fraction_{name}": (act != 0).float().mean().item() for name, act in activations.items()}


def _holdout_mse(cfg, generator, images: torch.Tensor) -> float:
    """Per-pixel MSE (images in [-1, 1]) of holdout images reconstructed by Langevin from the prior."""
    from pipeline.learning.learner import reconstruct

    _, recon = reconstruct(generator, images, cfg, seed=0)
    return float((recon - images).pow(2).mean())


# Part-level basis functions shown per evaluation step: units of a few fixed prior Z's (the Table 4 rule).
GRID_BASIS_LATENTS, GRID_BASIS_UNITS_PER_LATENT = 4, 8


@torch.no_grad()
def _log_grids(cfg, generator, grid_z, grid_images, tracking_uri, run_id, step) -> None:
    """Samples, reconstructions and part-level basis functions at this step: step-keyed MLflow images (the
    UI's step slider) and the same grids as PNG files under samples/ and reconstructions/."""
    from pipeline.learning.learner import reconstruct
    from pipeline.tracking import mlflow_run
    from pipeline.tracking.images import basis_grid, image_grid

    client = mlflow_run.client(tracking_uri)
    with tempfile.TemporaryDirectory() as directory:
        samples = image_grid(generator(grid_z), columns=8)
        client.log_image(run_id, samples, key="samples", step=step)
        path = os.path.join(directory, f"samples_step{step:07d}.png")
        samples.save(path)
        mlflow_run.log_artifact(tracking_uri, run_id, path, "samples")
        if grid_images is not None:
            device = grid_z.device
            with torch.enable_grad():
                _, recon = reconstruct(generator, grid_images.to(device), cfg, seed=step)
            # Rows: originals, then their reconstructions (Langevin from the prior).
            grid = image_grid(torch.cat([grid_images.to(device), recon]), columns=16)
            client.log_image(run_id, grid, key="reconstructions", step=step)
            path = os.path.join(directory, f"reconstructions_step{step:07d}.png")
            grid.save(path)
            mlflow_run.log_artifact(tracking_uri, run_id, path, "reconstructions")
        layer = cfg.evaluation.matching_layer
        if layer in generator.layer_names:
            from pipeline.evaluation.matching import units_for_matching

            bases = units_for_matching(generator, layer, latent_dim=cfg.model.latent_dim,
                                       num_latents=GRID_BASIS_LATENTS, units_per_latent=GRID_BASIS_UNITS_PER_LATENT,
                                       crop="field")
            if bases:
                client.log_image(run_id, basis_grid([b.image for b in bases], columns=GRID_BASIS_UNITS_PER_LATENT),
                                 key=f"basis_functions_{layer}", step=step)
