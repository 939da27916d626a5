"""S3 round trip against a real S3 API on loopback (moto_server): storage helpers, ingest, loader."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from pipeline.data import DataError, ingest, make_demo_data, make_loader, open_dataset
from pipeline.data import storage


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(9):
        Image.new("RGB", (40 + index, 30), (index * 25, 255 - index * 20, 90)).save(folder / f"{index:02d}.jpg")
    return folder


def test_storage_helpers(s3_env, tmp_path):
    assert storage.is_s3(s3_env.url) and not storage.is_s3(str(tmp_path))
    url = storage.join(s3_env.url, "dir/", "a.bin")
    assert url == f"s3://{s3_env.bucket}/dir/a.bin"
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)
    storage.write_bytes(url, b"hello")
    storage.write_bytes(storage.join(s3_env.url, "dir", "sub", "b.bin"), b"x")
    assert storage.exists(url) and storage.read_bytes(url) == b"hello"
    assert storage.list_dir(storage.join(s3_env.url, "dir")) == ["a.bin", "sub"]
    assert storage.list_dir(s3_env.url) == ["dir"]
    assert storage.open_read(url).read() == b"hello"


def test_upload_is_skipped_when_the_same_checksum_is_present(s3_env, tmp_path):
    local = tmp_path / "blob"
    local.write_bytes(b"a" * 1000)
    url = storage.join(s3_env.url, "blob")
    assert storage.upload_file(local, url) is True
    assert storage.upload_file(local, url) is False  # already there, identical
    local.write_bytes(b"b" * 1000)
    assert storage.upload_file(local, url) is True  # changed -> written again
    assert storage.read_bytes(url) == b"b" * 1000


def test_large_uploads_are_multipart(s3_env, tmp_path, monkeypatch):
    # S3's minimum part size is 5 MiB; lower our threshold to it so an 11 MiB file has 3 parts.
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK_BYTES", 5 * 1024 * 1024)
    local = tmp_path / "big"
    local.write_bytes(os.urandom(11 * 1024 * 1024))
    url = storage.join(s3_env.url, "big")
    assert storage.upload_file(local, url)
    bucket, key = storage.split_s3(url)
    head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # multipart ETags carry the part count
    assert head["Metadata"]["sha256"] == storage.sha256_file(local)
    assert storage.upload_file(local, url) is False


def test_ingest_to_s3_and_read_back_matches_local(s3_env, image_folder, tmp_path):
    dest = storage.join(s3_env.url, "datasets/photos")
    remote = ingest(image_folder, dest, size=16, shard_size=4, holdout_fraction=0.2, workers=1, progress=False)
    local = ingest(image_folder, tmp_path / "local", size=16, shard_size=4, holdout_fraction=0.2, workers=1,
                   progress=False)
    assert remote["shards"] == [f"{dest}/shard-00000{i}.tar" for i in range(3)]
    assert remote["uploaded_shards"] == 3 and remote["unchanged_shards"] == 0
    remote_info, local_info = open_dataset(dest), open_dataset(str(tmp_path / "local"))
    assert remote_info.manifest_sha256 == local_info.manifest_sha256  # byte-identical manifests
    assert (remote_info.num_train, remote_info.num_holdout) == (8, 1)

    for split in ("train", "holdout"):
        def read(url):
            loader = make_loader(url, split=split, batch_size=3, shuffle=False)
            return [(indices, images) for indices, images in loader]

        remote_batches, local_batches = read(dest), read(str(tmp_path / "local"))
        assert len(remote_batches) == len(local_batches) > 0
        for (ri, rx), (li, lx) in zip(remote_batches, local_batches):
            assert torch.equal(ri, li) and torch.equal(rx, lx)

    # Re-running is resumable: identical shards are not uploaded again.
    again = ingest(image_folder, dest, size=16, shard_size=4, holdout_fraction=0.2, workers=1, progress=False)
    assert again["uploaded_shards"] == 0 and again["unchanged_shards"] == 3


def test_rank_split_over_s3(s3_env):
    dest = storage.join(s3_env.url, "demo")
    make_demo_data(dest, n=25, size=8, shard_size=5, holdout_fraction=0.0)
    seen = []
    lengths = set()
    for rank in range(3):
        loader = make_loader(dest, batch_size=4, rank=rank, world_size=3, seed=1)
        lengths.add(len(loader))
        seen += [i for indices, _ in loader for i in indices.tolist()]
    assert len(lengths) == 1 and sorted(seen) == list(range(25))


def test_s3_errors_are_clear(s3_env):
    with pytest.raises(DataError, match="not found"):
        open_dataset(storage.join(s3_env.url, "nothing"))
    with pytest.raises(DataError, match="not writable"):
        make_demo_data("s3://no-such-bucket-for-sparsegen/x", n=3, size=8)


def test_webdataset_can_read_s3_shards(s3_env):
    import webdataset

    dest = storage.join(s3_env.url, "wds")
    make_demo_data(dest, n=6, size=8, shard_size=3)
    storage.register_webdataset_s3()
    keys = [sample["__key__"] for sample in webdataset.WebDataset(f"{dest}/shard-000001.tar", shardshuffle=False)]
    assert keys == ["000000003", "000000004", "000000005"]
