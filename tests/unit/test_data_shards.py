"""Writing shards: the bundled digits demo, the manifest, refusing and atomic writes."""

import hashlib
import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gnr.data.manifest import read_manifest
from gnr.data.shards import ensure_demo, write_split
from gnr.errors import GnrError


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} read with the standard library, independently of gnr's reader."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def png_samples(n: int) -> list[tuple[str, int, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append((f"img-{i:03d}", i % 3, buffer.getvalue()))
    return out


def test_demo_holds_every_digit_once_split_80_20_stratified(demo_shards):
    manifests = {split: read_manifest(str(demo_shards), split) for split in ("train", "val")}
    samples = {split: {k: v for shard in m.shards for k, v in tar_samples(demo_shards / shard.name).items()}
               for split, m in manifests.items()}
    assert manifests["train"].total == len(samples["train"]) == 1437
    assert manifests["val"].total == len(samples["val"]) == 360
    assert not samples["train"].keys() & samples["val"].keys()
    assert list(samples["val"]) == sorted(samples["val"])  # val keeps sorted order
    assert list(samples["train"]) != sorted(samples["train"])  # train is shuffled
    counts = {split: Counter(int(s["cls"]) for s in samples[split].values()) for split in samples}
    for digit in range(10):
        assert counts["val"][digit] / (counts["val"][digit] + counts["train"][digit]) == pytest.approx(0.2, abs=0.01)
    image = Image.open(io.BytesIO(next(iter(samples["val"].values()))["png"]))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    for m in manifests.values():
        assert m.classes == tuple(str(d) for d in range(10)) and m.image == "png"
        for shard in m.shards:
            assert hashlib.sha256((demo_shards / shard.name).read_bytes()).hexdigest() == shard.sha256


def test_ensure_demo_builds_once_under_gnr_home_with_reproducible_bytes(gnr_home, demo_shards):
    path = ensure_demo()
    assert path == gnr_home / "data" / "demo"
    stamp = (path / "train.json").stat().st_mtime_ns
    assert ensure_demo() == path and (path / "train.json").stat().st_mtime_ns == stamp
    for split in ("train", "val"):
        assert read_manifest(str(path), split).shards == read_manifest(str(demo_shards), split).shards
    assert not [p for p in path.parent.iterdir() if p.name != "demo"]  # no staging directory left


def test_existing_split_is_refused_and_overwrite_leaves_no_stale_shards(tmp_path):
    samples = png_samples(5)
    write_split(samples, tmp_path, "val", total=5, classes=["a", "b", "c"], image="png", shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-000000.tar", "val-000001.tar", "val-000002.tar",
                                                          "val.json"]
    with pytest.raises(GnrError, match="already holds the val split.*--overwrite"):
        write_split(samples, tmp_path, "val", total=5, classes=["a", "b", "c"], image="png")
    manifest = write_split(samples[:3], tmp_path, "val", total=3, classes=["a", "b", "c"], image="png",
                           shard_size=2, overwrite=True)
    assert [s.count for s in manifest.shards] == [2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-000000.tar", "val-000001.tar", "val.json"]
    assert list(tar_samples(tmp_path / "val-000001.tar")) == ["img-002"]


def test_write_failing_mid_shard_leaves_only_complete_shards_and_no_manifest(tmp_path):
    samples = png_samples(4)
    samples[3] = ("img-003", 0, None)  # not bytes: the tar writer fails after the shard's first sample
    with pytest.raises(ValueError):
        write_split(samples, tmp_path, "train", total=4, classes=["a", "b", "c"], image="png", shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # no half shard, no temp file
    assert len(tar_samples(tmp_path / "train-000000.tar")) == 2
    with pytest.raises(GnrError, match="train.json not found"):
        read_manifest(str(tmp_path), "train")


def test_shard_size_must_be_positive(tmp_path):
    with pytest.raises(GnrError, match="--shard-size"):
        write_split(png_samples(1), tmp_path, "val", total=1, classes=["a"], image="png", shard_size=0)
