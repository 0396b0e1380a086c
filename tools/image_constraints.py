"""Print pip constraints for installing gnr into an environment that already has its own torch (the
Dockerfile's base image, a cluster's image): requirements.lock, except for torch and what comes with
it. torch, torchvision, triton and the nvidia-* / cuda-* CUDA libraries keep the versions installed;
torch's own requirements (sympy, setuptools, ...) are left to pip, which keeps what is there when it
fits.

With these, pip installs gnr's other dependencies at the locked versions and leaves the base's torch
and CUDA stack alone; it picks the torchvision that matches that torch when the base has none. A
base whose torch is outside gnr's range (pyproject.toml) is a resolution error, not a second torch.
Without an installed torch, the whole lock applies.

    python tools/image_constraints.py requirements.lock > constraints.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton|nvidia-.*|cuda-.*)$")
NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(requirement: str) -> str:
    """The project name of a requirement or lock line, in PEP 503's normal form."""
    return re.sub(r"[-_.]+", "-", NAME.match(requirement).group(1)).lower()


def constraints(lock_lines: list[str]) -> list[str]:
    locked = [line.strip() for line in lock_lines if line.strip() and not line.startswith("#")]
    try:
        torch_requires = {canonical(r) for r in metadata.requires("torch") or []}
    except metadata.PackageNotFoundError:
        return locked
    held = sorted({f"{canonical(d.metadata['Name'])}=={d.version}" for d in metadata.distributions()
                   if TORCH_STACK.match(canonical(d.metadata["Name"]))})
    return held + [line for line in locked
                   if not TORCH_STACK.match(canonical(line)) and canonical(line) not in torch_requires]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("\n".join(constraints(f.read().splitlines())))
