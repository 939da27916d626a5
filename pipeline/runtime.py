"""Where a command's things live and the Ray it runs on: shared by the CLI, training, tuning and evaluation.

* ``resolve_workdir``   -- the working directory (``--workdir``, ``SPARSEGEN_WORKDIR``, ``./sparsegen-work``)
* ``ensure_demo_data``  -- the built-in demo shards for a config, made once under the workdir
* ``ensure_shards``     -- ``data.url`` as shards: a folder of raw images is ingested once
* ``init_ray``          -- join ``--address`` / ``RAY_ADDRESS``, reuse an initialised Ray, or start a local one
* ``storage_filesystem`` / ``storage_path`` -- what Ray Train / Tune get as ``storage_path`` and
  ``storage_filesystem`` for a local path or an ``s3://`` URI (honouring ``AWS_ENDPOINT_URL``)

Nothing here drives Ray Train or Ray Tune; heavy libraries are imported inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WORKDIR = "sparsegen-work"


def resolve_workdir(workdir: str | None) -> Path:
    path = Path(workdir or os.environ.get("SPARSEGEN_WORKDIR") or DEFAULT_WORKDIR).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_demo_data(cfg, workdir: Path, progress: bool = True) -> str:
    """The built-in demo shards for this config's resolution, made once under the workdir."""
    from pipeline.data import make_demo_data

    out = workdir / "data" / f"demo-{cfg.data.demo_images}-{cfg.model.resolution}px"
    if not (out / "manifest.parquet").exists():
        print(f"[sparsegen] making {cfg.data.demo_images} demo images at {out}", flush=True)
        make_demo_data(str(out), cfg.data.demo_images, size=cfg.model.resolution, seed=cfg.training.seed,
                       holdout_fraction=cfg.data.holdout_fraction, progress=progress)
    return str(out)


def ensure_shards(cfg, workdir: Path) -> str:
    """``data.url`` itself when it holds shards; a local folder or archive of raw images is ingested once
    into ``<workdir>/data/<name>-<resolution>px`` (the same as running `sparsegen ingest` first)."""
    from pipeline.data import ingest, storage

    url = cfg.data.url
    if storage.is_s3(url) or (Path(url) / "manifest.parquet").exists() or not Path(url).exists():
        return url  # shards, or an error from open_dataset naming the missing manifest
    out = workdir / "data" / f"{Path(url).resolve().name}-{cfg.model.resolution}px"
    if not (out / "manifest.parquet").exists():
        print(f"[sparsegen] {url} holds raw images: ingesting them into shards at {out}", flush=True)
        ingest(url, str(out), size=cfg.model.resolution, limit=cfg.data.limit,
               holdout_fraction=cfg.data.holdout_fraction)
    return str(out)


def init_ray(address: str | None, min_cpus: int) -> None:
    """Join RAY_ADDRESS / --address when given, else start (or reuse) an embedded local Ray with at least
    ``min_cpus`` logical CPUs (the machine's count when larger)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cpus = max(os.cpu_count() or 2, min_cpus)
    # The dashboard (loopback only) serves the state API that Ray Train's controller monitoring queries.
    ray.init(num_cpus=cpus, dashboard_host="127.0.0.1", log_to_driver=True)


def storage_filesystem(storage: str):
    """A pyarrow S3 filesystem honouring AWS_ENDPOINT_URL for s3:// storage (None: Ray's default)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not storage.startswith("s3://") or not endpoint:
        return None
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint,
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        scheme="https" if endpoint.startswith("https") else "http",
    )


def storage_path(storage: str) -> tuple[str, object]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: with an explicit filesystem Ray wants the
    path without the scheme."""
    filesystem = storage_filesystem(storage)
    return (storage[len("s3://"):] if filesystem is not None else storage), filesystem
