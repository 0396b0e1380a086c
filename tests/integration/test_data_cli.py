"""`gnr data` and `gnr bench loader` as a user runs them, and the demo shards built by racing processes."""

import json
import os
import subprocess
import sys

import pytest

from gnr.data.manifest import read_manifest
from tests.conftest import ROBUSTBENCH, assert_one_line_error, run_gnr
from tests.unit.test_data_shards import tar_samples

pytestmark = pytest.mark.integration


def imagefolder(root, out, split="val"):
    return run_gnr("data", "imagefolder", root, "--out", out, "--split", split)


def test_missing_root_is_a_one_line_error(tmp_path):
    assert_one_line_error(imagefolder(tmp_path / "nope", tmp_path / "out"), "image folder not found")


def test_root_without_jpegs_is_a_one_line_error(tmp_path):
    (tmp_path / "root" / "n01440764").mkdir(parents=True)
    (tmp_path / "root" / "n01440764" / "notes.txt").write_text("not an image")
    assert_one_line_error(imagefolder(tmp_path / "root", tmp_path / "out"), "no JPEG files")
    assert not (tmp_path / "out").exists()


def test_bad_split_is_a_one_line_error(tmp_path):
    assert_one_line_error(imagefolder(tmp_path, tmp_path / "out", split="test"), "--split must be one of train | val")


def test_robustbench_ids_keep_only_the_listed_files_with_their_classes(imagenet_sample, class_map, tmp_path):
    """Real JPEGs filed under real entries of the RobustBench list, among files it does not list."""
    listed = (ROBUSTBENCH / "imagenet_test_image_ids.txt").read_text().split()[:3]
    sample_of = {p.name.split("_")[0]: p for p in imagenet_sample.iterdir()}
    root = tmp_path / "val"
    for entry in listed:
        wnid, name = entry.split("/")
        (root / wnid).mkdir(parents=True, exist_ok=True)
        (root / wnid / name).symlink_to(sample_of[wnid])
        (root / wnid / "ILSVRC2012_val_99999999.JPEG").symlink_to(sample_of[wnid])  # not listed
    (root / "n01440764").mkdir(exist_ok=True)
    (root / "n01440764" / "n01440764_tench.JPEG").symlink_to(sample_of["n01440764"])  # not listed

    out = tmp_path / "shards"
    proc = run_gnr("data", "imagefolder", root, "--out", out, "--split", "val", "--ids", "robustbench", check=True)
    assert "wrote val: 3 samples" in proc.stdout
    manifest = read_manifest(str(out), "val")
    assert manifest.ids == {"source": "robustbench", "listed": 5000, "found": 3}
    samples = tar_samples(out / "val-000000.tar")
    assert list(samples) == sorted(entry.rsplit(".", 1)[0] for entry in listed)
    index = json.loads(class_map.read_text())
    for key, sample in samples.items():
        wnid = key.split("/")[0]
        assert int(sample["cls"]) == index[wnid] and sample["jpg"] == sample_of[wnid].read_bytes()

    again = run_gnr("data", "imagefolder", root, "--out", out, "--split", "val", "--ids", "robustbench")
    assert_one_line_error(again, "already holds the val split")


def test_demo_command_writes_both_splits(tmp_path):
    proc = run_gnr("data", "demo", "--out", tmp_path, check=True)
    assert "wrote train: 1437 samples" in proc.stdout and "wrote val: 360 samples" in proc.stdout
    assert (tmp_path / "train.json").is_file() and (tmp_path / "val.json").is_file()


def test_ensure_demo_is_safe_when_processes_race(tmp_path):
    env = {"GNR_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    code = "from gnr.data.shards import ensure_demo; print(ensure_demo())"
    racers = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], outputs
    demo = tmp_path / "home" / "data" / "demo"
    assert {out.strip() for out, _ in outputs} == {str(demo)}
    assert [p.name for p in demo.parent.iterdir()] == ["demo"]  # the loser's staging directory is gone
    assert read_manifest(str(demo), "train").total == 1437


def test_bench_loader_reports_both_pipelines_on_a_flat_folder(imagenet_sample, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(imagenet_sample.iterdir())[:12]:
        (flat / path.name).symlink_to(path)
    proc = run_gnr("bench", "loader", "--data", flat, "--batch-size", "4", "--batches", "1", "--img-size", "32",
                   "--workers", "1", "--json", check=True)
    result = json.loads(proc.stdout)
    assert result["images"] == 12
    for pipeline in ("gnr_webdataset", "torchvision_imagefolder"):
        assert result[pipeline]["images_per_s"] > 0 and result[pipeline]["images_per_cpu_s"] > 0
    assert result["ratio_gnr_to_imagefolder"]["images_per_s"] > 0
