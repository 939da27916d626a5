"""Persistent latents: one Z per training example, keyed by its stable global index (Algorithm 1, step 2).

Why a bank holds only part of the examples. Algorithm 1 continues every example's Langevin chain from
the Z its previous chain ended at, so each Z must live where that example is read. In distributed
training each rank reads a *stable* partition of the training examples (the same global indices every
epoch, ``pipeline.data.loader.partition_for_rank``), so a rank's bank holds exactly its partition's rows:
memory per worker is N / world_size rows, and gather / scatter never leave the process (no per-step
traffic, no merging). A bank built without ``indices`` holds every row ``0..capacity-1`` (tests, tools,
single-process use).

Rows (CPU tensors, one entry per held example, sorted by global index):

    indices          int64      the global index of each row (``gather``/``scatter`` map through it by
                                binary search, so no array of size ``capacity`` exists anywhere)
    z                float32[d] the persistent latent
    visits           int64      how many chains have run on the example (``scatter`` adds one)
    start_checksum   int64      ``checksum`` of the Z the example's latest chain started from (0 before
                                its first chain): lets a test prove, bit-exactly, that a chain continued
                                from a saved Z rather than from a stale or re-initialised one

Initial values are N(0, I) drawn per block of ``INIT_BLOCK_ROWS`` consecutive global indices from a
numpy generator seeded by ``(seed, block)``, so an example's initial Z is the same whichever partition
(world size) it falls in, and a rank draws only the blocks its rows lie in.

Persistence: a Parquet table (pyarrow) with columns ``index`` (int64), ``visits`` (int64),
``start_checksum`` (int64) and ``z`` (fixed_size_list<float32>[d]), sorted by ``index``, schema metadata
``sparsegen.capacity``; bit-exact. A checkpoint stores one such table per rank (see
``pipeline.distributed.checkpoint``); ``assign_rows`` restores the rows of any table that this bank
holds, which is how a checkpoint written at one world size is loaded at another. Tables written before
``visits`` existed load with visits 0.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

# Rows per independently seeded block of the initial N(0, I) draw: small enough that a rank whose
# partition is a few shards wide draws little beyond its own rows, large enough to keep the draws few.
INIT_BLOCK_ROWS = 1024
CAPACITY_METADATA_KEY = b"sparsegen.capacity"
# Odd 64-bit multipliers per latent dimension for ``checksum`` (odd: every bit of every element matters).
_CHECKSUM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def initial_latents(indices: torch.Tensor, latent_dim: int, seed: int) -> torch.Tensor:
    """The initial Z (float32 [len(indices), latent_dim]) of the given global indices: a function of
    (global index, seed) only, not of which or how many indices are asked for."""
    indices_np = torch.as_tensor(indices).to(torch.long).cpu().numpy().reshape(-1)
    order = np.argsort(indices_np, kind="stable")
    sorted_indices = indices_np[order]
    # numpy, single-threaded: on the shared 2-core box the 153 block copies of a 156k-row bank took 4.3 s
    # with torch's intra-op threads and 0.02 s in numpy.
    out = np.empty((len(indices_np), latent_dim), dtype=np.float32)
    if not len(indices_np):
        return torch.from_numpy(out)
    blocks = sorted_indices // INIT_BLOCK_ROWS
    starts = np.concatenate([[0], np.flatnonzero(np.diff(blocks)) + 1, [len(blocks)]]).astype(np.int64)
    for lo, hi in zip(starts[:-1], starts[1:]):  # rows lo..hi of the sorted order share one block
        block = int(blocks[lo])
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, block]))
        draw = rng.standard_normal((INIT_BLOCK_ROWS, latent_dim), dtype=np.float32)
        out[lo:hi] = draw[sorted_indices[lo:hi] - block * INIT_BLOCK_ROWS]
    if len(order) and not np.array_equal(order, np.arange(len(order))):
        unsorted = np.empty_like(out)
        unsorted[order] = out
        out = unsorted
    return torch.from_numpy(out)


def checksum(z: torch.Tensor) -> torch.Tensor:
    """int64 [n] checksum of each row's float32 bit pattern: a weighted sum mod 2^64 with odd weights, so
    changing any one element (even by one ulp) always changes it; ``start_checksum`` is compared for
    equality only."""
    bits = z.detach().to("cpu", torch.float32).contiguous().numpy().view(np.uint32).astype(np.uint64)
    weights = np.arange(1, 2 * bits.shape[1], 2, dtype=np.uint64) * _CHECKSUM_MULTIPLIER
    with np.errstate(over="ignore"):
        sums = (bits * weights).sum(axis=1, dtype=np.uint64)
    return torch.from_numpy(sums.view(np.int64).copy())


class LatentBank:
    def __init__(self, capacity: int, latent_dim: int, seed: int = 0, indices=None):
        """Rows for ``indices`` (global indices < ``capacity``; default: all of ``0..capacity-1``),
        initialised by ``initial_latents``."""
        if capacity <= 0:
            raise ValueError(f"latent bank capacity must be positive, got {capacity}")
        if indices is None:
            held = torch.arange(capacity, dtype=torch.long)
        else:
            held = torch.unique(torch.as_tensor(indices, dtype=torch.long).reshape(-1))  # sorted
            if held.numel() and (int(held[0]) < 0 or int(held[-1]) >= capacity):
                raise IndexError(f"latent bank rows must be global indices in 0..{capacity - 1}, "
                                 f"got {int(held[0])}..{int(held[-1])}")
        self._init(capacity, held, initial_latents(held, latent_dim, seed))

    def _init(self, capacity: int, indices: torch.Tensor, z: torch.Tensor) -> None:
        self._capacity = int(capacity)
        self.indices = indices
        self.z = z
        self.visits = torch.zeros(len(indices), dtype=torch.long)
        self.start_checksum = torch.zeros(len(indices), dtype=torch.long)

    @property
    def capacity(self) -> int:
        """Size of the global index space (the dataset's largest global index + 1), not the rows held."""
        return self._capacity

    @property
    def num_rows(self) -> int:
        return self.z.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.z.shape[1]

    @property
    def memory_bytes(self) -> int:
        """Bytes of the bank's tensors (Z, visits, checksums, index map)."""
        return sum(t.numel() * t.element_size() for t in (self.z, self.visits, self.start_checksum, self.indices))

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Row positions (LongTensor) of global ``indices``; IndexError for an index this bank does not hold."""
        indices = torch.as_tensor(indices).to(torch.long).cpu().reshape(-1)
        if not indices.numel():
            return indices
        rows = torch.searchsorted(self.indices, indices).clamp_(max=max(self.num_rows - 1, 0))
        held = (self.indices[rows] == indices) if self.num_rows else torch.zeros_like(indices, dtype=torch.bool)
        if not bool(held.all()):
            missing = indices[~held]
            raise IndexError(
                f"{missing.numel()} example indices are not held by this latent bank ({self.num_rows} rows of "
                f"capacity {self.capacity}), e.g. {missing[:5].tolist()}: the loader and the bank disagree on "
                "this rank's partition"
            )
        return rows

    def gather(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.z[self.rows(indices)].to(device, non_blocking=True)

    def scatter(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """Store the chains' end points; each row's visit count goes up by one (a row repeated within one
        call, which only loader padding produces, counts once: its chains all started from the same Z)."""
        rows = self.rows(indices)
        self.start_checksum[rows] = checksum(self.z[rows])
        self.z[rows] = z.detach().to("cpu", torch.float32)
        self.visits[rows] += 1

    # -- persistence --------------------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        flat = pa.array(self.z.numpy().reshape(-1), type=pa.float32())
        table = pa.table({
            "index": pa.array(self.indices.numpy(), type=pa.int64()),
            "visits": pa.array(self.visits.numpy(), type=pa.int64()),
            "start_checksum": pa.array(self.start_checksum.numpy(), type=pa.int64()),
            "z": pa.FixedSizeListArray.from_arrays(flat, self.latent_dim),
        })
        return table.replace_schema_metadata({CAPACITY_METADATA_KEY: str(self.capacity).encode()})

    def to_parquet_bytes(self) -> bytes:
        sink = io.BytesIO()
        # zstd keeps 100k x 100 float32 under the 50 MB budget without costing noticeable time.
        pq.write_table(self.to_table(), sink, compression="zstd")
        return sink.getvalue()

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_parquet_bytes())

    @staticmethod
    def table_capacity(table: pa.Table) -> int | None:
        """The capacity recorded in a table's metadata (None for tables written before it was recorded)."""
        value = (table.schema.metadata or {}).get(CAPACITY_METADATA_KEY)
        return int(value) if value is not None else None

    @staticmethod
    def _columns(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(index, visits, start_checksum, z [n, d]) as writable numpy arrays; old tables lack the counters."""
        indices = table.column("index").to_numpy().astype(np.int64, copy=True)
        z_column = table.column("z").combine_chunks()
        values = z_column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=True)
        values = values.reshape(len(indices), z_column.type.list_size)

        def counter(name: str) -> np.ndarray:
            if name not in table.column_names:
                return np.zeros(len(indices), dtype=np.int64)
            return table.column(name).to_numpy().astype(np.int64, copy=True)

        return indices, counter("visits"), counter("start_checksum"), values

    @classmethod
    def from_table(cls, table: pa.Table, capacity: int | None = None) -> "LatentBank":
        """A bank holding exactly the table's rows."""
        indices, visits, checksums, values = cls._columns(table)
        order = np.argsort(indices, kind="stable")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("latent table holds an example index more than once")
        capacity = capacity or cls.table_capacity(table) or (int(indices.max()) + 1 if len(indices) else 0)
        bank = cls.__new__(cls)
        bank._init(capacity, torch.from_numpy(indices[order]), torch.from_numpy(values[order]))
        bank.visits = torch.from_numpy(visits[order])
        bank.start_checksum = torch.from_numpy(checksums[order])
        return bank

    @classmethod
    def load(cls, path_or_bytes: str | bytes) -> "LatentBank":
        source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        return cls.from_table(pq.read_table(source))

    def assign_rows(self, table: pa.Table) -> int:
        """Overwrite this bank's rows with those of ``table`` that it holds (others are ignored); returns
        how many rows were restored. Rows the table lacks keep their current values."""
        if not self.num_rows or not table.num_rows:
            return 0
        table = table.filter(pc.is_in(table.column("index"), value_set=pa.array(self.indices.numpy())))
        if not table.num_rows:
            return 0
        indices, visits, checksums, values = self._columns(table)
        if values.shape[1] != self.latent_dim:
            raise ValueError(f"saved latents have {values.shape[1]} dimensions, the model has {self.latent_dim}")
        rows = self.rows(torch.from_numpy(indices))
        self.z[rows] = torch.from_numpy(values)
        self.visits[rows] = torch.from_numpy(visits)
        self.start_checksum[rows] = torch.from_numpy(checksums)
        return len(indices)
