"""The pip requirements of the MLflow Model a run logs: gnr's runtime dependencies at the exact
versions this process runs with.

An installed gnr declares its dependencies in its distribution's metadata. A source checkout on
PYTHONPATH (a GPU machine without network, `scripts/gpu-cost.sh`) has no distribution: the
dependencies are then read from the checkout's pyproject.toml, with a warning. Each is pinned to the
version installed here; one without installed metadata (a package copied in as code, as the GPU kit
does with pyautoattack, or one this machine lacks) takes its pin from the checkout's
requirements.lock. Nothing here fails a run: what cannot be read is left out with a warning, and
torch, which the pt2 model needs to load, is always there.
"""

from __future__ import annotations

import logging
import re
import tomllib
from importlib import metadata
from pathlib import Path

import gnr

log = logging.getLogger(__name__)

CHECKOUT = Path(gnr.__file__).resolve().parents[1]
NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503's normal form: `PyYAML`, `pyyaml` and `py_yaml` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    """The installed version without its local label (`2.11.0+cu130` → `2.11.0`: an index has no
    local builds), or None when no distribution of that name is installed."""
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def declared_dependencies(checkout: Path = CHECKOUT) -> list[str]:
    """gnr's runtime requirements (no extras): its distribution's, else the checkout's pyproject.toml."""
    try:
        return [r for r in metadata.requires("gnr") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        pyproject = checkout / "pyproject.toml"
        log.warning("gnr is not an installed distribution: the MLflow Model's requirements are the "
                    "installed versions of the dependencies in %s", pyproject)
        with open(pyproject, "rb") as f:
            return tomllib.load(f)["project"]["dependencies"]


def locked_versions(lock: Path) -> dict[str, str]:
    """`name==version` lines of a lock file, by canonical name ({} when there is no lock)."""
    try:
        lines = lock.read_text().splitlines()
    except (OSError, UnicodeError):
        return {}
    pins = (line.split("#")[0].split(";")[0].strip().split("==") for line in lines)
    return {canonical(p[0]): p[1].strip() for p in pins if len(p) == 2}


def model_requirements(checkout: Path = CHECKOUT) -> list[str]:
    """`name==version` for each of gnr's runtime dependencies, as installed here (see the module)."""
    try:
        names = [NAME.match(r).group(1) for r in declared_dependencies(checkout)]
    except Exception as e:  # noqa: BLE001 -- the model is logged all the same, with torch alone
        log.warning("could not read gnr's dependencies (%s); the MLflow Model requires torch only", e)
        names = ["torch"]
    locked, pins, unpinned = locked_versions(checkout / "requirements.lock"), [], []
    for name in names:
        version = installed_version(name) or locked.get(canonical(name))
        if version is None:
            unpinned.append(name)
        else:
            pins.append(f"{name}=={version}")
    if unpinned:
        log.warning("the MLflow Model's requirements leave out %s: neither installed as a distribution nor "
                    "in %s", ", ".join(unpinned), checkout / "requirements.lock")
    return pins
