"""Generate the `train.config` part of charts/gnr/values.schema.json from gnr's RunConfig, so that
`helm lint --strict` (and every `helm template`/`install`) rejects what `gnr train` rejects: unknown
keys, wrong types, out-of-range values. The rest of the file is written by hand.

    python tools/chart_schema.py          # rewrite the file after changing gnr/config.py
    python tools/chart_schema.py --check  # exit 1 when it is out of date (tests/unit/test_chart_schema.py)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gnr.config import RunConfig

SCHEMA = Path(__file__).resolve().parents[1] / "charts" / "gnr" / "values.schema.json"
KEY = "runConfig"  # definitions.runConfig: the generated part; train.config refers to it


def run_config_schema() -> dict[str, Any]:
    """RunConfig's JSON schema, with its sections under its own `$defs`, in draft-07 terms."""
    schema = RunConfig.model_json_schema(ref_template=f"#/definitions/{KEY}/$defs/{{model}}")
    return _draft07(schema)


def _draft07(node: Any) -> Any:
    """pydantic writes 2020-12 `prefixItems` for tuples; draft-07 spells that `items: [...]`."""
    if isinstance(node, dict):
        node = {k: _draft07(v) for k, v in node.items()}
        if "prefixItems" in node:
            node["items"] = node.pop("prefixItems")
        return node
    if isinstance(node, list):
        return [_draft07(v) for v in node]
    return node


def updated(values_schema: dict[str, Any]) -> dict[str, Any]:
    """The chart's values schema with the generated part replaced."""
    out = json.loads(json.dumps(values_schema))
    out["definitions"][KEY] = run_config_schema()
    config = out["properties"]["train"]["properties"]["config"]
    config.clear()
    config.update({"description": "The run's resolved RunConfig (from gnr/config.py, by tools/chart_schema.py).",
                   "$ref": f"#/definitions/{KEY}"})
    return out


def render(values_schema: dict[str, Any]) -> str:
    return json.dumps(updated(values_schema), indent=2) + "\n"


def main(argv: list[str]) -> int:
    current = SCHEMA.read_text()
    wanted = render(json.loads(current))
    if "--check" in argv:
        if current != wanted:
            print(f"{SCHEMA} is out of date: run python tools/chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(wanted)
    print(f"wrote {SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
