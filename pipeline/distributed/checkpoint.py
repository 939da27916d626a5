"""Checkpoint format: a directory (local or s3://) that is data, never code.

    state.pt                              generator, critic, optimisers, step, RNG states (torch.save of
                                          tensors and plain containers; ``torch.load(weights_only=True)``)
    latents/part-r00000-of-00002.parquet  the latent bank rows of rank 0 of 2 (index, visits, Z), one
    latents/part-r00001-of-00002.parquet  file per rank, see ``LatentBank``
    config.json                           the resolved config (``Config.to_dict``)
    meta.json                             step, epoch position, world size, MLflow run id, and
                                          ``latents``: capacity, latent dim and every part's file name,
                                          row count and global index range

Why one latents part per rank. Each rank holds only its stable partition's latents (see
``pipeline.learning.latent_bank``), so each rank writes its own part into its checkpoint directory and
calls ``ray.train.report`` with it; Ray Train V2 uploads every rank's directory to the same checkpoint
directory (one checkpoint, the union of the ranks' files) and registers it once all ranks have reported.
Rank 0 adds state.pt, config.json and meta.json; the part records in meta.json come from an all-gather of
a few integers per rank. Nothing else crosses ranks, and no rank ever holds all latents.

Loading at any world size (``restore_latents``): a rank reads only the parts whose index range overlaps
its own partition's (partitions are contiguous in global index order, so at the world size of the
writer that is its own part, at another one or two parts) and keeps the rows it holds (pyarrow
filtering). ``load_latents`` reads every part into one bank (tools, tests). Checkpoints written before
parts existed hold a single ``latents.parquet`` with every example's row; they load the same way.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, config_from_dict
from pipeline.learning.latent_bank import LatentBank

STATE_FILE = "state.pt"
LATENTS_DIR = "latents"
LATENTS_FILE = "latents.parquet"  # the whole bank in one file: checkpoints written before per-rank parts
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
LATENTS_FORMAT = "parts-v1"


@dataclass
class LoadedCheckpoint:
    config: Config
    state: dict
    bank: LatentBank | None  # every part's rows (None when loaded with ``latents=False``)
    meta: dict


def latent_part_name(rank: int, world_size: int) -> str:
    """The part file of ``rank`` of ``world_size``, relative to the checkpoint directory."""
    return f"{LATENTS_DIR}/part-r{rank:05d}-of-{world_size:05d}.parquet"


def write_latent_part(directory: str | os.PathLike, bank: LatentBank, *, rank: int, world_size: int) -> dict:
    """Write this rank's bank rows into ``directory``; returns the part record that goes into meta.json."""
    name = latent_part_name(rank, world_size)
    path = Path(directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    bank.save(str(path))
    indices = bank.indices
    return {"file": name, "rows": bank.num_rows, "min_index": int(indices[0]) if len(indices) else None,
            "max_index": int(indices[-1]) if len(indices) else None,
            "capacity": bank.capacity, "latent_dim": bank.latent_dim}


def latents_meta(parts: list[dict]) -> dict:
    """meta.json's ``latents`` entry from every rank's part record (in rank order)."""
    capacities = {p["capacity"] for p in parts}
    dims = {p["latent_dim"] for p in parts}
    if len(capacities) != 1 or len(dims) != 1:
        raise ValueError(f"ranks disagree on the latent bank's capacity {capacities} or dimension {dims}")
    return {"format": LATENTS_FORMAT, "world_size": len(parts), "capacity": capacities.pop(),
            "latent_dim": dims.pop(),
            "parts": [{k: p[k] for k in ("file", "rows", "min_index", "max_index")} for p in parts]}


def write_checkpoint(
    directory: str | os.PathLike,
    cfg: Config,
    state: dict,
    bank: LatentBank | None,
    meta: dict,
    *,
    latent_parts: list[dict] | None = None,
) -> str:
    """Write a checkpoint into a local ``directory`` (created); returns its path.

    Single process: pass the ``bank`` and it becomes the only part. Distributed: every rank has written its
    part with ``write_latent_part``; rank 0 calls this with ``bank=None`` and all ranks' ``latent_parts``.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if bank is not None:
        if latent_parts is not None:
            raise ValueError("pass either a bank or the ranks' latent parts, not both")
        latent_parts = [write_latent_part(path, bank, rank=0, world_size=1)]
    if not latent_parts:
        raise ValueError("a checkpoint needs its latents: pass a bank or the ranks' latent parts")
    torch.save(state, path / STATE_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
    meta = {**meta, "latents": latents_meta(latent_parts)}
    (path / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return str(path)


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _read(uri: str, name: str) -> bytes:
    from pipeline.data import storage

    return storage.read_bytes(storage.join(uri, name))


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu", *, latents: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint directory from a local path or s3:// URI (``file://`` prefixes are accepted).

    ``latents=True`` also reads every latents part into one bank (``load_latents``); training restores
    its own partition with ``restore_latents`` instead, and evaluation needs none.
    """
    uri = _strip_file_scheme(uri)
    try:
        state = torch.load(io.BytesIO(_read(uri, STATE_FILE)), map_location=map_location, weights_only=True)
        cfg = config_from_dict(json.loads(_read(uri, CONFIG_FILE)))
        meta = json.loads(_read(uri, META_FILE))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"not a sparsegen checkpoint (missing {exc.filename or exc}): {uri}") from None
    bank = load_latents(uri, meta) if latents else None
    return LoadedCheckpoint(cfg, state, bank, meta)


