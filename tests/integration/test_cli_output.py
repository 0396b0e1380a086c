"""The CLI as it behaves in a log file, a pod or CI: output redirected, no terminal.

`gnr train` and `gnr eval` print plain progress lines at a steady interval (no live bar, no colour
codes), the summary comes last, accuracy is a percentage everywhere, and `gnr eval` takes its
default ε from the run's config."""

import json
import os
import re
import subprocess

import pytest

from tests.conftest import BIN

pytestmark = pytest.mark.integration

STEPS = 30
TRAIN_LINE = re.compile(rf"^train step (\d+)/{STEPS} \(\d+\.\d%\) \| epoch \d+\.\d\d loss \d+\.\d{{4}} \| "
                        r"\d+\.\d img/s \| ETA \d+:\d\d:\d\d \| elapsed \d+:\d\d:\d\d$")
PERCENT = re.compile(r"\b\d{1,3}\.\d\d%")


def piped(*args, env: dict) -> subprocess.CompletedProcess:
    """`gnr ARGS > log 2>&1`: stdout and stderr into one pipe, as in a pod's log."""
    proc = subprocess.run([str(BIN / "gnr"), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout
    return proc


@pytest.fixture(scope="module")
def piped_env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("gnr-home")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NO_COLOR", "FORCE_COLOR")}
    return {**env, "GNR_HOME": str(home), "GNR_PROGRESS_INTERVAL": "0.3", "TERM": "xterm-256color"}


@pytest.fixture(scope="module")
def trained(piped_env) -> tuple[str, str]:
    """(log, run id) of `gnr train gradnorm --max-steps 30` with its output piped."""
    log = piped("train", "gradnorm", "--max-steps", STEPS, env=piped_env).stdout
    run_id = re.search(r"run id\s*│\s*([0-9a-f]{32})", log)
    assert run_id, log
    return log, run_id.group(1)


def test_train_prints_plain_progress_lines_before_the_summary(trained):
    log, _ = trained
    assert "\x1b[" not in log, "colour or cursor codes in a log file"
    lines = log.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.strip().startswith("gnr train gradnorm"))
    steps = [int(m.group(1)) for line in lines[:summary] if (m := TRAIN_LINE.match(line))]
    assert len(steps) >= 3, log
    assert steps == sorted(steps) and steps[-1] == STEPS, steps  # the last step is printed too
    assert re.search(r"^train: epoch \d+\.\d\d held-out clean \d+\.\d\d% pgd \d+\.\d\d%$", log, re.M), log
    held_out = [line for line in lines[summary:] if "held-out clean_acc" in line]
    assert held_out and PERCENT.search(held_out[0]), log


def test_eval_default_eps_is_the_runs_and_progress_is_plain(trained, piped_env):
    """The demo trains and scores at 8/255: without --eps, gnr eval attacks at 8/255 too."""
    _, run_id = trained
    env = {**piped_env, "GNR_PROGRESS_INTERVAL": "0"}
    log = piped("eval", "--run-id", run_id, "--attacks", "clean,pgd1", "--n", 8, "--batch-size", 4, env=env).stdout
    assert "\x1b[" not in log
    lines = log.splitlines()
    progress = [line for line in lines if line.startswith("eval images ")]
    assert [line.split()[2] for line in progress] == ["4/8", "8/8"], log
    assert all(re.search(r"clean \d+\.\d\d%  pgd1/eps8 \d+\.\d\d%.*\| ETA ", line) for line in progress), log
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in lines
            if line.count("│") == 3 and PERCENT.search(line)}
    assert set(rows) == {"clean", "pgd1/eps8", "pgd10/eps64"}, log

    as_json = subprocess.run([str(BIN / "gnr"), "eval", "--run-id", run_id, "--attacks", "pgd1", "--n", "8",
                              "--batch-size", "4", "--eps", "2", "--json"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert as_json.returncode == 0 and as_json.stderr == "", as_json.stderr  # --json: no progress at all
    assert set(json.loads(as_json.stdout)["accuracy"]) == {"pgd1/eps2", "pgd10/eps64"}
