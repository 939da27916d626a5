"""ShardLoader: stable rank partitions (disjoint, complete, equal batch counts, the same every epoch),
shuffling, decoding, errors."""

from __future__ import annotations

import io
import itertools
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import DataError, make_demo_data, make_loader, open_dataset
from pipeline.data.loader import partition_for_rank, plan_epoch

SHARD_SIZE = 6
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[int, str]:
    """Demo datasets with 1..7 shards; the last shard is partial so shards are uneven."""
    root = tmp_path_factory.mktemp("loader-data")
    urls = {}
    for num_shards in range(1, 8):
        url = str(root / f"shards-{num_shards}")
        summary = make_demo_data(url, n=SHARD_SIZE * (num_shards - 1) + 4, size=16, shard_size=SHARD_SIZE,
                                 holdout_fraction=0.1)
        assert len(summary["shards"]) == num_shards
        urls[num_shards] = url
    return urls


def read_all(url: str, world_size: int, **kwargs):
    """Per rank: (len(loader), [batch index lists], [image batches])."""
    results = []
    for rank in range(world_size):
        loader = make_loader(url, batch_size=BATCH_SIZE, rank=rank, world_size=world_size, seed=7, **kwargs)
        batches = list(loader)
        results.append((len(loader), [b[0].tolist() for b in batches], [b[1] for b in batches], loader))
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_shards", range(1, 8))
def test_rank_split_is_disjoint_complete_and_balanced(datasets, num_shards, world_size):
    url = datasets[num_shards]
    info = open_dataset(url)
    train = {r["global_index"] for r in info.table.to_pylist() if r["split"] == "train"}
    results = read_all(url, world_size)

    lengths = {length for length, _, _, _ in results}
    assert len(lengths) == 1, "every rank must report the same number of batches"
    seen: list[int] = []
    for length, index_batches, image_batches, loader in results:
        assert len(index_batches) == length, "len(loader) must match what iteration yields"
        assert all(0 < len(batch) <= BATCH_SIZE for batch in index_batches)
        seen += [i for batch in index_batches for i in batch]
        for images, indices in zip(image_batches, index_batches):
            assert images.shape == (len(indices), 3, 16, 16) and images.dtype == torch.float32
            assert images.min() >= -1.0 and images.max() <= 1.0
        assert loader.stats.get("skipped_samples", 0) == 0 and loader.stats.get("padded_samples", 0) == 0
    assert len(seen) == len(set(seen)), "ranks must be disjoint and see each sample once"
    assert set(seen) == train, "together the ranks must cover the whole train split"


def test_plan_properties_exhaustively():
    rng = random.Random(0)
    for _ in range(300):
        shard_sizes = [rng.randint(1, 9) for _ in range(rng.randint(1, 7))]
        starts = list(itertools.accumulate([0] + shard_sizes))
        shard_indices = {f"shard-{s:06d}.tar": list(range(starts[s], starts[s + 1])) for s in range(len(shard_sizes))}
        total = starts[-1]
        world_size = rng.randint(1, min(3, total))
        batch_size = rng.randint(1, 5)
        epochs = [plan_epoch(shard_indices, batch_size=batch_size, rank=r, world_size=world_size, seed=1,
                             epoch=epoch, shuffle=True) for epoch in range(3) for r in range(world_size)]
        epochs = [epochs[e * world_size:(e + 1) * world_size] for e in range(3)]
        for plans in epochs:
            assert len({len(p.batch_sizes) for p in plans}) == 1
            assert all(min(p.batch_sizes) >= 1 for p in plans)
            assert all(sum(p.batch_sizes) == p.num_samples for p in plans)
            assert all(max(p.batch_sizes) <= max(batch_size, 2) for p in plans)
            indices = [i for p in plans for _, shard in p.shards for i in shard]
            assert sorted(indices) == list(range(total))
            counts = [p.num_samples for p in plans]
            assert max(counts) - min(counts) <= 1
        # Stable partition: every epoch, each rank reads the same set of samples (its latents live there).
        for rank in range(world_size):
            sets = [sorted(i for _, shard in plans[rank].shards for i in shard) for plans in epochs]
            assert sets[0] == sets[1] == sets[2]
            partition = partition_for_rank(shard_indices, rank=rank, world_size=world_size)
            assert sets[0] == sorted(i for _, shard in partition for i in shard)
            # Contiguous in sorted shard order, so each rank reads ~1/world_size of the shards.
            assert sets[0] == list(range(sets[0][0], sets[0][-1] + 1))


