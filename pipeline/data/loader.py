"""Training/evaluation reader: shards split across Ray Train ranks, shuffled, decoded to [-1, 1] tensors.

Rank split (``partition_for_rank``). The split's shards are taken in sorted order and their samples
concatenated; rank ``r`` gets the ``r``-th of ``world_size`` contiguous, near-equal ranges (sizes differ by
at most one). The partition is *stable*: the same global indices every epoch (it depends on the manifest
and the world size only, not on the seed or epoch), because each rank keeps the persistent latent Z of
exactly its partition's examples (``pipeline.learning.latent_bank``) and every chain must continue from
its last Z. A range mostly covers whole shards, so each rank reads about ``1/world_size`` of the shards
plus at most two boundary shards that it shares with a neighbour. Every sample of the split is therefore
seen exactly once per epoch across ranks, also when shards do not divide evenly (5 shards over 2 or 3
ranks) or there are fewer shards than ranks. Since ingest writes the source in sorted order (often class
folder by class folder), a rank's partition may be one part of the source only; under DDP the step's
gradient averages all ranks, so each update still sees every partition (a stratified batch).

Per epoch (``plan_epoch``), a rank reads its partition's shards in a seeded order (from ``seed``,
``epoch`` and ``rank``). Batch counts are the same on every rank (so DDP never waits on a rank that ran
out): each rank yields ``ceil(ceil(N / world_size) / batch_size)`` batches (capped so no batch is empty),
all of ``batch_size`` except the last ones, which shrink as needed; batch sizes may thus differ by rank.
The count is computed from the manifest alone: ``len(loader)`` reads nothing.

Within a rank, samples go through a seeded shuffle buffer (webdataset's, seeded by seed, epoch and rank)
across its shards.

Errors (``on_error``): an unreadable/truncated shard, a sample whose bytes do not match the manifest's
SHA-256 (damaged shard), or an undecodable image either raises ``DataError`` naming the shard (``"raise"``) or is skipped,
counted in ``loader.stats`` and logged with the shard named (``"skip"``). When samples were skipped the
rank still yields exactly ``len(loader)`` batches of the planned sizes, padding with recently yielded
samples (counted as ``padded_samples``), because a short rank would hang DDP.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.data import storage
from pipeline.data.dataset import DatasetInfo, open_dataset
from pipeline.data.errors import DataError
from pipeline.data.shards import format_key

log = logging.getLogger(__name__)
ON_ERROR_CHOICES = ("skip", "raise")
# Encoded samples held for shuffling within a rank (~50 MB at 64×64): spans several 1000-image shards, whose
# samples are in source order (often one class folder after another).
DEFAULT_SHUFFLE_BUFFER_SAMPLES = 4096
STAT_KEYS = (
    "batches",
    "samples",  # yielded, excluding padding
    "skipped_samples",  # all causes
    "corrupt_shards",
    "checksum_mismatches",
    "undecodable_samples",
    "padded_samples",
)
# Shards fetched ahead in a background thread: hides S3 latency behind decoding.
PREFETCH_SHARDS = 2


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch."""

    shards: tuple[tuple[str, tuple[int, ...]], ...]  # (shard name, global indices wanted), in read order
    batch_sizes: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(len(indices) for _, indices in self.shards)


def partition_for_rank(
    shard_indices: dict[str, list[int]], *, rank: int, world_size: int
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Rank ``rank``'s stable partition: ``(shard name, global indices)`` in sorted shard order (see the
    module docstring). The same for every epoch and seed."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    total = sum(len(v) for v in shard_indices.values())
    if total < world_size:
        raise DataError(f"the split has {total} samples, fewer than the {world_size} ranks that must share it")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    shards, position = [], 0
    for name in sorted(shard_indices):
        indices = shard_indices[name]
        lo, hi = max(start, position), min(stop, position + len(indices))
        if lo < hi:
            shards.append((name, tuple(indices[lo - position : hi - position])))
        position += len(indices)
        if position >= stop:
            break
    return tuple(shards)


def batch_sizes_for(num_samples: int, num_batches: int, batch_size: int) -> tuple[int, ...]:
    """Split ``num_samples`` into exactly ``num_batches`` non-empty batches, full ones first."""
    sizes, remaining = [], num_samples
    for batch in range(num_batches):
        batches_after = num_batches - batch - 1
        size = remaining if batches_after == 0 else min(batch_size, remaining - batches_after)
        sizes.append(size)
        remaining -= size
    return tuple(sizes)


