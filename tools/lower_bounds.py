"""Print pyproject.toml's runtime dependencies at their lower bounds, one `name==version` a line: the
constraints `make lock-oldest` resolves requirements-oldest.lock from (the oldest versions gnr
supports, which `make test` runs the unit tests on). A dependency without a `>=` bound is an error:
every range must say where it starts.

    python tools/lower_bounds.py [pyproject.toml]
"""

from __future__ import annotations

import re
import sys
import tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9._-]+)(\[[^\]]*\])?\s*(.*)$")


def lower_bounds(dependencies: list[str]) -> list[str]:
    pins = []
    for dep in dependencies:
        name, _, spec = REQUIREMENT.match(dep.split(";")[0]).groups()
        lower = re.search(r">=\s*([^,\s]+)", spec)
        if not lower:
            raise SystemExit(f"lower_bounds: {dep!r} has no lower bound (>=)")
        pins.append(f"{name}=={lower.group(1)}")
    return pins


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
    with open(path, "rb") as f:
        print("\n".join(lower_bounds(tomllib.load(f)["project"]["dependencies"])))
