"""Persistent latents at any world size (issue 12, item 1): every training example's Langevin chain
continues from its last Z in every epoch, on 1 or 2 workers, and across a resume at another world size.

How continuity is proved: the bank records per row ``visits`` (chains run on it) and ``start_checksum``
(a bit-exact checksum of the Z its latest chain started from). If the row at the end of epoch e has
``start_checksum == checksum(Z at the end of epoch e-1)``, the epoch-e chain started from exactly that Z:
not from a stale copy, another rank's initial draw, or a re-initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
from pipeline.data import open_dataset
from pipeline.data.loader import partition_for_rank
from pipeline.distributed.checkpoint import (
    LATENTS_FILE, META_FILE, copy_checkpoint, load_checkpoint, load_latents, restore_latents, write_checkpoint,
    write_latent_part,
)
from pipeline.distributed.training_loop import resume_position
from pipeline.learning.latent_bank import LatentBank, checksum, initial_latents
from tests.conftest import FAST_TRAINING_OVERRIDES

# --- the bank and the checkpoint format, without Ray ---------------------------------------------------


def _partitions(num_examples: int, shard_size: int, world_size: int) -> list[list[int]]:
    shards = {f"shard-{s:06d}.tar": list(range(s * shard_size, min((s + 1) * shard_size, num_examples)))
              for s in range((num_examples + shard_size - 1) // shard_size)}
    return [[i for _, indices in partition_for_rank(shards, rank=r, world_size=world_size) for i in indices]
            for r in range(world_size)]


def test_partition_bank_holds_only_its_rows_with_the_same_initial_values_as_a_full_bank():
    full = LatentBank(5000, 8, seed=4)
    part = LatentBank(5000, 8, seed=4, indices=[4999, 17, 2048, 1023, 1024])
    assert part.num_rows == 5 and part.capacity == 5000 and part.indices.tolist() == [17, 1023, 1024, 2048, 4999]
    assert torch.equal(part.z, full.z[part.indices])  # initial Z depends on (index, seed) only
    assert torch.equal(initial_latents(part.indices, 8, 4), part.z)
    assert not torch.equal(LatentBank(5000, 8, seed=5, indices=[17]).z, part.gather(torch.tensor([17])))
    with pytest.raises(IndexError, match="not held by this latent bank"):
        part.gather(torch.tensor([18]))
    with pytest.raises(IndexError, match="global indices in 0..4999"):
        LatentBank(5000, 8, indices=[5000])
    assert part.memory_bytes == 5 * (8 * 4 + 3 * 8)


def test_scatter_counts_visits_and_records_the_start_of_each_chain():
    bank = LatentBank(10, 4, seed=0)
    start = bank.gather(torch.tensor([3, 7]))
    bank.scatter(torch.tensor([3, 7]), torch.ones(2, 4))
    assert bank.visits.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    assert torch.equal(bank.start_checksum[[3, 7]], checksum(start))
    assert bank.start_checksum[0] == 0
    bank.scatter(torch.tensor([3]), torch.full((1, 4), 2.0))
    assert bank.visits[3] == 2 and bank.start_checksum[3] == checksum(torch.ones(1, 4))[0]
    # A row repeated within one call (loader padding) is one chain start: counted once.
    bank.scatter(torch.tensor([5, 5]), torch.zeros(2, 4))
    assert bank.visits[5] == 1
    # The checksum sees every bit: the smallest change of one element changes it.
    z = torch.randn(3, 4)
    nudged = z.clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(10.0))
    assert (checksum(z) != checksum(nudged)).tolist() == [False, True, False]


def test_parquet_table_has_index_visits_and_z_columns():
    bank = LatentBank(50, 6, seed=1, indices=range(10, 20))
    bank.scatter(torch.tensor([12]), torch.zeros(1, 6))
    table = bank.to_table()
    assert table.schema.field("index").type == pa.int64()
    assert table.schema.field("visits").type == pa.int64()
    assert table.schema.field("z").type == pa.list_(pa.float32(), 6)
    loaded = LatentBank.load(bank.to_parquet_bytes())
    assert loaded.capacity == 50 and torch.equal(loaded.indices, bank.indices)
    assert torch.equal(loaded.z, bank.z) and torch.equal(loaded.visits, bank.visits)
    assert torch.equal(loaded.start_checksum, bank.start_checksum)


def _trained_parts(directory: Path, world_size: int, num_examples=3000, shard_size=400, d=5):
    """Banks of ``world_size`` ranks after one fake chain per row, written as a checkpoint; returns the
    combined expected rows (index -> (z, visits))."""
    cfg = pipeline.load_config("tiny")
    parts, expected = [], {}
    for rank, indices in enumerate(_partitions(num_examples, shard_size, world_size)):
        bank = LatentBank(num_examples, d, seed=0, indices=indices)
        new_z = torch.randn(bank.num_rows, d)
        bank.scatter(bank.indices, new_z)
        parts.append(write_latent_part(directory, bank, rank=rank, world_size=world_size))
        expected.update({i: (z, 1) for i, z in zip(bank.indices.tolist(), new_z)})
    write_checkpoint(directory, cfg, {"step": 1}, None, {"step": 1, "world_size": world_size}, latent_parts=parts)
    return expected


@pytest.mark.parametrize("new_world_size", [1, 3, 4])
def test_checkpoint_parts_restore_at_another_world_size(tmp_path, new_world_size):
    expected = _trained_parts(tmp_path, world_size=4)
    meta = json.loads((tmp_path / META_FILE).read_text())
    files = [p["file"] for p in meta["latents"]["parts"]]
    assert files == [f"latents/part-r{r:05d}-of-00004.parquet" for r in range(4)]
    for rank, indices in enumerate(_partitions(3000, 400, new_world_size)):
        bank = LatentBank(3000, 5, seed=0, indices=indices)
        assert restore_latents(str(tmp_path), bank) == len(indices)
        assert torch.equal(bank.z, torch.stack([expected[i][0] for i in indices]))
        assert bank.visits.tolist() == [1] * len(indices)
    everything = load_latents(str(tmp_path))
    assert everything.indices.tolist() == list(range(3000)) and bool((everything.visits == 1).all())
    assert torch.equal(load_checkpoint(str(tmp_path)).bank.z, everything.z)
    with pytest.raises(ValueError, match="holds 3000 examples but the dataset has 3001"):
        restore_latents(str(tmp_path), LatentBank(3001, 5, indices=[0]))


def test_a_rank_reads_only_the_parts_that_overlap_its_partition(tmp_path):
    _trained_parts(tmp_path, world_size=4)
    (tmp_path / "latents" / "part-r00003-of-00004.parquet").unlink()
    first = _partitions(3000, 400, 4)[0]
    assert restore_latents(str(tmp_path), LatentBank(3000, 5, indices=first)) == len(first)
    last = _partitions(3000, 400, 4)[3]
    with pytest.raises(FileNotFoundError, match="part-r00003-of-00004.parquet is missing"):
        restore_latents(str(tmp_path), LatentBank(3000, 5, indices=last))


def test_old_single_file_checkpoints_still_load(tmp_path):
    """Before per-rank parts: latents.parquet with every row 0..capacity-1 and only index and z."""
    cfg = pipeline.load_config("tiny")
    z = torch.randn(40, 3)
    flat = pa.array(z.numpy().reshape(-1), type=pa.float32())
    pq.write_table(pa.table({"index": pa.array(range(40), pa.int64()),
                             "z": pa.FixedSizeListArray.from_arrays(flat, 3)}), tmp_path / LATENTS_FILE)
    torch.save({"step": 8}, tmp_path / "state.pt")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / META_FILE).write_text(json.dumps({"step": 8, "epoch": 2.0, "world_size": 2}))
    bank = LatentBank(40, 3, indices=range(20, 30))
    assert restore_latents(str(tmp_path), bank) == 10
    assert torch.equal(bank.z, z[20:30]) and bank.visits.tolist() == [0] * 10
    assert torch.equal(load_checkpoint(str(tmp_path)).bank.z, z)
    copied = copy_checkpoint(str(tmp_path), str(tmp_path / "copy"))
    assert torch.equal(load_latents(copied).z, z)
    with pytest.raises(ValueError, match="holds 40 examples"):
        restore_latents(str(tmp_path), LatentBank(41, 3, indices=[0]))


def test_copy_checkpoint_copies_every_part(tmp_path):
    expected = _trained_parts(tmp_path / "source", world_size=2)
    copied = copy_checkpoint(str(tmp_path / "source"), str(tmp_path / "copy"))
    assert sorted(p.name for p in (tmp_path / "copy" / "latents").iterdir()) == [
        "part-r00000-of-00002.parquet", "part-r00001-of-00002.parquet"]
    assert load_latents(copied).indices.tolist() == sorted(expected)


def test_resume_position_is_in_epochs_not_in_steps_of_the_old_world_size():
    # Fresh run; same world size mid-epoch (skip the batches done); epoch boundary at another world size.
    assert resume_position(None, 0, 8, 1) == (0, 0)
    assert resume_position({"epoch_index": 1, "epoch_start_step": 4, "world_size": 2}, 6, 4, 2) == (1, 4)
    assert resume_position({"epoch_index": 2, "epoch_start_step": 8, "world_size": 2}, 8, 8, 1) == (2, 8)
    # Mid-epoch at another world size: the next epoch starts at once.
    assert resume_position({"epoch_index": 1, "epoch_start_step": 4, "world_size": 2}, 6, 8, 1) == (2, 6)
    # Checkpoints from before epoch positions were saved: "epoch" = step / steps_per_epoch of the writer.
    assert resume_position({"epoch": 1.5, "world_size": 2, "step": 6}, 6, 4, 2) == (1, 4)
    assert resume_position({"epoch": 2.0, "world_size": 2, "step": 8}, 8, 8, 1) == (2, 8)
    assert resume_position({"epoch": 1.5, "world_size": 2, "step": 6}, 6, 8, 1) == (2, 6)


# --- Ray Train: 2 workers for two epochs, then one more epoch on 1 worker ----------------------------


def _cfg(demo_shards, *overrides):
    cfg = pipeline.load_config("tiny", [*FAST_TRAINING_OVERRIDES, *overrides])
    cfg.data.url = demo_shards
    return cfg


def _checkpoints_by_step(run_dir: Path) -> dict[int, str]:
    found = {}
    for meta in run_dir.glob("checkpoint_*/" + META_FILE):
        found[json.loads(meta.read_text())["step"]] = str(meta.parent)
    return found


@pytest.fixture(scope="module")
def train_indices(demo_shards):
    info = open_dataset(demo_shards)
    return sorted(info.split_table("train")["global_index"].to_pylist())


@pytest.fixture(scope="module")
def two_epochs_on_two_workers(two_worker_run):
    """conftest's shared run: 2 workers, 2 epochs of 4 steps (116 training images, batch 16 per rank),
    a checkpoint at the end of each epoch."""
    return two_worker_run.result, two_worker_run.workdir, two_worker_run.cfg


@pytest.mark.ray
def test_two_workers_continue_every_chain_in_every_epoch(two_epochs_on_two_workers, train_indices, demo_shards):
    result, workdir, cfg = two_epochs_on_two_workers
    # Steps 4 and 8 (test_train_ray's same-name resume may have added step 10 to the same run).
    checkpoints = {step: path for step, path in _checkpoints_by_step(workdir / "runs" / cfg.run.name).items()
                   if step <= 8}
    assert sorted(checkpoints) == [4, 8] and result["checkpoint"] == checkpoints[8]
    epoch1, epoch2 = load_checkpoint(checkpoints[4]), load_checkpoint(checkpoints[8])
    assert epoch1.meta["epoch_index"] == 1 and epoch2.meta["epoch_index"] == 2
    d = cfg.model.latent_dim

    # Only training examples have rows (holdout ones are absent), every one visited once per epoch.
    for loaded, epochs in ((epoch1, 1), (epoch2, 2)):
        assert loaded.bank.indices.tolist() == train_indices
        assert loaded.bank.visits.tolist() == [epochs] * len(train_indices)
    # Epoch 1 started from each example's initial draw; epoch 2 from exactly where epoch 1 ended.
    initial = initial_latents(torch.tensor(train_indices), d, cfg.training.seed)
    assert torch.equal(epoch1.bank.start_checksum, checksum(initial))
    assert torch.equal(epoch2.bank.start_checksum, checksum(epoch1.bank.z))
    assert bool((epoch2.bank.z != epoch1.bank.z).any(dim=1).all())

    # Each rank wrote exactly its stable partition: about half of the examples each, nothing more.
    info = open_dataset(demo_shards)
    shard_indices: dict[str, list[int]] = {}
    for row in info.split_table("train").select(["shard", "global_index"]).to_pylist():
        shard_indices.setdefault(row["shard"], []).append(row["global_index"])
    parts = epoch2.meta["latents"]["parts"]
    assert [p["rows"] for p in parts] == [58, 58]
    for rank, part in enumerate(parts):
        written = pq.read_table(Path(checkpoints[8], part["file"]))["index"].to_pylist()
        assert written == [i for _, shard in partition_for_rank(shard_indices, rank=rank, world_size=2) for i in shard]


@pytest.mark.ray
def test_resume_on_one_worker_continues_visits_chains_and_weights(two_epochs_on_two_workers, train_indices,
                                                                  demo_shards):
    from pipeline.distributed.trainer import train

    result, workdir, _ = two_epochs_on_two_workers
    saved = load_checkpoint(result["checkpoint"])
    # One more epoch (8 steps of 16 on one worker), started from the 2-worker checkpoint.
    cfg = _cfg(demo_shards, "run.workers=1", "training.epochs=3", "run.name=latents-one-from-two",
               "run.checkpoint_every_steps=100")
    resumed = load_checkpoint(train(cfg, workdir=str(workdir), resume_from=result["checkpoint"])["checkpoint"])
    assert resumed.meta["world_size"] == 1 and resumed.meta["step"] == 8 + 8 and resumed.meta["epoch_index"] == 3
    assert [p["file"] for p in resumed.meta["latents"]["parts"]] == ["latents/part-r00000-of-00001.parquet"]
    assert resumed.bank.indices.tolist() == train_indices
    assert resumed.bank.visits.tolist() == [3] * len(train_indices)  # 2 epochs on 2 workers + 1 on 1 worker
    # Every chain of the third epoch started from the Z saved by the 2-worker run, not a fresh draw.
    assert torch.equal(resumed.bank.start_checksum, checksum(saved.bank.z))
    # Generator weights continued from the checkpoint rather than a fresh initialisation.
    fresh = pipeline.build_generator(cfg).state_dict()["fc.weight"]
    moved = resumed.state["generator"]["fc.weight"]
    assert (moved - saved.state["generator"]["fc.weight"]).abs().max() < (moved - fresh).abs().max()
