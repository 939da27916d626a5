"""Opening a dataset: its manifest as a ``DatasetInfo``, and demo ground truth by global index."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.data import storage
from pipeline.data.errors import DataError
from pipeline.data.shards import MANIFEST_NAME, SPLIT_HOLDOUT, SPLIT_TRAIN

SPLITS = (SPLIT_TRAIN, SPLIT_HOLDOUT, "all")


@dataclass
class DatasetInfo:
    url: str
    image_size: int
    num_examples: int  # all splits
    num_train: int
    num_holdout: int
    max_global_index: int
    shards: list[str]  # shard file names, relative to url
    manifest_sha256: str  # of the manifest file bytes: a cache key for anything derived from the data
    has_ground_truth: bool  # demo data
    kind: str  # "ingest" | "demo"
    table: Any  # pyarrow.Table, one row per sample (columns: see pipeline.data.shards)

    def shard_url(self, shard: str) -> str:
        return storage.join(self.url, shard)

    def split_table(self, split: str):
        """The manifest rows of one split ("train", "holdout" or "all")."""
        import pyarrow.compute as pc

        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if split == "all":
            return self.table
        return self.table.filter(pc.equal(self.table["split"], split))


def open_dataset(url: str) -> DatasetInfo:
    """Read ``manifest.parquet`` under ``url`` (local directory or ``s3://bucket/prefix``)."""
    import pyarrow.parquet as pq

    url = str(url).rstrip("/") if storage.is_s3(str(url)) else str(url)
    manifest_url = storage.join(url, MANIFEST_NAME)
    try:
        data = storage.read_bytes(manifest_url)
    except FileNotFoundError:
        raise DataError(f"no dataset at {url}: {manifest_url} not found (run `sparsegen ingest` first)") from None
    except (OSError, storage.StorageError) as error:
        raise DataError(f"cannot read {manifest_url}: {error}") from error
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{manifest_url} is not a readable Parquet manifest: {error}") from error
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if "sparsegen.image_size" not in metadata:
        raise DataError(f"{manifest_url} is not a sparsegen manifest (no sparsegen.image_size metadata)")
    splits = table["split"].to_pylist()
    num_holdout = sum(s == SPLIT_HOLDOUT for s in splits)
    indices = table["global_index"]
    return DatasetInfo(
        url=url,
        image_size=int(metadata["sparsegen.image_size"]),
        num_examples=table.num_rows,
        num_train=table.num_rows - num_holdout,
        num_holdout=num_holdout,
        max_global_index=int(max(indices.to_pylist(), default=-1)),
        shards=sorted(set(table["shard"].to_pylist())),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        has_ground_truth="ground_truth" in table.column_names,
        kind=metadata.get("sparsegen.kind", "ingest"),
        table=table,
    )


def iter_ground_truth(url_or_info: str | DatasetInfo, split: str = "all") -> Iterator[tuple[int, dict]]:
    """Yield ``(global_index, ground_truth)`` for demo data, in global-index order.

    ``ground_truth`` follows the schema in ``pipeline.data.demo``. Read from the manifest only (no shard
    reads). Raises DataError for datasets without ground truth (ingested photos).
    """
    info = url_or_info if isinstance(url_or_info, DatasetInfo) else open_dataset(url_or_info)
    if not info.has_ground_truth:
        raise DataError(f"{info.url} has no ground truth (only `sparsegen make-demo-data` datasets do)")
    table = info.split_table(split)
    for global_index, text in zip(table["global_index"].to_pylist(), table["ground_truth"].to_pylist()):
        yield global_index, json.loads(text)


def ground_truth_parts(url_or_info: str | DatasetInfo, split: str = "all") -> list[dict]:
    """Flat list of parts, one dict per part with its ``global_index`` added (handy for a DataFrame)."""
    return [
        {"global_index": global_index, **part}
        for global_index, truth in iter_ground_truth(url_or_info, split)
        for obj in truth["objects"]
        for part in obj["parts"]
    ]
