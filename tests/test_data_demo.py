"""Demo data: ground truth schema and correctness (part boxes own the part's pixels), determinism, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, ground_truth_parts, iter_ground_truth, make_demo_data, open_dataset
from pipeline.data.demo import OBJECT_SLOTS, PART_VARIANTS, grammar_spec, render_sample

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("demo") / "demo")
    make_demo_data(url, n=240, size=SIZE, shard_size=100, holdout_fraction=0.1)
    return url


def test_summary_and_manifest(demo):
    info = open_dataset(demo)
    assert info.has_ground_truth and info.kind == "demo"
    assert (info.num_examples, info.num_train, info.num_holdout) == (240, 216, 24)
    assert info.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert info.image_size == SIZE and info.max_global_index == 239


def test_ground_truth_schema_and_grammar(demo):
    truths = dict(iter_ground_truth(demo))
    assert sorted(truths) == list(range(240))
    object_types, variants = set(), set()
    for truth in truths.values():
        assert truth["grammar"] == "sparsegen-demo-v1" and len(truth["background_rgb"]) == 3
        (obj,) = truth["objects"]
        object_types.add(obj["object_type"])
        slots = OBJECT_SLOTS[obj["object_type"]]
        assert [p["slot"] for p in obj["parts"]] == [s.name for s in slots]
        chosen = {}
        for part, slot in zip(obj["parts"], slots):
            assert part["object_type"] == obj["object_type"] and part["part_type"] == slot.part_type
            assert part["variant_name"] == PART_VARIANTS[part["part_type"]][part["variant"]]
            x0, y0, x1, y1 = part["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            ox0, oy0, ox1, oy1 = obj["bbox"]
            assert ox0 <= x0 and oy0 <= y0 and x1 <= ox1 and y1 <= oy1
            # Paired slots (both eyes, wheels, windows) share one OR-choice.
            assert chosen.setdefault(part["part_type"], part["variant"]) == part["variant"]
            variants.add((part["part_type"], part["variant"]))
    assert object_types == {"face", "car", "house"}
    assert variants == {(t, v) for t, names in PART_VARIANTS.items() for v in range(len(names))}
    assert 2 <= min(len(v) for v in PART_VARIANTS.values()) and max(len(v) for v in PART_VARIANTS.values()) <= 4
    assert grammar_spec()["face"]["left_eye"] == {"part_type": "eye", "variants": ["dot", "ring", "slit"]}


def test_ground_truth_in_shards_matches_manifest(demo):
    truths = dict(iter_ground_truth(demo))
    with tarfile.open(Path(demo) / "shard-000001.tar") as archive:
        records = [json.loads(archive.extractfile(m).read()) for m in archive.getmembers() if m.name.endswith(".json")]
    assert len(records) == 100
    for record in records:
        assert record["ground_truth"] == truths[record["global_index"]]
    holdout = [i for i, _ in iter_ground_truth(demo, split="holdout")]
    assert len(holdout) == 24
    parts = ground_truth_parts(demo, split="train")
    assert len(parts) == 216 * 4 and {"global_index", "part_type", "variant", "bbox", "object_type"} <= set(parts[0])


@pytest.mark.parametrize("size", [32, 64])
def test_each_part_box_contains_exactly_that_parts_pixels(size):
    # Ablation: removing one part must change pixels only inside its ground-truth box (and change some).
    for index in range(24):
        image, truth = render_sample(index, size=size, seed=5)
        full = np.asarray(image).astype(int)
        for part in truth["objects"][0]["parts"]:
            ablated, _ = render_sample(index, size=size, seed=5, omit_slots=(part["slot"],))
            changed = np.abs(full - np.asarray(ablated).astype(int)).max(axis=2) > 8
            assert changed.any(), f"{part['slot']} of sample {index} is invisible"
            x0, y0, x1, y1 = part["bbox"]
            outside = changed.copy()
            outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False  # 1 px antialiasing margin
            assert not outside.any(), f"{part['slot']} of sample {index} draws outside its box {part['bbox']}"


def test_deterministic_and_seeded(tmp_path):
    def digest(url):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(url).iterdir())}

    make_demo_data(tmp_path / "a", n=30, size=16, shard_size=16)
    make_demo_data(tmp_path / "b", n=30, size=16, shard_size=16)
    make_demo_data(tmp_path / "c", n=30, size=16, shard_size=16, seed=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a")["manifest.parquet"] != digest(tmp_path / "c")["manifest.parquet"]
    # A sample does not depend on how many others are generated.
    make_demo_data(tmp_path / "d", n=10, size=16, shard_size=16)
    first = open_dataset(str(tmp_path / "a")).table.slice(0, 10)
    assert open_dataset(str(tmp_path / "d")).table["sha256"].to_pylist() == first["sha256"].to_pylist()


def test_ingested_data_has_no_ground_truth(tmp_path):
    from pipeline.data import ingest
    from PIL import Image

    (tmp_path / "src").mkdir()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "src" / "x.png")
    ingest(tmp_path / "src", tmp_path / "out", size=8, workers=1, progress=False)
    assert not open_dataset(str(tmp_path / "out")).has_ground_truth
    with pytest.raises(DataError, match="no ground truth"):
        next(iter_ground_truth(str(tmp_path / "out")))


def test_cli_make_demo_data(tmp_path, capsys):
    from pipeline.cli import data as data_cli

    parser = argparse.ArgumentParser(prog="sparsegen")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["make-demo-data", "--out", str(tmp_path / "demo"), "--n", "12", "--size", "16",
                              "--shard-size", "5", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 12 and summary["skipped"] == 0 and len(summary["shards"]) == 3
    assert summary["manifest"] == str(tmp_path / "demo" / "manifest.parquet")
    args = parser.parse_args(["make-demo-data", "--out", str(tmp_path / "demo"), "--n", "0"])
    assert args.func(args) == 2
