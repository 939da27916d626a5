"""Evaluation orchestration: ``evaluate`` runs the requested metrics, writes artifacts, and MLflow helpers.

Metric names carry their ranges/layers; all are floats:

* ``fid`` (+ ``fid_generated_samples``, ``fid_reference_images``): FID vs the training split, TF Inception
  pool3 features, as many generated samples as training images unless ``samples`` says otherwise.
* ``holdout_mse_pm1`` (pixels in [-1, 1]) and ``holdout_mse_01`` (= /4, pixels in [0, 1], the likely range of
  the paper's Table 3), per pixel and channel, of Langevin reconstructions from the prior of up to
  ``cfg.evaluation.mse_images`` holdout images; ``holdout_mse_images``.
* ``matching_score_<layer>`` (Table 4), ``matching_score_<layer>_image_mean``, ``matching_units_<layer>``,
  ``matching_channels_<layer>`` (distinct channels among the scored units: 1 means one pattern scored many
  times), ``matching_images``; ``matching_score_<layer>_field`` and ``matching_score_<layer>_field_image_mean``:
  the same with the fixed projective-field window as crop rule: see ``matching.py``;
  ``matching_reference_blob_<layer>`` and ``matching_reference_holdout_<layer>`` (the latter when the data has
  a holdout split): the score of a dark Gaussian blob and of unseen image patches in the same crop boxes,
  the reference points of ``matching.py``.
* ``tree_nodes``, ``tree_roots``: see ``tree.py`` (the tree itself is an artifact).
* ``parts_*_<layer>``: see ``parts.py`` (demo data only).
* ``swd`` (x 1e3, mean over pyramid levels), ``swd_level<i>`` (level 0 = full resolution, the last = 16 px),
  ``swd_images``: sliced Wasserstein distance on Laplacian-pyramid patches (``swd.py``) between samples from
  the prior and as many holdout images (train images when there is no holdout split; ``settings`` says
  which), at most ``cfg.evaluation.swd_images``.

A metric that cannot be computed (no Inception weights, no holdout split, no ground truth, no data) is left
out of the metrics and explained in ``evaluation.json`` (``unavailable``) and a warning; with
``strict=True`` it raises ``MetricUnavailable`` instead — before any expensive work for FID.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

METRICS = ("fid", "mse", "matching", "tree", "parts", "swd")
ARTIFACT_DIR = "evaluation"


class MetricUnavailable(RuntimeError):
    """A requested metric cannot be computed; ``metric`` names it."""

    def __init__(self, metric: str, message: str):
        self.metric = metric
        super().__init__(message)


def parse_metrics(text: str | list[str] | None) -> list[str]:
    """"fid,mse" or ["fid", "mse"] -> validated list, order kept, duplicates dropped; "all" = every metric."""
    if text is None:
        return []
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if items == ["all"]:
        return list(METRICS)
    unknown = [m for m in items if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)} or 'all'")
    return list(dict.fromkeys(items))


def read_images(data_url: str, split: str, n: int, image_size: int, batch_size: int = 100):
    """(global indices, images (N, 3, S, S) in [-1, 1]) of the first n images of a split, in manifest order."""
    from pipeline.data import make_loader

    loader = make_loader(data_url, split=split, batch_size=batch_size, shuffle=False, image_size=image_size)
    indices, images, seen = [], [], 0
    for batch_indices, batch in loader:
        take = min(n - seen, batch.shape[0])
        indices.append(batch_indices[:take])
        images.append(batch[:take])
        seen += take
        if seen >= n:
            break
    return torch.cat(indices), torch.cat(images)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def holdout_mse(generator, cfg, data_url: str, *, num_images: int, seed: int = 0, progress: bool = False,
                steps: int | None = None, noise_free_steps: int | None = None,
                step_size: float | None = None) -> dict[str, float]:
    """Per-pixel MSE of Langevin reconstructions (from the prior) of up to num_images holdout images.

    The chain is ``evaluation.inference_*``'s unless ``steps`` / ``noise_free_steps`` / ``step_size`` say
    otherwise (see ``pipeline.learning.learner.inference_options``).
    """
    from tqdm import tqdm

    from pipeline.data import make_loader
    from pipeline.learning.learner import reconstruct

    loader = make_loader(data_url, split="holdout", batch_size=cfg.training.batch_size, shuffle=False,
                         image_size=cfg.model.resolution)
    total = min(num_images, loader.num_samples)
    squared_error, values, seen = 0.0, 0, 0
    device = _device_of(generator)
    with tqdm(total=total, desc="holdout mse", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch_number, (_, images) in enumerate(loader):
            images = images[: total - seen].to(device)
            if images.shape[0] == 0:
                break
            _, recon = reconstruct(generator, images, cfg, steps=steps, noise_free_steps=noise_free_steps,
                                   step_size=step_size, seed=seed + batch_number)
            squared_error += float((recon.float() - images).pow(2).sum())
            values += images.numel()
            seen += images.shape[0]
            bar.update(images.shape[0])
            if seen >= total:
                break
    mse_pm1 = squared_error / values
    # [-1, 1] -> [0, 1] halves every difference, so the squared error is divided by 4.
    return {"holdout_mse_pm1": mse_pm1, "holdout_mse_01": mse_pm1 / 4.0, "holdout_mse_images": float(seen)}


def _basis_grid_png(result: dict, bases_images: list[np.ndarray], path: Path, title: str) -> Path:
    """Grid of the scored basis functions with their scores (a Fig. 7-style view of what Table 4 scores)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.evaluation.basis import to_display

    n = max(len(bases_images), 1)
    cols = min(16, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * 0.9, rows * 1.0 + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (image, score) in enumerate(zip(bases_images, result["scores"])):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(to_display(image), interpolation="nearest")
        ax.set_title("—" if score is None else f"{score:.2f}", fontsize=6)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    return path


def evaluate(
    cfg,
    generator: torch.nn.Module,
    data_url: str | None,
    metrics: list[str],
    *,
    samples: int | None = None,
    inception_weights: str | None = None,
    out_dir: str | Path,
    progress: bool = True,
    strict: bool = False,
    seed: int = 0,
    matching_latents: int = 8,
    matching_units_per_latent: int = 8,
    matching_colour: str = "gray",
    tree_roots: int = 6,
    tree_children: int = 3,
) -> tuple[dict[str, float], dict[str, str]]:
    """Compute ``metrics`` (subset of fid, mse, matching, tree, parts, swd) for ``generator`` on ``data_url``.

    Returns (metric name -> float, artifact name -> local path); artifacts are written under ``out_dir``,
    always including ``summary`` (evaluation.json: metrics, unavailable metrics with reasons, settings,
    seconds per metric). The generator is evaluated in eval mode and restored to its previous mode.
    """
    from pipeline.learning.learner import unwrap

    metrics = parse_metrics(metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = unwrap(generator)
    was_training = generator.training
    generator.eval()
    results: dict[str, float] = {}
    artifacts: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    seconds: dict[str, float] = {}
    settings: dict = {"metrics": metrics, "seed": seed, "data_url": data_url}
    layer = cfg.evaluation.matching_layer

    def give_up(metric: str, message: str) -> None:
        if strict:
            raise MetricUnavailable(metric, message)
        log.warning("%s unavailable: %s", metric, message)
        unavailable[metric] = message

    # FID's weights are checked first so a strict run fails before any expensive work.
    inception = None
    if "fid" in metrics:
        from pipeline.evaluation.inception import InceptionWeightsUnavailable, load_inception

        try:
            inception, weights_sha256 = load_inception(inception_weights or cfg.evaluation.inception_weights,
                                                       device=_device_of(generator))
            settings["inception_weights_sha256"] = weights_sha256
        except InceptionWeightsUnavailable as error:
            give_up("fid", str(error))

    try:
        for metric in metrics:
            if metric == "fid" and inception is None:
                continue
            if metric in ("fid", "mse", "matching", "parts", "swd") and not data_url:
                give_up(metric, "no dataset given (--data / cfg.data.url)")
                continue
            started = time.perf_counter()
            try:
                if metric == "fid":
                    results.update(_fid(cfg, generator, data_url, inception, settings["inception_weights_sha256"],
                                        samples, seed, progress, settings))
                elif metric == "mse":
                    results.update(holdout_mse(generator, cfg, data_url, num_images=cfg.evaluation.mse_images,
                                               seed=seed, progress=progress))
                elif metric == "matching":
                    results.update(_matching(cfg, generator, data_url, layer, out, seed, progress, artifacts,
                                             matching_latents, matching_units_per_latent, matching_colour))
                elif metric == "tree":
                    from pipeline.evaluation.tree import write_tree

                    rng = torch.Generator(device="cpu").manual_seed(seed)
                    z = torch.randn(1, cfg.model.latent_dim, generator=rng)
                    paths, document = write_tree(generator, z, out, roots=tree_roots, children=tree_children)
                    artifacts.update({k: str(v) for k, v in paths.items()})
                    results["tree_nodes"] = float(document["num_nodes"])
                    results["tree_roots"] = float(len(document["nodes"]))
                    settings["tree_layers"] = document["layers"]
                elif metric == "swd":
                    results.update(_swd(cfg, generator, data_url, seed, settings))
                elif metric == "parts":
                    from pipeline.evaluation.parts import part_interpretability

                    figure = out / f"parts_{layer}.png"
                    part_metrics, details = part_interpretability(
                        generator, cfg, data_url, layer=layer, num_images=cfg.evaluation.matching_images, seed=seed,
                        progress=progress, figure_path=figure)
                    results.update(part_metrics)
                    path = out / f"parts_{layer}.json"
                    path.write_text(json.dumps(details, indent=1))
                    artifacts["parts_json"] = str(path)
                    artifacts["parts_png"] = str(figure)
            except MetricUnavailable:
                raise
            except Exception as error:  # noqa: BLE001 - data problems become "unavailable", bugs still surface
                from pipeline.data import DataError

                if not isinstance(error, DataError):
                    raise
                give_up(metric, str(error))
            seconds[metric] = time.perf_counter() - started
    finally:
        generator.train(was_training)

    summary = out / "evaluation.json"
    summary.write_text(json.dumps({"metrics": results, "unavailable": unavailable, "settings": settings,
                                   "seconds": seconds}, indent=1, default=str))
    artifacts["summary"] = str(summary)
    return results, artifacts


def _fid(cfg, generator, data_url, inception, weights_sha256, samples, seed, progress, settings) -> dict[str, float]:
    from pipeline.data import open_dataset
    from pipeline.evaluation.fid import frechet_distance, generated_statistics, reference_statistics

    device = _device_of(generator)
    mu_r, sigma_r, count_r, cache_path = reference_statistics(
        data_url, inception, weights_sha256, image_size=cfg.model.resolution, device=device, progress=progress)
    # 2048x2048 float64 statistics are ~34 MB: kept in the local cache, referenced from the summary, not
    # copied into every run's artifacts.
    settings["fid_reference_stats"] = str(cache_path)
    # The paper: as many generated samples as training images.
    n = samples or cfg.evaluation.fid_samples or open_dataset(data_url).num_train
    mu_g, sigma_g = generated_statistics(generator, cfg.model.latent_dim, n, inception, seed=seed, device=device,
                                         progress=progress)
    return {"fid": frechet_distance(mu_g, sigma_g, mu_r, sigma_r), "fid_generated_samples": float(n),
            "fid_reference_images": float(count_r)}


def _swd(cfg, generator, data_url, seed, settings) -> dict[str, float]:
    """SWD between prior samples and real images: holdout (images the generator never fitted), else train."""
    from pipeline.data import DataError, open_dataset
    from pipeline.evaluation.swd import DIR_REPEATS, DIRS_PER_REPEAT, PATCH_SIZE_PX, PATCHES_PER_IMAGE, \
        sliced_wasserstein_distance
    from pipeline.learning.learner import generate

    info = open_dataset(data_url)
    split = "holdout" if info.num_holdout > 0 else "train"
    if split == "train":
        log.warning("swd: %s has no holdout split; comparing generated samples with training images", data_url)
    available = info.num_holdout if split == "holdout" else info.num_train
    if available == 0:
        raise DataError(f"{data_url} has no images to compare generated samples with")
    n = min(cfg.evaluation.swd_images, available)
    _, real = read_images(data_url, split, n, cfg.model.resolution, batch_size=cfg.training.batch_size)
    device = _device_of(generator)
    fake = generate(generator, n, cfg, seed=seed, batch_size=cfg.training.batch_size).float()
    result = sliced_wasserstein_distance(real.to(device), fake, seed=seed, device=device)
    settings["swd"] = {
        "reference_split": split if split == "holdout" else "train (the dataset has no holdout split)",
        "images": n, "seed": seed, "level_resolutions_px": result["resolutions_px"],
        "patch_size_px": PATCH_SIZE_PX, "patches_per_image": PATCHES_PER_IMAGE,
        "directions": f"{DIR_REPEATS} x {DIRS_PER_REPEAT}", "scale": "x 1e3",
    }
    metrics = {"swd": result["swd"], "swd_images": float(n)}
    metrics.update({f"swd_level{i}": value for i, value in enumerate(result["levels"])})
    return metrics


def _matching(cfg, generator, data_url, layer, out, seed, progress, artifacts, latents, per_latent, colour):
    from pipeline.data import open_dataset
    from pipeline.evaluation.matching import matching_score

    _, images = read_images(data_url, "train", cfg.evaluation.matching_images, cfg.model.resolution)
    # Unseen images for the "holdout" reference (matching.py): one per scored basis function at most.
    num_holdout = min(open_dataset(data_url).num_holdout, latents * per_latent)
    holdout = read_images(data_url, "holdout", num_holdout, cfg.model.resolution)[1] if num_holdout else None
    result = matching_score(generator, images, layer, latent_dim=cfg.model.latent_dim, num_latents=latents,
                            units_per_latent=per_latent, seed=seed, colour=colour, progress=progress,
                            references=True, holdout_pm1=holdout)
    # The second crop rule (matching.py: a fixed window of the unit's projective field, equal for every model).
    field = matching_score(generator, images, layer, latent_dim=cfg.model.latent_dim, num_latents=latents,
                           units_per_latent=per_latent, seed=seed, colour=colour, crop="field")
    path = out / f"matching_{layer}.json"
    per_pattern = ("scores", "image_mean", "locations", "patterns")
    document = {k: v for k, v in result.items() if k not in per_pattern}
    document["field"] = {k: v for k, v in field.items() if k not in per_pattern}
    path.write_text(json.dumps(document, indent=1))
    artifacts["matching_json"] = str(path)
    scale = ", ".join(f"{name} {value:.3f}" for name, value in result["reference"].items())
    png = _basis_grid_png(result, result["patterns"], out / f"matching_{layer}.png",
                          f"{layer} basis functions and their best NCC over {result['num_images']} training images "
                          f"(mean {result['score']:.3f}; in the same boxes: {scale})")
    artifacts["matching_png"] = str(png)
    return {
        f"matching_score_{layer}": result["score"],
        f"matching_score_{layer}_image_mean": result["image_mean_score"],
        f"matching_units_{layer}": float(result["scored"]),
        f"matching_channels_{layer}": float(result["channels"]),
        f"matching_score_{layer}_field": field["score"],
        f"matching_score_{layer}_field_image_mean": field["image_mean_score"],
        "matching_images": float(result["num_images"]),
        **{f"matching_reference_{name}_{layer}": value for name, value in result["reference"].items()},
    }


# --- On the cluster: evaluation as a Ray task with the training workers' resources -------------------------


def evaluation_resources(cfg, cluster_node_cpus: list[float] | None = None) -> dict[str, float]:
    """Ray resources of the end-of-training evaluation task of a run configured by ``cfg``: what its Train
    workers had, which fit() has just released. With ``run.gpus_per_worker > 0``: one worker's GPU share
    and CPUs (the evaluation runs on that GPU). On CPU: the workers' CPUs together, as far as one node
    holds them (``cluster_node_cpus``: each alive node's CPUs; a task cannot span nodes), at least one
    worker's."""
    per_worker = float(cfg.run.cpus_per_worker)
    if cfg.run.gpus_per_worker > 0:
        return {"num_cpus": per_worker, "num_gpus": float(cfg.run.gpus_per_worker)}
    cpus = per_worker * max(1, int(cfg.run.workers))
    if cluster_node_cpus:
        cpus = min(cpus, max(max(cluster_node_cpus), per_worker))
    return {"num_cpus": max(cpus, per_worker), "num_gpus": 0.0}


def _alive_node_cpus() -> list[float]:
    import ray

    return [float(node.get("Resources", {}).get("CPU", 0.0)) for node in ray.nodes() if node.get("Alive")]


def _evaluate_checkpoint_task(checkpoint_uri: str | None, data_url: str | None, metrics: list[str], kwargs: dict,
                              num_cpus: float, num_gpus: float, untrained_config: dict | None = None
                              ) -> tuple[dict[str, float], dict[str, tuple[str, bytes]], dict]:
    """The body of the Ray task: load the generator from the checkpoint onto this worker's device, evaluate
    into a temporary directory, return (metrics, artifact name -> (relative path, bytes), where it ran)."""
    import os
    import socket
    import tempfile

    from pipeline.distributed.checkpoint import load_generator

    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, int(num_cpus)))
    where = {"pid": os.getpid(), "hostname": socket.gethostname(), "device": device, "num_cpus": num_cpus,
             "num_gpus": num_gpus}
    try:
        import ray

        context = ray.get_runtime_context()
        where["node_id"] = context.get_node_id()
        where["assigned_resources"] = context.get_assigned_resources()
    except Exception:  # noqa: BLE001 - outside Ray (the in-process fallback)
        where["node_id"] = None
    if untrained_config is not None:
        from pipeline.config import config_from_dict
        from pipeline.learning.learner import initial_generator

        cfg = config_from_dict(untrained_config)
        generator = initial_generator(cfg, device)
    else:
        cfg, generator = load_generator(checkpoint_uri, device=device)
    with tempfile.TemporaryDirectory(prefix="sparsegen-eval-") as directory:
        results, artifacts = evaluate(cfg, generator, data_url, metrics, out_dir=directory, **kwargs)
        summary = Path(artifacts["summary"])
        document = json.loads(summary.read_text())
        document["ran_on"] = where
        summary.write_text(json.dumps(document, indent=1, default=str))
        files = {name: (str(Path(path).relative_to(directory)) if Path(path).is_relative_to(directory)
                        else Path(path).name, Path(path).read_bytes())
                 for name, path in artifacts.items() if Path(path).is_file()}
    return {k: float(v) for k, v in results.items()}, files, where