def plan_epoch(
    shard_indices: dict[str, list[int]],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
) -> RankPlan:
    """The samples and batch sizes of ``rank`` for one epoch (see module docstring): its stable partition,
    shards in a seeded per-epoch order when ``shuffle``."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    shards = list(partition_for_rank(shard_indices, rank=rank, world_size=world_size))
    if shuffle:
        random.Random(f"sparsegen-shards:{seed}:{epoch}:{rank}").shuffle(shards)
    total = sum(len(v) for v in shard_indices.values())
    base, extra = divmod(total, world_size)
    smallest_rank_samples, largest_rank_samples = base, base + (1 if extra else 0)
    # Capped at the smallest rank's sample count so that no rank has an empty batch (matters for batch_size 1).
    num_batches = min(math.ceil(largest_rank_samples / batch_size), smallest_rank_samples)
    rank_samples = sum(len(indices) for _, indices in shards)
    return RankPlan(tuple(shards), batch_sizes_for(rank_samples, num_batches, batch_size))


class ShardLoader:
    """Iterable of ``(global_indices LongTensor[B], images FloatTensor[B, 3, H, W] in [-1, 1])``."""

    def __init__(
        self,
        info: DatasetInfo,
        *,
        split: str = "train",
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        on_error: str = "skip",
        image_size: int | None = None,
        shuffle_buffer_samples: int = DEFAULT_SHUFFLE_BUFFER_SAMPLES,
        verify_checksums: bool = True,
    ):
        if on_error not in ON_ERROR_CHOICES:
            raise DataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.info = info
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.on_error = on_error
        self.image_size = image_size or info.image_size
        self.shuffle_buffer_samples = shuffle_buffer_samples
        table = info.split_table(split)
        if table.num_rows == 0:
            raise DataError(f"{info.url} has no samples in split {split!r}")
        indices = table["global_index"].to_pylist()
        self._shard_indices: dict[str, list[int]] = {}
        for shard, index in zip(table["shard"].to_pylist(), indices):
            self._shard_indices.setdefault(shard, []).append(index)
        self._verify_checksums = verify_checksums
        # global index -> (byte offset of its PNG in the shard, byte size, SHA-256)
        self._locations = dict(zip(indices, zip(table["image_offset_bytes"].to_pylist(),
                                                table["image_size_bytes"].to_pylist(), table["sha256"].to_pylist())))
        # Cumulative over the loader's life; all keys present from the start so metrics have a fixed schema.
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.corrupt_shard_names: list[str] = []
        self.set_epoch(epoch)

    @property
    def partition_indices(self) -> list[int]:
        """Sorted global indices this rank reads in every epoch (its stable partition): the rows its
        latent bank must hold."""
        shards = partition_for_rank(self._shard_indices, rank=self.rank, world_size=self.world_size)
        return sorted(index for _, indices in shards for index in indices)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the shard order and shuffle within the rank are functions of (seed, epoch);
        the rank's set of samples is the same in every epoch."""
        self.epoch = epoch
        self.plan = plan_epoch(
            self._shard_indices,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
        )

    def __len__(self) -> int:
        return len(self.plan.batch_sizes)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields this epoch (without padding)."""
        return self.plan.num_samples

    def _count(self, counter: str, amount: int = 1) -> None:
        self.stats[counter] = self.stats.get(counter, 0) + amount

    def _bad_shard(self, shard: str, problem: str, lost_samples: int) -> None:
        url = self.info.shard_url(shard)
        if self.on_error == "raise":
            raise DataError(f"corrupt shard {url}: {problem}")
        log.warning("skipping %d unreadable samples of corrupt shard %s: %s", lost_samples, url, problem)
        self._count("corrupt_shards")
        self._count("skipped_samples", lost_samples)
        self.corrupt_shard_names.append(shard)

    def _bad_sample(self, shard: str, global_index: int, counter: str, problem: str) -> None:
        url = self.info.shard_url(shard)
        if self.on_error == "raise":
            raise DataError(f"bad sample {format_key(global_index)} in shard {url}: {problem}")
        log.warning("skipping sample %s of shard %s: %s", format_key(global_index), url, problem)
        self._count(counter)
        self._count("skipped_samples")

    def _encoded_samples(self, plan: RankPlan) -> Iterator[tuple[str, int, bytes]]:
        """``(shard, global_index, png_bytes)`` for the plan's samples, shard by shard, prefetching ahead.

        PNG bytes are sliced out of the shard at the manifest's offsets instead of walking the tar headers
        (tarfile's header parsing cost as much as decoding a 64×64 PNG); the SHA-256 check, or the slice
        running past the end of the data, is what detects a damaged or truncated shard.
        """
        with ThreadPoolExecutor(max_workers=PREFETCH_SHARDS, thread_name_prefix="shard-prefetch") as pool:
            urls = [self.info.shard_url(shard) for shard, _ in plan.shards]
            fetches = deque(pool.submit(storage.read_bytes, url) for url in urls[:PREFETCH_SHARDS])
            for position, (shard, wanted_indices) in enumerate(plan.shards):
                fetch = fetches.popleft()
                if position + PREFETCH_SHARDS < len(urls):
                    fetches.append(pool.submit(storage.read_bytes, urls[position + PREFETCH_SHARDS]))
                try:
                    data = fetch.result()
                except (OSError, storage.StorageError) as error:
                    self._bad_shard(shard, f"cannot read it: {error}", len(wanted_indices))
                    continue
                missing = 0
                for global_index in wanted_indices:
                    offset, size, sha256 = self._locations[global_index]
                    if offset < 0 or offset + size > len(data):
                        missing += 1
                        continue
                    png = data[offset : offset + size]
                    if self._verify_checksums and hashlib.sha256(png).hexdigest() != sha256:
                        self._bad_sample(shard, global_index, "checksum_mismatches", "SHA-256 differs from the manifest")
                        continue
                    yield shard, global_index, png
                if missing:
                    self._bad_shard(
                        shard, f"{missing} of {len(wanted_indices)} samples lie past its end ({len(data)} bytes)", missing
                    )

    def _decoded_samples(self, plan: RankPlan) -> Iterator[tuple[int, Any]]:
        import numpy as np
        from PIL import Image
        from webdataset.filters import shuffle as shuffle_filter

        samples = self._encoded_samples(plan)
        if self.shuffle:
            rng = random.Random(f"sparsegen-samples:{self.seed}:{self.epoch}:{self.rank}")
            initial = min(self.shuffle_buffer_samples, plan.num_samples)
            samples = shuffle_filter(self.shuffle_buffer_samples, initial, rng=rng)(iter(samples))
        resize_to = None if self.image_size == self.info.image_size else (self.image_size, self.image_size)
        for shard, global_index, png in samples:
            try:
                with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
                    image = image.convert("RGB") if image.mode != "RGB" else image
                    if resize_to:
                        image = image.resize(resize_to, Image.Resampling.LANCZOS)
                    pixels = np.asarray(image)
            except Exception as error:  # noqa: BLE001 - PIL raises several types on damaged input
                self._bad_sample(shard, global_index, "undecodable_samples", f"{type(error).__name__}: {error}")
                continue
            yield global_index, pixels

    def __iter__(self):
        import numpy as np
        import torch

        plan = self.plan
        samples = self._decoded_samples(plan)
        # Recently yielded samples, to pad batches if skipped samples left this rank short (see docstring).
        recent: deque = deque(maxlen=max(plan.batch_sizes))
        for batch_size in plan.batch_sizes:
            batch = []
            for sample in samples:
                batch.append(sample)
                if len(batch) == batch_size:
                    break
            real_samples = len(batch)
            if real_samples < batch_size:
                pool = list(recent) + batch
                if not pool:
                    raise DataError(
                        f"rank {self.rank} has no readable samples left in {self.info.url} ({self.stats}); "
                        f"cannot yield the {len(plan.batch_sizes)} batches every rank must yield"
                    )
                padding = [pool[i % len(pool)] for i in range(batch_size - len(batch))]
                self._count("padded_samples", len(padding))
                batch += padding
            recent.extend(batch)
            self._count("batches")
            self._count("samples", real_samples)
            global_indices = torch.tensor([index for index, _ in batch], dtype=torch.long)
            pixels = np.stack([array for _, array in batch])  # B, H, W, 3 uint8
            # uint8 HWC -> float32 CHW in [-1, 1] in numpy, in place: torch's intra-op threads make these
            # small element-wise ops 10x slower when the cores are shared with the training step.
            images = np.empty((len(batch), 3, pixels.shape[1], pixels.shape[2]), dtype=np.float32)
            images[...] = pixels.transpose(0, 3, 1, 2)
            images *= np.float32(1 / 127.5)
            images -= np.float32(1.0)
            yield global_indices, torch.from_numpy(images)


def make_loader(url: str | DatasetInfo, **options: Any) -> ShardLoader:
    """A ``ShardLoader`` over the dataset at ``url`` (local dir or s3://), or over an opened ``DatasetInfo``;
    ``options`` are ``ShardLoader``'s keyword arguments (``batch_size`` is required)."""
    info = url if isinstance(url, DatasetInfo) else open_dataset(url)
    return ShardLoader(info, **options)
