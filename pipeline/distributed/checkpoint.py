"""Checkpoint format: a directory (local or s3://) that is data, never code.

    state.pt          generator, critic, optimisers, step, epoch, RNG states (torch.save of tensors and
                      plain containers; loaded with ``torch.load(weights_only=True)``)
    latents.parquet   the whole latent bank (index -> Z), see ``LatentBank``
    config.json       the resolved config (``Config.to_dict``)
    meta.json         step, epoch, world size, MLflow run id

A checkpoint restores on any world size: the bank is keyed by example index, not by rank.
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
LATENTS_FILE = "latents.parquet"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"


@dataclass
class LoadedCheckpoint:
    config: Config
    state: dict
    bank: LatentBank
    meta: dict


def write_checkpoint(directory: str | os.PathLike, cfg: Config, state: dict, bank: LatentBank, meta: dict) -> str:
    """Write the four files into a local ``directory`` (created); returns its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / STATE_FILE)
    bank.save(str(path / LATENTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
    (path / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return str(path)


def _read(uri: str, name: str) -> bytes:
    from pipeline.data import storage

    return storage.read_bytes(storage.join(uri, name))


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint directory from a local path or s3:// URI (``file://`` prefixes are accepted)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    try:
        state = torch.load(io.BytesIO(_read(uri, STATE_FILE)), map_location=map_location, weights_only=True)
        bank = LatentBank.load(_read(uri, LATENTS_FILE))
        cfg = config_from_dict(json.loads(_read(uri, CONFIG_FILE)))
        meta = json.loads(_read(uri, META_FILE))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"not a sparsegen checkpoint (missing {exc.filename or exc}): {uri}") from None
    return LoadedCheckpoint(cfg, state, bank, meta)


def load_generator(uri: str, device: str | torch.device = "cpu"):
    """(config, generator in eval mode) from a checkpoint: what evaluation and sampling need."""
    from pipeline.learning.learner import prepare_module
    from pipeline.model import build_generator

    loaded = load_checkpoint(uri, map_location=device)
    generator = prepare_module(build_generator(loaded.config), loaded.config, torch.device(device))
    generator.load_state_dict(loaded.state["generator"])
    generator.eval()
    return loaded.config, generator


def local_copy(uri: str) -> str:
    """A local directory holding the checkpoint at ``uri`` (downloaded to a temp dir when remote)."""
    from pipeline.data import storage

    if not storage.is_s3(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    target = tempfile.mkdtemp(prefix="sparsegen-ckpt-")
    for name in (STATE_FILE, LATENTS_FILE, CONFIG_FILE, META_FILE):
        Path(target, name).write_bytes(_read(uri, name))
    return target
