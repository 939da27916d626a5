"""Persistent latents: one Z per training example, keyed by its stable global index (Algorithm 1, step 2).

The bank is a dense float32 tensor (rows = global indices 0..capacity-1) kept on the CPU: 100k examples
x 100 dims is 40 MB. Rows are initialised N(0, I) once from a seed, updated in place after each Langevin
chain, and saved as a Parquet table (pyarrow) with columns ``index`` (int64) and ``z``
(fixed_size_list<float32>[d]), so saving and loading is bit-exact and independent of the world size.

In distributed training each rank updates the rows of the examples it reads; ``touched`` marks them, and
``merge_across_ranks`` (called before a checkpoint) makes every rank's bank identical.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


class LatentBank:
    def __init__(self, capacity: int, latent_dim: int, seed: int = 0):
        if capacity <= 0:
            raise ValueError(f"latent bank capacity must be positive, got {capacity}")
        generator = torch.Generator().manual_seed(seed)
        self.z = torch.randn(capacity, latent_dim, generator=generator)
        self.touched = torch.zeros(capacity, dtype=torch.bool)

    @property
    def capacity(self) -> int:
        return self.z.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.z.shape[1]

    def _check(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(torch.long).cpu()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.capacity):
            raise IndexError(
                f"example index out of range for the latent bank (capacity {self.capacity}): "
                f"{int(indices.min())}..{int(indices.max())}"
            )
        return indices

    def gather(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.z[self._check(indices)].to(device, non_blocking=True)

    def scatter(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        indices = self._check(indices)
        self.z[indices] = z.detach().to("cpu", torch.float32)
        self.touched[indices] = True

    # -- persistence --------------------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        flat = pa.array(self.z.numpy().reshape(-1), type=pa.float32())
        return pa.table({
            "index": pa.array(np.arange(self.capacity, dtype=np.int64)),
            "z": pa.FixedSizeListArray.from_arrays(flat, self.latent_dim),
        })

    def to_parquet_bytes(self) -> bytes:
        sink = io.BytesIO()
        # zstd keeps 100k x 100 float32 under the 50 MB budget without costing noticeable time.
        pq.write_table(self.to_table(), sink, compression="zstd")
        return sink.getvalue()

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_parquet_bytes())

    @classmethod
    def from_table(cls, table: pa.Table) -> "LatentBank":
        indices = table.column("index").to_numpy().astype(np.int64, copy=True)  # writable, for torch
        z_column = table.column("z").combine_chunks()
        latent_dim = z_column.type.list_size
        values = z_column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        values = values.reshape(len(indices), latent_dim)
        bank = cls.__new__(cls)
        capacity = int(indices.max()) + 1 if len(indices) else 0
        bank.z = torch.zeros(capacity, latent_dim)
        bank.z[torch.from_numpy(indices)] = torch.from_numpy(values.copy())
        bank.touched = torch.zeros(capacity, dtype=torch.bool)
        return bank

    @classmethod
    def load(cls, path_or_bytes: str | bytes) -> "LatentBank":
        source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        return cls.from_table(pq.read_table(source))

    # -- distributed ----------------------------------------------------------------------------------
    def merge_across_ranks(self, device: torch.device | None = None) -> None:
        """Make all ranks' banks equal: each row takes the value of the rank that updated it.

        Every example is read by exactly one rank per epoch, so at most one rank touched each row since
        the last merge; untouched rows are identical on all ranks already.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.touched.zero_()
            return
        # NCCL reduces device tensors only; gloo works on the CPU copy directly.
        touched = self.touched.to(device or "cpu", torch.float32)
        contribution = self.z.to(device or "cpu") * touched[:, None]
        dist.all_reduce(contribution)
        dist.all_reduce(touched)
        touched, contribution = touched.cpu(), contribution.cpu()
        updated = touched > 0
        self.z[updated] = contribution[updated] / touched[updated][:, None]
        self.touched.zero_()