def test_partition_is_stable_contiguous_and_shards_are_shared_at_most_at_the_boundaries():
    shard_indices = {f"shard-{s:06d}.tar": list(range(10 * s, 10 * s + 10)) for s in range(8)}  # 80 samples
    for world_size in (1, 2, 3, 5, 8, 13):
        partitions = [partition_for_rank(shard_indices, rank=r, world_size=world_size) for r in range(world_size)]
        flat = [[i for _, shard in p for i in shard] for p in partitions]
        assert [i for part in flat for i in part] == list(range(80)), "rank order follows sorted shard order"
        assert max(map(len, flat)) - min(map(len, flat)) <= 1
        for p in partitions:  # a rank reads whole shards except possibly its first and last one
            assert all(len(shard) == 10 for _, shard in p[1:-1])
        readers = {}
        for rank, p in enumerate(partitions):
            for name, _ in p:
                readers.setdefault(name, set()).add(rank)
        assert sum(len(r) for r in readers.values()) <= 8 + 2 * world_size  # shared shards: boundaries only
    with pytest.raises(DataError, match="outside"):
        partition_for_rank(shard_indices, rank=3, world_size=3)


def test_loader_partition_indices_are_what_the_rank_reads_every_epoch(datasets):
    url = datasets[5]
    for rank in range(3):
        loader = make_loader(url, batch_size=BATCH_SIZE, rank=rank, world_size=3, seed=7)
        for epoch in range(3):
            loader.set_epoch(epoch)
            assert sorted(i for indices, _ in loader for i in indices.tolist()) == loader.partition_indices


def test_too_few_samples_for_the_ranks_is_a_clear_error(datasets):
    with pytest.raises(DataError, match="fewer than"):
        make_loader(datasets[1], batch_size=2, rank=0, world_size=5)


def test_shuffle_is_seeded_and_changes_with_the_epoch(datasets):
    url = datasets[5]

    def order(seed, epoch, shuffle=True):
        loader = make_loader(url, batch_size=BATCH_SIZE, seed=seed, epoch=epoch, shuffle=shuffle)
        return [i for indices, _ in loader for i in indices.tolist()]

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)
    assert sorted(order(3, 1)) == sorted(order(3, 0))
    assert order(3, 0, shuffle=False) == sorted(order(3, 0))

    loader = make_loader(url, batch_size=BATCH_SIZE, seed=3, epoch=0)
    loader.set_epoch(1)
    assert [i for indices, _ in loader for i in indices.tolist()] == order(3, 1)


def test_images_are_the_stored_pixels_in_model_range(datasets):
    url = datasets[2]
    info = open_dataset(url)
    stored = {}
    for shard in info.shards:
        with tarfile.open(Path(url) / shard) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".png"):
                    stored[int(member.name[:-4])] = np.array(Image.open(archive.extractfile(member)))
    for indices, images in make_loader(url, batch_size=BATCH_SIZE):
        for index, image in zip(indices.tolist(), images):
            expected = torch.from_numpy(stored[index]).permute(2, 0, 1).float() / 127.5 - 1.0
            assert torch.allclose(image, expected, atol=1e-6)