def _latent_parts(uri: str, meta: dict | None) -> tuple[list[dict], int | None]:
    """(part records, capacity) of a checkpoint: from meta.json, else the single file of old checkpoints."""
    from pipeline.data import storage

    if meta is None:
        meta = json.loads(_read(uri, META_FILE))
    if "latents" in meta:
        entry = meta["latents"]
        return entry["parts"], entry["capacity"]
    if storage.exists(storage.join(uri, LATENTS_FILE)):
        return [{"file": LATENTS_FILE, "rows": None, "min_index": None, "max_index": None}], None
    raise FileNotFoundError(f"not a sparsegen checkpoint (no latents in meta.json nor {LATENTS_FILE}): {uri}")


def _read_part(uri: str, part: dict):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(_read(uri, part["file"])))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"incomplete checkpoint {uri}: latents part {part['file']} is missing (a rank did not upload it)"
        ) from None
    if part.get("rows") is not None and table.num_rows != part["rows"]:
        raise ValueError(f"checkpoint {uri}: {part['file']} has {table.num_rows} rows, meta.json says {part['rows']}")
    return table


def load_latents(uri: str, meta: dict | None = None) -> LatentBank:
    """Every latent row of a checkpoint (all ranks' parts) in one bank, sorted by global index."""
    import pyarrow as pa

    uri = _strip_file_scheme(uri)
    parts, capacity = _latent_parts(uri, meta)
    tables = [_read_part(uri, part) for part in parts]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="default")
    capacity = capacity or max((LatentBank.table_capacity(t) or 0) for t in tables) or None
    return LatentBank.from_table(table, capacity=capacity)


def restore_latents(uri: str, bank: LatentBank, meta: dict | None = None) -> int:
    """Overwrite ``bank``'s rows (this rank's partition) with the checkpoint's, reading only the parts
    whose index range overlaps the bank's; returns how many rows were restored."""
    uri = _strip_file_scheme(uri)
    parts, capacity = _latent_parts(uri, meta)
    if capacity is not None and capacity != bank.capacity:
        raise ValueError(f"checkpoint latent bank holds {capacity} examples but the dataset has {bank.capacity}: "
                         "resume with the same data")
    if not bank.num_rows:
        return 0
    lo, hi = int(bank.indices[0]), int(bank.indices[-1])
    restored = 0
    for part in parts:
        if part["min_index"] is None and part.get("rows") == 0:
            continue
        if part["min_index"] is not None and (part["max_index"] < lo or part["min_index"] > hi):
            continue
        table = _read_part(uri, part)
        old_capacity = LatentBank.table_capacity(table)
        if capacity is None and table.num_rows:
            # Old single-file banks held every row 0..capacity-1.
            old_capacity = old_capacity or int(table.column("index").to_numpy().max()) + 1
            if old_capacity != bank.capacity:
                raise ValueError(f"checkpoint latent bank holds {old_capacity} examples but the dataset has "
                                 f"{bank.capacity}: resume with the same data")
        restored += bank.assign_rows(table)
    return restored


def checkpoint_uri(path: str, filesystem) -> str | None:
    """A URI that ``load_checkpoint`` reads for a Ray ``Checkpoint``'s (path, pyarrow filesystem);
    None for filesystems this project does not read directly (then use ``Checkpoint.as_directory``)."""
    kind = getattr(filesystem, "type_name", "local") if filesystem is not None else "local"
    if kind == "local":
        return path
    if kind == "s3":
        return "s3://" + path.removeprefix("s3://")
    return None


def load_generator(uri: str, device: str | torch.device = "cpu"):
    """(config, generator in eval mode) from a checkpoint: what evaluation and sampling need."""
    from pipeline.learning.learner import prepare_module
    from pipeline.model import build_generator

    loaded = load_checkpoint(uri, map_location=device, latents=False)
    generator = prepare_module(build_generator(loaded.config), loaded.config, torch.device(device))
    generator.load_state_dict(loaded.state["generator"])
    generator.eval()
    return loaded.config, generator


def checkpoint_files(uri: str) -> list[str]:
    """The files of a checkpoint, relative to it, with meta.json last (copy in this order: a copy whose
    meta.json exists is complete)."""
    uri = _strip_file_scheme(uri)
    meta = json.loads(_read(uri, META_FILE))
    parts, _ = _latent_parts(uri, meta)
    return [STATE_FILE, CONFIG_FILE, *(part["file"] for part in parts), META_FILE]


def copy_checkpoint(source: str, target: str) -> str:
    """Copy a checkpoint (local or s3://, either way) file by file, meta.json last; returns ``target``."""
    from pipeline.data import storage

    source = _strip_file_scheme(source)
    for name in checkpoint_files(source):
        storage.write_bytes(storage.join(target, *name.split("/")), _read(source, name))
    return target


def local_copy(uri: str) -> str:
    """A local directory holding the checkpoint at ``uri`` (downloaded to a temp dir when remote)."""
    from pipeline.data import storage

    if not storage.is_s3(uri):
        return _strip_file_scheme(uri)
    return copy_checkpoint(uri, tempfile.mkdtemp(prefix="sparsegen-ckpt-"))
