"""gnr installs into the environments its users already have: a plain `pip install .` keeps whatever
torch is there within gnr's range. Run in .venv (torch 2.14) and by `make test-oldest` in the venv
with torch 2.11.0 and every other dependency at its lower bound."""

import json
import subprocess
import sys

from tests.conftest import copy_sources


def test_plain_pip_install_keeps_the_installed_torch_and_dependencies(tmp_path):
    import torch

    report = tmp_path / "report.json"  # beside the copied sources
    src = copy_sources(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
                           "--report", str(report), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    installs = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert installs == ["gnr"], f"pip install . would replace torch {torch.__version__} or others: {installs}"
