"""ingest: every source kind, determinism, limit/holdout, bad input, CLI."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import DataError, ingest, open_dataset
from pipeline.data.shards import MANIFEST_NAME

# (relative name, PIL format, size): several formats, sizes and aspect ratios, nested folders.
IMAGE_SPECS = [
    ("a/001.jpg", "JPEG", (80, 60)),
    ("a/002.png", "PNG", (50, 90)),
    ("b/003.webp", "WEBP", (64, 64)),
    ("b/c/004.bmp", "BMP", (120, 40)),
    ("b/c/005.JPEG", "JPEG", (33, 70)),
    ("006.png", "PNG", (200, 150)),
    ("007.jpg", "JPEG", (64, 48)),
]


def image_bytes(fmt: str, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    width, height = size
    # Smooth gradients plus a little noise: compressible like a photo, distinct per seed.
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), np.full_like(x, seed * 37 % 256)], -1)
    pixels = np.clip(pixels + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(root: Path, specs=IMAGE_SPECS) -> Path:
    for seed, (name, fmt, size) in enumerate(specs):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(fmt, size, seed))
    return root


def sorted_names(specs=IMAGE_SPECS) -> list[str]:
    return sorted(name for name, _, _ in specs)


def read_shard_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


def dataset_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_images(tmp_path / "images")


def test_folder_source_recursive_formats_and_layout(image_folder, tmp_path):
    out = tmp_path / "out"
    summary = ingest(image_folder, out, size=32, shard_size=3, workers=1, progress=False)

    assert summary["written"] == len(IMAGE_SPECS) and summary["skipped"] == 0
    assert summary["source_kind"] == "folder"
    assert [Path(s).name for s in summary["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert summary["manifest"] == str(out / MANIFEST_NAME)

    table = pq.read_table(out / MANIFEST_NAME)
    assert table["source"].to_pylist() == sorted_names()  # sorted order, recursive, case-insensitive suffixes
    assert table["global_index"].to_pylist() == list(range(len(IMAGE_SPECS)))
    assert table["key"].to_pylist()[2] == "000000002"
    assert set(table["split"].to_pylist()) == {"train"}

    sizes = {name: size for name, _, size in IMAGE_SPECS}
    for row in table.to_pylist():
        members = read_shard_members(out / row["shard"])
        png = members[f"{row['key']}.png"]
        assert hashlib.sha256(png).hexdigest() == row["sha256"]
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
        meta = json.loads(members[f"{row['key']}.json"])
        assert meta["global_index"] == row["global_index"] and meta["source"] == row["source"]
        assert tuple(meta["original_size"]) == sizes[row["source"]]
        assert (row["original_width"], row["original_height"]) == sizes[row["source"]]


def test_centre_crop_keeps_the_middle(tmp_path):
    # A wide image: red left third, green middle, blue right third. The centre crop must be all green.
    pixels = np.zeros((60, 180, 3), np.uint8)
    pixels[:, :60, 0] = 255
    pixels[:, 60:120, 1] = 255
    pixels[:, 120:, 2] = 255
    (tmp_path / "src").mkdir()
    Image.fromarray(pixels).save(tmp_path / "src" / "wide.png")
    ingest(tmp_path / "src", tmp_path / "out", size=16, workers=1, progress=False)
    png = read_shard_members(tmp_path / "out" / "shard-000000.tar")["000000000.png"]
    stored = np.asarray(Image.open(io.BytesIO(png))).astype(int)
    assert np.abs(stored - [0, 255, 0]).max() <= 2


def test_zip_tar_and_folder_sources_give_the_same_images(image_folder, tmp_path):
    folder = ingest(image_folder, tmp_path / "from-folder", size=24, workers=1, progress=False)
    zip_path = tmp_path / "images.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name in reversed(sorted_names()):  # archive order differs from sorted order on purpose
            archive.write(image_folder / name, name)
        archive.writestr("README.txt", "not an image")
    tar_path = tmp_path / "images.tar.gz"
    with tarfile.open(tar_path, "w:gz") as archive:
        for name in reversed(sorted_names()):
            archive.add(image_folder / name, name)

    from_zip = ingest(zip_path, tmp_path / "from-zip", size=24, workers=1, progress=False)
    from_tar = ingest(tar_path, tmp_path / "from-tar", size=24, workers=1, progress=False)

    assert (from_zip["source_kind"], from_tar["source_kind"]) == ("zip", "tar")
    assert from_zip["skipped_by_reason"] == {"not_image": 1}
    reference = pq.read_table(tmp_path / "from-folder" / MANIFEST_NAME)
    for name in ("from-zip", "from-tar"):
        table = pq.read_table(tmp_path / name / MANIFEST_NAME)
        assert table["source"].to_pylist() == reference["source"].to_pylist()
        assert table["sha256"].to_pylist() == reference["sha256"].to_pylist()
    assert folder["written"] == from_zip["written"] == from_tar["written"] == len(IMAGE_SPECS)


def test_lmdb_source(tmp_path):
    import lmdb

    db = tmp_path / "lsun_export"
    env = lmdb.open(str(db), map_size=1 << 24)
    keys = [b"f3a9", b"0b71", b"77c0", b"a000"]
    with env.begin(write=True) as txn:
        for seed, key in enumerate(keys):
            txn.put(key, image_bytes("WEBP" if seed % 2 else "JPEG", (72, 56), seed))
        txn.put(b"zz-broken", b"definitely not an image")
    env.close()

    summary = ingest(db, tmp_path / "out", size=16, workers=1, progress=False)

    assert summary["source_kind"] == "lmdb"
    assert summary["written"] == 4 and summary["skipped_by_reason"] == {"not_image": 1}
    table = pq.read_table(tmp_path / "out" / MANIFEST_NAME)
    assert table["source"].to_pylist() == sorted(k.decode() for k in keys)


def test_output_is_byte_identical_across_runs_and_worker_counts(image_folder, tmp_path):
    first = ingest(image_folder, tmp_path / "one", size=32, shard_size=4, workers=1, progress=False)
    second = ingest(image_folder, tmp_path / "two", size=32, shard_size=4, workers=2, progress=False)
    assert first["written"] == second["written"] == len(IMAGE_SPECS)
    one, two = dataset_bytes(tmp_path / "one"), dataset_bytes(tmp_path / "two")
    assert list(one) == ["manifest.parquet", "shard-000000.tar", "shard-000001.tar"]
    assert {k: hashlib.sha256(v).hexdigest() for k, v in one.items()} == {
        k: hashlib.sha256(v).hexdigest() for k, v in two.items()
    }
    # Re-running into the same destination reproduces it too.
    ingest(image_folder, tmp_path / "one", size=32, shard_size=4, workers=1, progress=False)
    assert dataset_bytes(tmp_path / "one") == one


def test_limit_takes_the_first_n_in_sorted_order(image_folder, tmp_path):
    summary = ingest(image_folder, tmp_path / "out", size=16, limit=3, workers=2, progress=False)
    assert summary["written"] == 3
    assert pq.read_table(tmp_path / "out" / MANIFEST_NAME)["source"].to_pylist() == sorted_names()[:3]


def test_holdout_is_exact_and_evenly_spaced(tmp_path):
    specs = [(f"{i:03d}.png", "PNG", (20, 20)) for i in range(20)]
    write_images(tmp_path / "src", specs)
    summary = ingest(tmp_path / "src", tmp_path / "out", size=8, holdout_fraction=0.25, workers=1, progress=False)
    info = open_dataset(str(tmp_path / "out"))
    assert (summary["num_train"], summary["num_holdout"]) == (15, 5) == (info.num_train, info.num_holdout)
    holdout = [r["global_index"] for r in info.table.to_pylist() if r["split"] == "holdout"]
    assert holdout == [3, 7, 11, 15, 19]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_inputs_are_converted_or_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = image_bytes("JPEG", (64, 64), 1)
    (src / "01-good.jpg").write_bytes(good)
    (src / "02-truncated.jpg").write_bytes(image_bytes("JPEG", (64, 64), 2)[:400])
    (src / "03-text-named-like-a.jpg").write_bytes(b"hello, I am not a JPEG\n" * 10)
    (src / "04-notes.txt").write_text("not an image either")
    (src / "05-gray.png").write_bytes(image_bytes("PNG", (40, 40), 5, mode="L"))
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 40, 20))  # top half fully transparent
    (src / "06-rgba.png").write_bytes(_png(rgba))
    gray16 = Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16))
    assert gray16.mode == "I;16"
    (src / "07-gray16.png").write_bytes(_png(gray16))
    (src / "08-cmyk.jpg").write_bytes(image_bytes("JPEG", (40, 40), 8, mode="CMYK"))

    summary = ingest(src, tmp_path / "out", size=16, workers=1, progress=False)

    assert summary["written"] == 5
    assert summary["skipped"] == 3
    assert summary["skipped_by_reason"] == {"not_image": 2, "truncated": 1}
    assert summary["converted"] == {"CMYK": 1, "I;16": 1, "L": 1, "RGBA": 1}
    assert {name for name, _, _ in summary["skipped_examples"]} == {
        "02-truncated.jpg", "03-text-named-like-a.jpg", "04-notes.txt"
    }
    table = pq.read_table(tmp_path / "out" / MANIFEST_NAME)
    assert table["source"].to_pylist() == ["01-good.jpg", "05-gray.png", "06-rgba.png", "07-gray16.png", "08-cmyk.jpg"]
    members = read_shard_members(tmp_path / "out" / "shard-000000.tar")
    stored = {row["source"]: np.asarray(Image.open(io.BytesIO(members[row["key"] + ".png"])))
              for row in table.to_pylist()}
    assert all(pixels.shape == (16, 16, 3) for pixels in stored.values())
    assert (stored["06-rgba.png"][0, 8] == [255, 255, 255]).all()  # transparent -> white
    assert (stored["06-rgba.png"][15, 8] == [255, 0, 0]).all()
    assert (stored["07-gray16.png"] == 40000 >> 8).all()  # scaled to 8 bits, not clipped to white


def test_empty_source_is_one_error_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "a.txt").write_text("x")
    for source in ("empty", "only-text"):
        with pytest.raises(DataError, match="contains no images"):
            ingest(tmp_path / source, tmp_path / f"out-{source}", workers=1, progress=False)
        assert not (tmp_path / f"out-{source}").exists()
    with pytest.raises(DataError, match="does not exist"):
        ingest(tmp_path / "missing", tmp_path / "out", workers=1, progress=False)


def test_all_images_undecodable_is_an_error_without_a_manifest(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no decodable images"):
        ingest(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_unwritable_destination_is_one_error_before_any_work(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a directory")
    with pytest.raises(DataError, match="not writable"):
        ingest(image_folder, blocker / "dataset", workers=1, progress=False)


def _cli(argv: list[str]) -> int:
    from pipeline.cli import data as data_cli

    parser = argparse.ArgumentParser(prog="sparsegen")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_ingest_prints_json_summary_last(image_folder, tmp_path, capsys):
    code = _cli(["ingest", str(image_folder), "--out", str(tmp_path / "out"), "--size", "16",
                 "--shard-size", "4", "--holdout", "0.2", "--workers", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["written"] == len(IMAGE_SPECS) and summary["skipped"] == 0
    assert len(summary["shards"]) == 2 and summary["manifest"].endswith(MANIFEST_NAME)
    assert "ingest" in captured.err  # the tqdm progress bar goes to stderr


def test_cli_data_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = _cli(["ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "contains no images" in captured.err


def test_cli_help(capsys):
    for command in ("ingest", "make-demo-data"):
        with pytest.raises(SystemExit) as exit_info:
            _cli([command, "--help"])
        assert exit_info.value.code == 0
        assert "--out" in capsys.readouterr().out