def evaluate_on_ray(cfg, checkpoint_uri: str | None, data_url: str | None, metrics: list[str], *, out_dir: str | Path,
                    untrained: bool = False, **kwargs) -> tuple[dict[str, float], dict[str, str], dict]:
    """``evaluate`` of the generator in ``checkpoint_uri`` as a Ray task with ``evaluation_resources(cfg)``
    (a GPU when ``run.gpus_per_worker > 0``), not in the calling process: the driver of a run sits on a CPU
    node. The checkpoint and the data are read where the task runs (as the Train workers read them); the
    artifact files come back and are written under ``out_dir``. Returns (metrics, artifact name -> local
    path, where it ran: node_id, hostname, pid, device). Without a running Ray it evaluates in-process.
    ``untrained=True`` evaluates the initialisation a run of ``cfg`` starts from instead (built in the task,
    ``pipeline.learning.learner.initial_generator``; ``checkpoint_uri`` unused), the ablation's baseline.

    The task escapes the caller's placement group (``scheduling_strategy="DEFAULT"``): inside a Tune trial
    the trial's bundle holds only its driver's CPUs, the workers' ones come free when fit() returns.
    """
    import ray

    kwargs.setdefault("progress", False)
    untrained_config = cfg.to_dict() if untrained else None
    if ray.is_initialized():
        resources = evaluation_resources(cfg, _alive_node_cpus())
        options = {"num_cpus": resources["num_cpus"], "scheduling_strategy": "DEFAULT", "max_retries": 1,
                   "runtime_env": {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true",
                                                "OMP_NUM_THREADS": str(max(1, int(resources["num_cpus"])))}}}
        if resources["num_gpus"] > 0:
            options["num_gpus"] = resources["num_gpus"]
        task = ray.remote(_evaluate_checkpoint_task).options(name="sparsegen-evaluate", **options)
        results, files, where = ray.get(task.remote(checkpoint_uri, data_url, list(metrics), kwargs,
                                                    resources["num_cpus"], resources["num_gpus"], untrained_config))
    else:
        results, files, where = _evaluate_checkpoint_task(checkpoint_uri, data_url, list(metrics), kwargs,
                                                          float(cfg.run.cpus_per_worker), 0.0, untrained_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for name, (relative, data) in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[name] = str(path)
    return results, paths, where


# --- MLflow -----------------------------------------------------------------------------------------------

def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def checkpoint_of_run(run_id: str, tracking_uri: str | None = None) -> str:
    """A checkpoint directory of a training run: its Ray-storage checkpoint (tag ``sparsegen.checkpoint``)
    while it exists, else the final checkpoint the run keeps as MLflow artifacts
    (``pipeline.tracking.checkpoints.checkpoint_for_run``)."""
    from pipeline.tracking.checkpoints import checkpoint_for_run

    return checkpoint_for_run(tracking_uri, run_id)


def run_exists(run_id: str, tracking_uri: str | None = None) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client(tracking_uri).get_run(run_id)
        return True
    except MlflowException:
        return False


def log_to_mlflow(run_id: str, metrics: dict[str, float], artifacts: dict[str, str], *,
                  tracking_uri: str | None = None, artifact_path: str = ARTIFACT_DIR, step: int | None = None) -> None:
    """Log metrics (non-finite values skipped: stores reject NaN) and artifact files into an existing run."""
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    now = int(time.time() * 1000)
    batch = [Metric(key=k, value=float(v), timestamp=now, step=step or 0)
             for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    if batch:
        client.log_batch(run_id, metrics=batch)
    for path in dict.fromkeys(artifacts.values()):
        if Path(path).is_file():
            client.log_artifact(run_id, path, artifact_path=artifact_path)
