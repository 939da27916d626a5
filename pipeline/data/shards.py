"""On-disk dataset format: WebDataset tar shards plus a Parquet manifest.

Layout under a dataset URL (local directory or ``s3://bucket/prefix``)::

    shard-000000.tar      # WebDataset shard: per sample "<key>.png" (RGB, lossless) and "<key>.json"
    shard-000001.tar
    ...
    manifest.parquet      # one row per sample; written last, so its presence marks a complete dataset

``key`` is the zero-padded global index (``KEY_DIGITS`` digits). Global indices are dense, 0..N-1, in the
sorted order of the source; they identify an example for the whole life of the dataset (the latent bank
keys each example's persistent Z by it).

Per-sample JSON (``<key>.json``): ``{"global_index": int, "source": str, "original_size": [w, h],
"split": "train"|"holdout"}`` plus ``"ground_truth"`` for demo data (schema in ``pipeline.data.demo``).

Manifest columns: ``key``, ``global_index`` (int64), ``shard`` (shard file name), ``split``, ``source``,
``sha256`` (of the stored PNG bytes), ``original_width``, ``original_height``, ``image_offset_bytes`` and
``image_size_bytes`` (where the PNG's bytes lie inside the shard, so the reader slices them out without
parsing tar headers; the SHA-256 check then also catches a truncated or damaged shard) and, for demo data only,
``ground_truth`` (the same JSON as in the shard, so evaluation need not read the shards). Schema metadata:
``sparsegen.format_version``, ``sparsegen.image_size``, ``sparsegen.kind`` (``ingest`` or ``demo``).

Determinism: webdataset's ``TarWriter`` is byte-reproducible once ``mtime`` is fixed (it already fixes
uid/gid/mode/uname/gname and writes members in sorted order); PNG encoding and Parquet writing are
deterministic for fixed library versions. So the same input gives byte-identical shards and manifest.

Holdout assignment is by position, not by random draw: sample ``i`` is held out when
``floor((i + 1) * f) > floor(i * f)``. That selects exactly ``floor(N * f)`` evenly spaced samples, is
stable when more data is appended, and, since the source order is sorted (often by class folder), it
stratifies the holdout over the source.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import storage
from pipeline.data.errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.parquet"
SHARD_NAME_FORMAT = "shard-{:06d}.tar"
KEY_DIGITS = 9
IMAGE_EXTENSION = "png"
DEFAULT_SHARD_SIZE_IMAGES = 1000
# Fixed tar member mtime: any constant makes shards reproducible. It must be an int: tarfile's default PAX
# format adds a PAX extended header to every member whose mtime is a float, doubling the reader's work.
TAR_MTIME = 0
SPLIT_TRAIN = "train"
SPLIT_HOLDOUT = "holdout"


def format_key(global_index: int) -> str:
    return f"{global_index:0{KEY_DIGITS}d}"


def is_holdout(global_index: int, holdout_fraction: float) -> bool:
    return math.floor((global_index + 1) * holdout_fraction) > math.floor(global_index * holdout_fraction)


def sample_json_bytes(record: dict) -> bytes:
    # sort_keys + compact separators: the JSON bytes, hence the shards, are canonical.
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass
class _Row:
    key: str
    global_index: int
    shard: str
    split: str
    source: str
    sha256: str
    original_width: int
    original_height: int
    ground_truth: str | None
    image_offset_bytes: int = -1  # filled in when the shard is closed
    image_size_bytes: int = -1


@dataclass
class DatasetWriter:
    """Streams encoded samples into shards under ``out`` and writes the manifest on ``close()``.

    Local shards are written to a temporary name and renamed; S3 shards are staged in a local temp
    directory and uploaded with ``storage.upload_file`` (multipart, skipped when an identical object is
    already there, which makes an interrupted run resumable).
    """

    out: str
    image_size: int
    kind: str
    shard_size_images: int = DEFAULT_SHARD_SIZE_IMAGES
    holdout_fraction: float = 0.0
    rows: list[_Row] = field(default_factory=list, init=False)
    shard_urls: list[str] = field(default_factory=list, init=False)
    uploaded_shards: int = field(default=0, init=False)
    unchanged_shards: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.shard_size_images < 1:
            raise DataError(f"shard size must be >= 1 image, got {self.shard_size_images}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise DataError(f"holdout fraction must be in [0, 1), got {self.holdout_fraction}")
        self.out = str(self.out).rstrip("/") if storage.is_s3(self.out) else str(self.out)
        try:
            storage.check_writable(self.out)
        except storage.StorageError as error:
            raise DataError(str(error)) from error
        self._staging = tempfile.TemporaryDirectory(prefix="sparsegen-shards-") if storage.is_s3(self.out) else None
        self._tar_writer = None
        self._tar_file = None
        self._tar_path: Path | None = None
        self._count_in_shard = 0

    @property
    def num_written(self) -> int:
        return len(self.rows)

    def add(self, png_bytes: bytes, *, source: str, original_size: tuple[int, int], ground_truth=None) -> int:
        """Append one sample; returns its global index."""
        global_index = len(self.rows)
        if self._tar_writer is None:
            self._open_shard()
        key = format_key(global_index)
        split = SPLIT_HOLDOUT if is_holdout(global_index, self.holdout_fraction) else SPLIT_TRAIN
        record = {
            "global_index": global_index,
            "source": source,
            "original_size": [int(original_size[0]), int(original_size[1])],
            "split": split,
        }
        if ground_truth is not None:
            record["ground_truth"] = ground_truth
        self._tar_writer.write({"__key__": key, IMAGE_EXTENSION: png_bytes, "json": sample_json_bytes(record)})
        self.rows.append(
            _Row(
                key=key,
                global_index=global_index,
                shard=SHARD_NAME_FORMAT.format(len(self.shard_urls)),
                split=split,
                source=source,
                sha256=hashlib.sha256(png_bytes).hexdigest(),
                original_width=int(original_size[0]),
                original_height=int(original_size[1]),
                ground_truth=None
                if ground_truth is None
                else json.dumps(ground_truth, sort_keys=True, separators=(",", ":")),
            )
        )
        self._count_in_shard += 1
        if self._count_in_shard >= self.shard_size_images:
            self._close_shard()
        return global_index

    def _open_shard(self) -> None:
        import webdataset

        name = SHARD_NAME_FORMAT.format(len(self.shard_urls))
        directory = Path(self._staging.name) if self._staging else Path(self.out)
        self._tar_path = directory / name
        self._tar_file = open(directory / f".{name}.partial", "wb")
        # encoder=False: we hand over encoded bytes; mtime fixed for reproducible shards (see module doc).
        self._tar_writer = webdataset.TarWriter(
            self._tar_file, encoder=False, mtime=TAR_MTIME, user="sparsegen", group="sparsegen"
        )
        self._count_in_shard = 0

    def _close_shard(self) -> None:
        self._tar_writer.close()
        self._tar_file.close()
        partial = self._tar_path.parent / f".{self._tar_path.name}.partial"
        self._index_shard(partial, self.rows[len(self.rows) - self._count_in_shard :])
        os.replace(partial, self._tar_path)
        url = storage.join(self.out, self._tar_path.name)
        if self._staging:
            if storage.upload_file(self._tar_path, url):
                self.uploaded_shards += 1
            else:
                self.unchanged_shards += 1
            self._tar_path.unlink()
        self.shard_urls.append(url)
        self._tar_writer = self._tar_file = self._tar_path = None

    @staticmethod
    def _index_shard(tar_path: Path, rows: list[_Row]) -> None:
        """Record where each PNG's bytes are in the finished shard (read back, so no tar layout is assumed)."""
        by_name = {f"{row.key}.{IMAGE_EXTENSION}": row for row in rows}
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                row = by_name.pop(member.name, None)
                if row is not None:
                    row.image_offset_bytes, row.image_size_bytes = member.offset_data, member.size
        if by_name:  # pragma: no cover - would be a bug in the writer
            raise RuntimeError(f"{tar_path}: samples missing after writing: {sorted(by_name)[:3]}")

    def close(self) -> dict:
        """Finish the last shard and write the manifest. Returns the manifest URL and split counts."""
        if self._tar_writer is not None:
            self._close_shard()
        manifest_url = storage.join(self.out, MANIFEST_NAME)
        storage.write_bytes(manifest_url, manifest_bytes(self.rows, image_size=self.image_size, kind=self.kind))
        if self._staging:
            self._staging.cleanup()
        num_holdout = sum(row.split == SPLIT_HOLDOUT for row in self.rows)
        return {
            "shards": list(self.shard_urls),
            "manifest": manifest_url,
            "num_train": len(self.rows) - num_holdout,
            "num_holdout": num_holdout,
            "uploaded_shards": self.uploaded_shards,
            "unchanged_shards": self.unchanged_shards,
        }

    def abort(self) -> None:
        """Drop the shard in progress (no manifest is written, so the destination holds no dataset)."""
        if self._tar_writer is not None:
            self._tar_file.close()
            (self._tar_path.parent / f".{self._tar_path.name}.partial").unlink(missing_ok=True)
            self._tar_writer = None
        if self._staging:
            self._staging.cleanup()


def manifest_bytes(rows: list[_Row], *, image_size: int, kind: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "key": pa.array([r.key for r in rows], pa.string()),
        "global_index": pa.array([r.global_index for r in rows], pa.int64()),
        "shard": pa.array([r.shard for r in rows], pa.string()),
        "split": pa.array([r.split for r in rows], pa.string()),
        "source": pa.array([r.source for r in rows], pa.string()),
        "sha256": pa.array([r.sha256 for r in rows], pa.string()),
        "original_width": pa.array([r.original_width for r in rows], pa.int32()),
        "original_height": pa.array([r.original_height for r in rows], pa.int32()),
        "image_offset_bytes": pa.array([r.image_offset_bytes for r in rows], pa.int64()),
        "image_size_bytes": pa.array([r.image_size_bytes for r in rows], pa.int64()),
    }
    if any(r.ground_truth is not None for r in rows):
        columns["ground_truth"] = pa.array([r.ground_truth for r in rows], pa.string())
    metadata = {
        "sparsegen.format_version": str(FORMAT_VERSION),
        "sparsegen.image_size": str(image_size),
        "sparsegen.kind": kind,
    }
    table = pa.table(columns).replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()
