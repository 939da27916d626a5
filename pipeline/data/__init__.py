"""Data layer: ingest images into WebDataset shards + a Parquet manifest, demo data, and the training reader.

Public API (imported lazily, so ``import pipeline.data`` costs nothing until used)::

    ingest(source, out, *, size=64, shard_size=1000, limit=None, holdout_fraction=0.0,
           workers=None, progress=True) -> dict
    make_demo_data(out, n, size=64, seed=0, shard_size=1000, holdout_fraction=0.1, progress=False) -> dict
    open_dataset(url) -> DatasetInfo
    make_loader(url, *, split="train", batch_size, rank=0, world_size=1, seed=0, epoch=0,
                shuffle=True, on_error="skip", image_size=None) -> ShardLoader
    iter_ground_truth(url, split="all") -> Iterator[(global_index, ground_truth dict)]
    ground_truth_parts(url, split="all") -> list[dict]   # one row per part, with global_index
    grammar_spec() -> dict                                # demo grammar: object -> slot -> part type, variants
    bench_data(...) -> dict                               # throughput figures
    DataError                                             # every user-facing data problem

Formats: ``pipeline.data.shards`` (shards + manifest), ``pipeline.data.demo`` (ground-truth JSON schema),
``pipeline.data.loader`` (stable rank partitions, batches, error handling), ``pipeline.data.storage`` (local / s3 URLs).
Images reach the model as float32 NCHW RGB in [-1, 1].
"""

from __future__ import annotations

import importlib

from pipeline.data.errors import DataError

_LAZY = {
    "ingest": "pipeline.data.ingest",
    "make_demo_data": "pipeline.data.demo",
    "grammar_spec": "pipeline.data.demo",
    "render_sample": "pipeline.data.demo",
    "PART_VARIANTS": "pipeline.data.demo",
    "OBJECT_SLOTS": "pipeline.data.demo",
    "open_dataset": "pipeline.data.dataset",
    "DatasetInfo": "pipeline.data.dataset",
    "iter_ground_truth": "pipeline.data.dataset",
    "ground_truth_parts": "pipeline.data.dataset",
    "make_loader": "pipeline.data.loader",
    "ShardLoader": "pipeline.data.loader",
    "plan_epoch": "pipeline.data.loader",
    "partition_for_rank": "pipeline.data.loader",
    "bench_data": "pipeline.data.bench",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
