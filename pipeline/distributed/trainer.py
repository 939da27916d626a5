"""The driver of a training run: Ray Train's ``TorchTrainer`` around ``train_loop_per_worker``.

``train(cfg)`` resolves where things live (data, checkpoints, MLflow), starts or joins Ray, creates or
finds the run's single MLflow run, builds the ``TorchTrainer`` (CPU + gloo, or GPU + NCCL when
``run.gpus_per_worker > 0``) and fits it. Running the same ``run.name`` again resumes it: Ray Train
restores its latest checkpoint from ``<storage>/<name>`` and the MLflow run is found by name. The workdir,
demo data, ingest and Ray's start-up are ``pipeline.runtime``'s (shared with the CLI, tuning and evaluation).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.runtime import ensure_demo_data, ensure_shards, init_ray, resolve_workdir, storage_path

# `sparsegen demo`'s budget. `make demo` must end within 8 minutes on 2 cores, and 2-core machines differ
# about 3x in speed here (README). So the demo trains for a fixed wall time, DEMO_TRAIN_MINUTES, leaving
# room for Ray's start and the end-of-training evaluation, and stops earlier at DEMO_MAX_STEPS on fast
# machines. The batch per worker is DEMO_WORKER_BATCH_SIZE: 2 workers x 16 = tiny's batch of 32 per step,
# which reconstructed better than 2 x 32 in the same minutes (docs/results.md, "`make demo`").
DEMO_MAX_STEPS = 800
DEMO_TRAIN_MINUTES = 5.5
DEMO_WORKER_BATCH_SIZE = 16


class TrainingError(RuntimeError):
    pass


def _existing_run(storage: str, name: str) -> bool:
    from pipeline.data import storage as store

    try:
        return bool(store.exists(store.join(storage, name)) and store.list_dir(store.join(storage, name)))
    except Exception:
        return False


def _resolve_resume(resume_from: str, tracking_uri: str) -> str:
    """A checkpoint URI from a URI or an MLflow run id."""
    from pipeline.tracking.checkpoints import checkpoint_for_run

    if "/" in resume_from or resume_from.startswith(("s3:", "file:")):
        return resume_from
    try:
        return checkpoint_for_run(tracking_uri, resume_from)
    except LookupError as exc:
        raise TrainingError(f"--resume-from {resume_from}: {exc}") from None


def train(
    cfg: Config,
    *,
    address: str | None = None,
    resume_from: str | None = None,
    workdir: str | None = None,
    parent_run_id: str | None = None,
    callbacks: list | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict:
    """Run (or resume) a training run; returns {run_id, name, checkpoint, metrics}.

    ``callbacks`` go to Ray Train's RunConfig (Tune passes its TuneReportCallback here);
    ``parent_run_id`` nests the MLflow run under a search's parent run.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.config import validate
    from pipeline.data import open_dataset
    from pipeline.tracking import lineage, mlflow_run

    from pipeline.preflight import check_run_endpoints

    workdir_path = resolve_workdir(workdir)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    check_run_endpoints(tracking_uri=cfg.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                        address=address or os.environ.get("RAY_ADDRESS"))
    if cfg.data.url is None:
        cfg.data.url = ensure_demo_data(cfg, workdir_path)
    else:
        cfg.data.url = ensure_shards(cfg, workdir_path)
    info = open_dataset(cfg.data.url)  # fails fast, before Ray starts, on a missing manifest
    if info.image_size != cfg.model.resolution:
        print(f"[sparsegen] data is {info.image_size}px, model is {cfg.model.resolution}px: resizing on load", flush=True)
    cfg.run.name = cfg.run.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.run.storage = cfg.run.storage or str(workdir_path / "runs")
    cfg.run.tracking_uri = cfg.run.tracking_uri or mlflow_run.default_tracking_uri(workdir_path)
    validate(cfg)

    tracking_uri = cfg.run.tracking_uri
    params = cfg.flat()
    params.update({"data.num_train": info.num_train, "data.num_holdout": info.num_holdout,
                   "data.manifest_sha256": info.manifest_sha256})
    run_id, resumed_mlflow = mlflow_run.get_or_create_run(
        tracking_uri, cfg.run.experiment, cfg.run.name, params,
        artifact_root=str(workdir_path / "mlartifacts"), parent_run_id=parent_run_id,
        tags={"sparsegen.preset": cfg.preset, "sparsegen.data": cfg.data.url, **(extra_tags or {})},
    )
    resuming = _existing_run(cfg.run.storage, cfg.run.name)
    if resuming:
        print(f"[sparsegen] run '{cfg.run.name}' exists in {cfg.run.storage}: resuming it from its latest "
              f"checkpoint (MLflow run {run_id})", flush=True)
    else:
        print(f"[sparsegen] run '{cfg.run.name}': MLflow run {run_id} at {tracking_uri}", flush=True)
    mlflow_run.set_tags(tracking_uri, run_id, lineage.code_version_tags())
    if not resumed_mlflow:
        lineage.log_dataset_input(tracking_uri, run_id, info, cfg.model.resolution, name=cfg.data.dataset)

    # Ray Train V2 dropped resume_from_checkpoint: the workers load this URI themselves when Ray has no
    # checkpoint of this run yet (a restart of this run still restores Ray's latest checkpoint first).
    initial_checkpoint_uri = None
    if resume_from:
        initial_checkpoint_uri = _resolve_resume(resume_from, tracking_uri)
        print(f"[sparsegen] starting from checkpoint {initial_checkpoint_uri}", flush=True)

    # The Train controller needs a CPU of its own besides the workers.
    init_ray(address, int(cfg.run.workers * cfg.run.cpus_per_worker) + 1)
    ray_storage_path, filesystem = storage_path(cfg.run.storage)
    use_gpu = cfg.run.gpus_per_worker > 0
    resources = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.run.gpus_per_worker
    loop_config = {
        "config": cfg.to_dict(),
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "run_name": cfg.run.name,
        "initial_checkpoint": initial_checkpoint_uri,
        "driver_start_time": time.time(),  # for time_to_first_step_s
        "crash_marker": str(workdir_path / "faults" / f"{cfg.run.name}-rank{cfg.run.crash_rank}-step{cfg.run.crash_at_step}"),
    }
    worker_env = {"MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": str(max(1, int(cfg.run.cpus_per_worker)))}
    from pipeline.distributed.progress import ProgressBar, bar_wanted
    from pipeline.distributed.training_loop import train_loop_per_worker

    # On a terminal the driver draws a bar from rank 0's records; elsewhere rank 0 prints a line per interval.
    bar = ProgressBar(description=cfg.run.name) if bar_wanted() else None
    if bar is not None:
        loop_config["progress_queue"] = bar.queue

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=ray_storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            worker_runtime_env={"env_vars": worker_env},
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray raises TrainingFailedError with the worker's traceback inside
        mlflow_run.finish_run(tracking_uri, run_id, "FAILED")
        raise TrainingError(f"training run '{cfg.run.name}' failed: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    if result.error is not None or result.checkpoint is None:
        mlflow_run.finish_run(tracking_uri, run_id, "FAILED")
        raise TrainingError(f"training run '{cfg.run.name}' failed: {result.error or 'no checkpoint was reported'}")

    checkpoint_uri = result.checkpoint.path
    if filesystem is not None or cfg.run.storage.startswith("s3://"):
        checkpoint_uri = "s3://" + checkpoint_uri.removeprefix("s3://")
    mlflow_run.set_tags(tracking_uri, run_id, {mlflow_run.CHECKPOINT_TAG: checkpoint_uri})
    kept = _log_checkpoint_uris(result, checkpoint_uri, tracking_uri, run_id, s3=checkpoint_uri.startswith("s3://"))
    mlflow_checkpoints = _log_checkpoints_to_mlflow(cfg, checkpoint_uri, kept, tracking_uri, run_id)
    from pipeline.distributed.checkpoint import load_generator

    trained_cfg, generator = load_generator(checkpoint_uri)  # for the logged model
    model_uri = _log_model(cfg, trained_cfg, generator, tracking_uri, run_id)
    del generator
    metrics = dict(result.metrics or {})
    metrics.update(_evaluate_at_end(cfg, checkpoint_uri, tracking_uri, run_id, workdir_path))
    mlflow_run.finish_run(tracking_uri, run_id, "FINISHED")
    return {"run_id": run_id, "name": cfg.run.name, "checkpoint": checkpoint_uri, "metrics": metrics,
            "tracking_uri": tracking_uri, "resumed": resuming, "model_uri": model_uri,
            "registered_model": cfg.run.register_model, "mlflow_checkpoints": mlflow_checkpoints}


def _log_checkpoint_uris(result, latest_uri: str, tracking_uri: str, run_id: str, s3: bool) -> list[tuple[str, dict]]:
    """The kept Ray-storage checkpoints' URIs as a run artifact; returns [(uri, reported metrics)]."""
    import json
    import tempfile

    from pipeline.tracking import mlflow_run

    kept = [(("s3://" + c.path.removeprefix("s3://")) if s3 else c.path, dict(m or {}))
            for c, m in (result.best_checkpoints or [])]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "checkpoints.json"
        path.write_text(json.dumps({"latest": latest_uri, "kept": [uri for uri, _ in kept]}, indent=1))
        mlflow_run.log_artifact(tracking_uri, run_id, str(path))
    return kept


def _log_checkpoints_to_mlflow(cfg: Config, latest_uri: str, kept: list[tuple[str, dict]], tracking_uri: str,
                               run_id: str) -> dict[str, str]:
    """run.mlflow_checkpoints into the run's artifacts: "final" = the latest checkpoint, "best" = the kept one
    with the lowest reported holdout_mse_pm1 (the latest when none reported it). Returns label -> source URI."""
    from pipeline.tracking.checkpoints import log_checkpoint

    sources: dict[str, str] = {}
    if "final" in cfg.run.mlflow_checkpoints:
        sources["final"] = latest_uri
    if "best" in cfg.run.mlflow_checkpoints:
        scored = [(m["holdout_mse_pm1"], uri) for uri, m in kept if isinstance(m.get("holdout_mse_pm1"), (int, float))]
        sources["best"] = min(scored)[1] if scored else latest_uri
    for label, uri in sources.items():
        log_checkpoint(tracking_uri, run_id, uri, label)
        print(f"[sparsegen] {label} checkpoint logged to MLflow run {run_id} (artifacts checkpoints/{label})", flush=True)
    return sources


def _log_model(cfg: Config, model_cfg: Config, generator, tracking_uri: str, run_id: str) -> str:
    """The trained generator as an MLflow model (``mlflow.pytorch``), registered when run.register_model."""
    from pipeline.tracking.models import log_generator

    model_uri = log_generator(tracking_uri, run_id, generator, model_cfg,
                              registered_model_name=cfg.run.register_model)
    registered = f", registered as '{cfg.run.register_model}'" if cfg.run.register_model else ""
    print(f"[sparsegen] generator logged as MLflow model {model_uri}{registered}", flush=True)
    return model_uri


def _evaluate_at_end(cfg: Config, checkpoint_uri: str, tracking_uri: str, run_id: str, workdir: Path) -> dict:
    """The configured end-of-training evaluation (evaluation.at_end) of the final checkpoint, logged into the
    run. It runs as a Ray task with the training workers' resources (a GPU when run.gpus_per_worker > 0), not
    in this driver (``pipeline.evaluation.orchestration.evaluate_on_ray``); its files land in
    ``<workdir>/evaluations/<run name>`` and the run's ``evaluation/`` artifacts."""
    if not cfg.evaluation.at_end:
        return {}
    from pipeline.evaluation.orchestration import evaluate_on_ray
    from pipeline.tracking import mlflow_run

    out_dir = workdir / "evaluations" / cfg.run.name
    print(f"[sparsegen] evaluating {', '.join(cfg.evaluation.at_end)} of the final checkpoint as a Ray task", flush=True)
    metrics, artifacts, where = evaluate_on_ray(cfg, checkpoint_uri, cfg.data.url, list(cfg.evaluation.at_end),
                                                out_dir=out_dir, inception_weights=cfg.evaluation.inception_weights)
    print(f"[sparsegen] evaluation ran on {where['device']} of node {where['hostname']} (pid {where['pid']})", flush=True)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if numeric:
        mlflow_run.log_metrics(tracking_uri, run_id, numeric, step=0)
    mlflow_run.set_tags(tracking_uri, run_id, {"sparsegen.evaluation.device": where["device"],
                                               "sparsegen.evaluation.node": where["hostname"]})
    for path in artifacts.values():
        mlflow_run.log_artifact(tracking_uri, run_id, path, "evaluation")
    return numeric


def run_demo(*, workdir: str | None = None, workers: int = 2, max_steps: int = DEMO_MAX_STEPS,
             max_train_minutes: float | None = DEMO_TRAIN_MINUTES, images: int = 1024) -> dict:
    """`sparsegen demo`: demo data -> shards -> Ray Train (tiny preset) -> MLflow; prints where to look.

    Trains until ``max_steps`` or ``max_train_minutes`` of training (None: no time limit), whichever
    comes first."""
    from pipeline.config import load_config

    minutes = "null" if max_train_minutes is None else max_train_minutes
    cfg = load_config("tiny", [f"run.workers={workers}", f"training.max_steps={max_steps}",
                               f"training.max_train_minutes={minutes}",
                               f"training.batch_size={DEMO_WORKER_BATCH_SIZE}",
                               f"data.demo_images={images}", "evaluation.at_end=[mse,matching,tree,parts]"])
    workdir_path = resolve_workdir(workdir)
    result = train(cfg, workdir=str(workdir_path))
    tracking_uri = result["tracking_uri"]
    pictures = write_pictures(result["checkpoint"], cfg.data.url, workdir_path / "evaluations" / result["name"])
    print()
    print(f"Demo finished: run '{result['name']}', MLflow run {result['run_id']}, "
          f"{int(result['metrics'].get('step', 0))} steps")
    print(f"  checkpoint:      {result['checkpoint']}")
    # The blob and holdout references put the matching score on a scale (evaluation/matching.py).
    shown = ("holdout_mse_pm1", "matching_score_conv8", "matching_reference_blob_conv8",
             "matching_reference_holdout_conv8", "parts_nmi_conv8", "parts_purity_conv8",
             "parts_purity_chance_conv8", "reconstruction_mse")
    print(f"  final metrics:   " + ", ".join(f"{k}={result['metrics'][k]:.4g}" for k in shown
                                             if isinstance(result["metrics"].get(k), float)))
    print("  pictures (open them):")
    for label, path in pictures.items():
        print(f"    {label:<32}{path}")
    result["pictures"] = {k: str(v) for k, v in pictures.items()}
    print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    print(f"  then browse http://127.0.0.1:5000 (experiment '{cfg.run.experiment}')")
    return result


def write_pictures(checkpoint_uri: str, data_url: str, out_dir: Path) -> dict[str, Path]:
    """Sample and holdout-reconstruction grids of a trained checkpoint, next to the end-of-training
    evaluation's basis-function and AND-OR tree pictures (which ``_evaluate_at_end`` wrote into ``out_dir``)."""
    import torch

    from pipeline.distributed.checkpoint import load_generator
    from pipeline.evaluation.orchestration import read_images
    from pipeline.learning.learner import generate, reconstruct
    from pipeline.tracking.images import image_grid

    cfg, generator = load_generator(checkpoint_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = {"samples (prior Z)": out_dir / "samples.png",
                "holdout reconstructions": out_dir / "reconstructions.png"}
    image_grid(generate(generator, 32, cfg, seed=1234), columns=8).save(pictures["samples (prior Z)"])
    _, images = read_images(data_url, "holdout", 16, cfg.model.resolution)
    _, reconstructions = reconstruct(generator, images, cfg, seed=0)
    # Row 1: holdout originals; row 2: their reconstructions (Langevin from the prior).
    image_grid(torch.cat([images, reconstructions]), columns=16).save(pictures["holdout reconstructions"])
    layer = cfg.evaluation.matching_layer
    for label, name in ((f"{layer} basis functions (Table 4)", f"matching_{layer}.png"),
                        (f"{layer} units vs true parts", f"parts_{layer}.png"), ("AND-OR tree (Fig. 1)", "and_or_tree.png")):
        if (out_dir / name).exists():
            pictures[label] = out_dir / name
    return pictures
