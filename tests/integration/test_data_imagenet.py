"""WebDataset shards of real ImageNet JPEGs: round trip, DDP-exact reading, resuming, corrupt shards."""

import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gnr.config import RunConfig
from gnr.data.loader import eval_loader, train_loader
from gnr.data.manifest import read_manifest
from gnr.data.shards import write_imagefolder
from gnr.data.transforms import DraftRandomResizedCrop, open_image, seeded
from gnr.errors import GnrError
from tests.conftest import _free_port, wait_for_http
from tests.unit.test_data_shards import tar_samples

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jpeg_tree(imagenet_sample, tmp_path_factory) -> Path:
    """40 real JPEGs as an ImageNet tree ROOT/<wnid>/<file>, symlinked (never copied into the repo)."""
    root = tmp_path_factory.mktemp("imagenet-tree")
    for path in sorted(imagenet_sample.iterdir())[:40]:
        (root / path.name.split("_")[0]).mkdir()
        (root / path.name.split("_")[0] / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def jpeg_shards(jpeg_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imagenet-shards")
    for split in ("train", "val"):
        write_imagefolder(jpeg_tree, out, split, shard_size=8)
    return out


def jpeg_config(source, **data) -> RunConfig:
    """The paper's augmentation recipe (RunConfig defaults) at a small resolution."""
    return RunConfig.model_validate({"data": {"source": str(source), "img_size": 32, "eval_resize": 36,
                                              "workers": 2, "shuffle_buffer": 16, **data},
                                     "optim": {"batch_size": 4}})


def shard_contents(shards: Path, split: str) -> dict[str, dict[str, bytes]]:
    manifest = read_manifest(str(shards), split)
    return {k: v for shard in manifest.shards for k, v in tar_samples(shards / shard.name).items()}


def test_shards_hold_the_original_jpeg_bytes_and_standard_class_indices(jpeg_tree, jpeg_shards, class_map):
    index = json.loads(class_map.read_text())
    files = {f"{p.parent.name}/{p.stem}": p for p in jpeg_tree.glob("*/*")}
    for split in ("train", "val"):
        manifest = read_manifest(str(jpeg_shards), split)
        samples = shard_contents(jpeg_shards, split)
        assert manifest.total == len(samples) == 40 and [s.count for s in manifest.shards] == [8] * 5
        assert manifest.classes[:2] == ("n01440764", "n01443537") and len(manifest.classes) == 1000
        assert samples.keys() == files.keys()
        for key, sample in samples.items():
            assert sample["jpg"] == files[key].read_bytes()
            assert int(sample["cls"]) == index[key.split("/")[0]]
    assert list(shard_contents(jpeg_shards, "val")) == sorted(files)
    assert list(shard_contents(jpeg_shards, "train")) != sorted(files)


def test_train_shards_are_shuffled_reproducibly_by_seed(jpeg_tree, jpeg_shards, tmp_path):
    same = write_imagefolder(jpeg_tree, tmp_path / "same", "train", shard_size=8)
    other = write_imagefolder(jpeg_tree, tmp_path / "other", "train", shard_size=8, seed=1)
    assert same.shards == read_manifest(str(jpeg_shards), "train").shards
    assert list(shard_contents(tmp_path / "other", "train")) != list(shard_contents(jpeg_shards, "train"))
    assert other.total == 40


@pytest.mark.parametrize("limit", [None, 13])
def test_two_ranks_with_two_workers_each_read_every_sample_exactly_once(jpeg_shards, limit):
    cfg = jpeg_config(jpeg_shards)
    expected = list(shard_contents(jpeg_shards, "val"))[:limit]
    seen = {}
    for rank in (0, 1):
        batches = eval_loader(cfg, rank=rank, world=2, limit=limit, batch_size=3)
        seen[rank] = [(key, label) for _, labels, keys in batches for key, label in zip(keys, labels.tolist())]
        assert len(batches) == sum(1 for _ in batches)
    keys = [key for rank in (0, 1) for key, _ in seen[rank]]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    wnids = read_manifest(str(jpeg_shards), "val").classes
    assert all(wnids[label] == key.split("/")[0] for rank in (0, 1) for key, label in seen[rank])


def test_eval_images_are_resized_and_centre_cropped_pixels(jpeg_shards):
    images, labels, keys = next(iter(eval_loader(jpeg_config(jpeg_shards, workers=0), limit=4)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05


def test_train_batches_are_deterministic_and_resuming_skips_exactly(jpeg_shards):
    cfg = jpeg_config(jpeg_shards)

    def epoch(**kw):
        return [(x, y) for x, y in train_loader(cfg, rank=0, world=1, **kw)]

    full = epoch(epoch=0)
    assert len(full) == 10
    again = epoch(epoch=0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    for skip in (1, 4):
        tail = epoch(epoch=0, skip_batches=skip)
        assert len(tail) == 10 - skip
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[skip:], tail))
    assert not torch.equal(full[0][0], epoch(epoch=1)[0][0])


def test_every_rank_yields_the_same_number_of_batches(jpeg_shards):
    cfg = jpeg_config(jpeg_shards)
    assert [len(list(train_loader(cfg, epoch=0, rank=r, world=3))) for r in range(3)] == [3, 3, 3]


def test_http_source_reads_the_same_samples(jpeg_shards):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=jpeg_shards, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for_http(f"{url}/val.json", server, timeout=20), "http.server did not start"
        keys = [k for _, _, ks in eval_loader(jpeg_config(url, workers=0)) for k in ks]
        assert keys == list(shard_contents(jpeg_shards, "val"))
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture()
def corrupt_shards(jpeg_shards, tmp_path, request) -> Path:
    """A copy of the val shards whose third shard is cut mid-image, or right after its first sample."""
    out = tmp_path / "corrupt"
    shutil.copytree(jpeg_shards, out)
    shard = out / "val-000002.tar"
    cut = shard.stat().st_size // 2 if request.param == "mid-image" else _end_of_first_sample(shard)
    with open(shard, "r+b") as f:
        f.truncate(cut)
    return out


def _end_of_first_sample(shard: Path) -> int:
    """Byte offset just past the first sample (.cls, .jpg): a cut there looks like a clean end of tar."""
    with tarfile.open(shard) as tar:
        return tar.getmembers()[2].offset


@pytest.mark.parametrize("corrupt_shards", ["mid-image", "at-a-sample-boundary"], indirect=True)
def test_training_skips_a_corrupt_shard_with_one_warning_and_counts_the_loss(corrupt_shards, caplog):
    cfg = jpeg_config(corrupt_shards, train_split="val")
    with caplog.at_level(logging.WARNING, logger="gnr.data.loader"):
        batches = train_loader(cfg, epoch=0, rank=0, world=1)
        assert len(list(batches)) == 10
    warnings = [r.getMessage() for r in caplog.records if "corrupt shard" in r.getMessage()]
    assert len(warnings) == 1 and "val-000002.tar" in warnings[0], warnings
    assert list(batches.skipped_shards) == [str(corrupt_shards / "val-000002.tar")]
    assert batches.skipped_samples > 0


@pytest.mark.parametrize("corrupt_shards", ["mid-image", "at-a-sample-boundary"], indirect=True)
def test_evaluation_stops_on_a_corrupt_shard_naming_it(corrupt_shards):
    with pytest.raises(GnrError, match=r"corrupt shard .*val-000002\.tar") as info:
        list(eval_loader(jpeg_config(corrupt_shards)))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_draft_crop_draws_timms_box_and_decodes_fewer_pixels(imagenet_sample):
    from timm.data.transforms import RandomResizedCropAndInterpolation

    path = max(imagenet_sample.iterdir(), key=lambda p: p.stat().st_size)  # 1836x1377
    draft = DraftRandomResizedCrop(64, scale=(0.5, 1.0), interpolation="bicubic")
    timm_crop = RandomResizedCropAndInterpolation(64, scale=(0.5, 1.0), interpolation="bicubic")
    for seed in range(5):
        lazy = open_image(path.read_bytes())
        full_width = lazy.width
        with seeded(seed):
            fast = np.asarray(draft(lazy), dtype=np.float32)
        with seeded(seed):
            exact = np.asarray(timm_crop(Image.open(path).convert("RGB")), dtype=np.float32)
        assert lazy.width <= full_width // 4  # libjpeg decoded at a reduced scale
        assert np.abs(fast - exact).mean() < 2.0, seed  # the same box: resampling noise only (0..255 scale)
