"""One CLI grammar and one progress display: rich on a terminal, plain lines elsewhere or with
NO_COLOR / TERM=dumb; `--json` opts in to JSON on every command; shell completion is on."""

import io
import os
import subprocess
import time

import pytest
import typer.main
from rich.console import Console

from gnr.cli.app import app
from gnr.cli.evaluate import pod_args
from gnr.cli.render import ProgressReport, percent
from gnr.errors import GnrError
from gnr.eval import EvalSpec
from tests.conftest import BIN


def terminal(monkeypatch, **env) -> tuple[Console, io.StringIO]:
    for name in ("NO_COLOR", "TERM", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=200), out


def test_a_terminal_gets_a_live_bar(monkeypatch):
    console, out = terminal(monkeypatch, TERM="xterm-256color")
    with ProgressReport("train", console, unit="step", interval=0) as report:
        assert report.bar is not None
        report.update(1, 10, "loss 2.0")
        report.note("epoch 1.00 held-out clean 50.00%")
        report.update(10, 10, "loss 1.0")
    text = out.getvalue()
    assert "\x1b[" in text and "10/10" in text and "loss 1.0" in text
    assert "train: epoch 1.00 held-out clean 50.00%" in text
    assert "train step 10/10 |" not in text  # no plain lines on a terminal


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_color_and_dumb_terminals_get_plain_lines(monkeypatch, env):
    console, out = terminal(monkeypatch, **env)
    with ProgressReport("train", console, unit="step", images_per_unit=64, interval=0) as report:
        assert report.bar is None
        report.update(1, 10, "loss 2.0")
        time.sleep(0.02)
        report.update(3, 10, "loss 1.0")
    lines = out.getvalue().splitlines()
    assert "\x1b[" not in out.getvalue()
    assert lines[0].startswith("train step 1/10 (10.0%) | loss 2.0 | ETA ? | elapsed ")
    assert lines[1].startswith("train step 3/10 (30.0%) | loss 1.0 | ") and " img/s | ETA 0:00:" in lines[1]


def test_plain_lines_come_at_the_interval_and_the_last_state_at_the_end(monkeypatch):
    console, out = terminal(monkeypatch, NO_COLOR="1")
    with ProgressReport("eval", console, unit="images", interval=3600) as report:
        for done in range(10, 101, 10):
            report.update(done, 100, "clean 50.00%")
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # one line: nothing due before the end
    assert out.getvalue().startswith("eval images 100/100 (100.0%) | clean 50.00% | ")

    monkeypatch.setenv("GNR_PROGRESS_INTERVAL", "soon")
    with pytest.raises(GnrError, match="GNR_PROGRESS_INTERVAL must be a number of seconds"):
        ProgressReport("eval", console)


def test_accuracy_is_a_percentage_with_two_decimals():
    assert percent(0.8125) == "81.25%" and percent(1.0) == "100.00%" and percent(0.0) == "0.00%"


def _commands(group, prefix: str = ""):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a sub-app: gnr bench, gnr jobs, ...
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_command_prints_a_table_unless_asked_for_json():
    commands = dict(_commands(typer.main.get_command(app)))
    with_json = {name for name, cmd in commands.items() for p in cmd.params if p.name == "as_json"}
    assert {"train", "eval", "report", "bench loader", "bench step", "jobs list", "analyze curve"} <= with_json
    for name in with_json:
        (param,) = [p for p in commands[name].params if p.name == "as_json"]
        assert param.opts == ["--json"] and not param.secondary_opts and param.default is False, name


def test_shell_completion_is_on():
    env = {**os.environ, "_GNR_COMPLETE": "complete_bash", "COMP_WORDS": "gnr be", "COMP_CWORD": "1"}
    proc = subprocess.run([str(BIN / "gnr")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.split() == ["bench"], proc.stdout + proc.stderr


def test_eval_without_eps_leaves_the_budget_to_the_runs_config():
    """`gnr eval --submit` without --eps: the pod resolves the run's eval.eps itself."""
    assert "--eps" not in pod_args(EvalSpec(eps=()))
    args = pod_args(EvalSpec(eps=(1.0, 4.0)))
    assert args[args.index("--eps") + 1] == "1,4"