def test_holdout_split_and_resize_on_load(datasets):
    url = datasets[7]
    info = open_dataset(url)
    holdout = sorted(r["global_index"] for r in info.table.to_pylist() if r["split"] == "holdout")
    assert len(holdout) == info.num_holdout > 0
    loader = make_loader(url, split="holdout", batch_size=2, shuffle=False, image_size=8)
    batches = list(loader)
    assert [i for indices, _ in batches for i in indices.tolist()] == holdout
    assert batches[0][1].shape[1:] == (3, 8, 8)
    everything = make_loader(url, split="all", batch_size=64, shuffle=False)
    assert len(everything) == 1 and next(iter(everything))[0].tolist() == list(range(info.num_examples))


def test_length_comes_from_the_manifest_without_reading(datasets, tmp_path):
    import shutil

    copy = tmp_path / "manifest-only"
    shutil.copytree(datasets[3], copy)
    for shard in copy.glob("shard-*.tar"):
        shard.unlink()
    info = open_dataset(str(copy))
    loader = make_loader(str(copy), batch_size=BATCH_SIZE, rank=1, world_size=2)
    expected = -(-(-(-info.num_train // 2)) // BATCH_SIZE)  # ceil(ceil(N / 2) / B)
    assert len(loader) == expected


def _copy_dataset(url: str, destination: Path) -> Path:
    import shutil

    shutil.copytree(url, destination)
    return destination


def test_truncated_shard_raises_naming_the_shard(datasets, tmp_path):
    copy = _copy_dataset(datasets[3], tmp_path / "broken")
    shard = copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    loader = make_loader(str(copy), batch_size=BATCH_SIZE, on_error="raise")
    with pytest.raises(DataError, match="shard-000001.tar"):
        list(loader)


def test_truncated_shard_is_skipped_counted_and_batch_count_kept(datasets, tmp_path, caplog):
    copy = _copy_dataset(datasets[3], tmp_path / "broken")
    shard = copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # keeps at most the first sample
    for world_size in (1, 2):
        lengths = []
        for rank in range(world_size):
            loader = make_loader(str(copy), batch_size=BATCH_SIZE, rank=rank, world_size=world_size, on_error="skip")
            batches = list(loader)
            lengths.append(len(batches))
            assert len(batches) == len(loader)
            assert all(len(indices) > 0 for indices, _ in batches)
        assert len(set(lengths)) == 1
    loader = make_loader(str(copy), batch_size=BATCH_SIZE, on_error="skip")
    batches = list(loader)
    assert loader.stats["corrupt_shards"] == 1 and loader.corrupt_shard_names == ["shard-000001.tar"]
    assert loader.stats["skipped_samples"] >= SHARD_SIZE - 2
    assert loader.stats["padded_samples"] == loader.stats["skipped_samples"]
    assert loader.stats["samples"] + loader.stats["skipped_samples"] == open_dataset(str(copy)).num_train
    assert "shard-000001.tar" in caplog.text


def test_damaged_image_bytes_are_caught_by_the_checksum(datasets, tmp_path):
    copy = _copy_dataset(datasets[1], tmp_path / "bitrot")
    shard = copy / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".png"))
    data[member.offset_data + member.size // 2] ^= 0xFF  # flip one byte inside the first PNG
    shard.write_bytes(bytes(data))

    with pytest.raises(DataError, match=f"{member.name[:-4]}.*shard-000000.tar"):
        list(make_loader(str(copy), batch_size=BATCH_SIZE, on_error="raise", shuffle=False))
    loader = make_loader(str(copy), batch_size=BATCH_SIZE, on_error="skip")
    assert len(list(loader)) == len(loader)
    assert loader.stats["checksum_mismatches"] == 1 and loader.stats["skipped_samples"] == 1


def test_missing_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(DataError, match="manifest.parquet not found"):
        open_dataset(str(tmp_path / "nothing-here"))
    with pytest.raises(DataError, match="manifest.parquet not found"):
        make_loader(str(tmp_path / "does-not-exist"), batch_size=4)


def test_bad_on_error_value(datasets):
    with pytest.raises(DataError, match="on_error"):
        make_loader(datasets[1], batch_size=4, on_error="ignore")
