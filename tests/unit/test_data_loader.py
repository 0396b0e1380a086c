"""Reading shards on the demo digits: batch shapes, fixed epoch length, sources, caller RNG untouched."""

import json
import random

import numpy as np
import pytest
import torch

from gnr.config import build_config
from gnr.data.loader import eval_loader, steps_per_epoch, train_loader
from gnr.data.manifest import file_url, read_manifest
from gnr.errors import GnrError


def demo_config(source, **fields):
    """The demo preset, with the sizes these tests count on pinned."""
    pinned = {"data.source": str(source), "data.workers": 0, "data.img_size": 32, "data.eval_resize": 32,
              "optim.batch_size": 64}
    return build_config("demo", fields={**pinned, **fields})


def test_every_rank_gets_the_same_number_of_full_batches(demo_shards):
    cfg = demo_config(demo_shards)
    assert steps_per_epoch(cfg, 1) == 1437 // 64 and steps_per_epoch(cfg, 2) == 1437 // 128
    for rank in (0, 1):
        batches = train_loader(cfg, epoch=0, rank=rank, world=2)
        seen = list(batches)
        assert len(seen) == len(batches) == 11
        for images, labels in seen:
            assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
            assert 0.0 <= images.min() and images.max() <= 1.0
            assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
        assert batches.skipped_samples == 0 and batches.skipped_shards == {}


def test_eval_batches_follow_manifest_order_with_keys(demo_shards):
    cfg = demo_config(demo_shards)
    batches = eval_loader(cfg, batch_size=100)
    seen = list(batches)
    assert len(seen) == len(batches) == 4  # 360 samples: 100, 100, 100, 60
    keys = [k for _, _, ks in seen for k in ks]
    assert len(keys) == 360 and keys == sorted(keys) and keys[0].startswith("digit-")
    images, labels, _ = seen[-1]
    assert images.shape == (60, 3, 32, 32) and labels.shape == (60,)


def test_iterating_in_the_main_process_leaves_the_callers_rngs_untouched(demo_shards):
    cfg = demo_config(demo_shards, **{"augment.hflip": 0.5, "augment.reprob": 0.5})
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(1)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    next(iter(train_loader(cfg, epoch=0, rank=0, world=1)))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_missing_or_malformed_manifest_is_a_one_line_error(tmp_path, demo_shards):
    with pytest.raises(GnrError, match="no train shards at .*train.json not found"):
        steps_per_epoch(demo_config(tmp_path / "nowhere"), 1)
    (tmp_path / "val.json").write_text(json.dumps({"split": "val"}))
    with pytest.raises(GnrError, match="not a gnr shard manifest"):
        read_manifest(str(tmp_path), "val")


def test_brace_pattern_selects_a_subset_of_shards(demo_shards):
    subset = read_manifest(f"{demo_shards}/train-{{000000..000001}}.tar", "train")
    assert [s.name for s in subset.shards] == ["train-000000.tar", "train-000001.tar"] and subset.total == 512
    assert steps_per_epoch(demo_config(f"{demo_shards}/train-{{000000..000001}}.tar"), 1) == 8
    with pytest.raises(GnrError, match="names none of the train shards"):
        read_manifest(f"{demo_shards}/train-{{000100..000101}}.tar", "train")


def test_pipe_source_reads_the_same_samples(demo_shards):
    direct = [k for _, _, keys in eval_loader(demo_config(demo_shards), limit=50) for k in keys]
    piped = [k for _, _, keys in eval_loader(demo_config(f"pipe:cat {demo_shards}"), limit=50) for k in keys]
    assert piped == direct and len(direct) == 50


def test_object_store_locations_are_urls_that_fsspec_opens():
    """s3:// (and gs://, az://) go to webdataset's gopen as they are; fsspec opens them (tests/integration/
    test_object_store.py reads shards from a real S3 server); a missing optional client is one clear line."""
    assert file_url("s3://bucket/in1k/", "train.json") == "s3://bucket/in1k/train.json"
    assert file_url("https://host/in1k/", "val.json") == "https://host/in1k/val.json"
    with pytest.raises(GnrError, match=r"reading gs:// needs gcsfs: pip install 'gnr\[gcs\]'"):
        read_manifest("gs://bucket/in1k", "train")