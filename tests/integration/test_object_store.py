"""Shards in an object store, read through fsspec (s3fs) inside the webdataset pipeline.

The store is a real S3-compatible HTTP server on loopback: moto's standalone server (`moto_server`,
from the dev extras), reached the way a cluster reaches MinIO: `AWS_ENDPOINT_URL` and the usual
`AWS_*` credentials from the environment. GCS and Azure have no server that installs here; for them
the tests stop at choosing the client (tests/unit/test_data_loader.py)."""

import json
import os
import subprocess

import pytest

from gnr.data.loader import eval_loader
from gnr.data.manifest import read_manifest
from gnr.errors import GnrError
from tests.conftest import BIN, _free_port, wait_for_http
from tests.unit.test_data_loader import demo_config

pytestmark = pytest.mark.integration

BUCKET = "gnr-data"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, demo_shards):
    """(environment for a client of the server, s3:// location of the demo shards uploaded there)."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "gnr-test", "AWS_SECRET_ACCESS_KEY": "gnr-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        assert wait_for_http(f"{endpoint}/moto-api/", proc, timeout=120), "moto_server did not start"
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=env["AWS_ACCESS_KEY_ID"],
                               secret=env["AWS_SECRET_ACCESS_KEY"])
        fs.mkdir(BUCKET)
        for f in demo_shards.iterdir():
            fs.put_file(str(f), f"{BUCKET}/demo/{f.name}")
        yield env, f"s3://{BUCKET}/demo"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture()
def s3_env(s3, monkeypatch):
    env, location = s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return location


def test_s3_shards_read_the_same_samples_as_the_local_copy(s3_env, demo_shards):
    local = [(k, y.tolist()) for _, y, keys in eval_loader(demo_config(demo_shards), limit=80) for k in keys]
    remote = [(k, y.tolist()) for _, y, keys in eval_loader(demo_config(s3_env), limit=80) for k in keys]
    assert remote == local and len(local) == 80


def test_missing_s3_data_is_a_clear_error(s3_env):
    with pytest.raises(GnrError, match=f"no train shards at s3://{BUCKET}/nowhere: train.json not found"):
        read_manifest(f"s3://{BUCKET}/nowhere", "train")


def test_train_reads_s3_shards(s3, tmp_path):
    """`gnr train --data s3://...`: training batches (in a loader worker process) and the held-out
    evaluation read the bucket."""
    env, location = s3
    env = {**os.environ, **env, "GNR_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    train = subprocess.run([str(BIN / "gnr"), "train", "natural", "--data", location, "--max-steps", "2",
                            "--set", "data.workers=1", "--set", "eval.holdout=40", "--json"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr
    summary = json.loads(train.stdout)
    assert summary["status"] == "FINISHED" and summary["metrics"]["holdout/n"] == 40, summary
