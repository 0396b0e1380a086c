"""The chart's values schema carries RunConfig's own schema: they cannot drift apart."""

import json

from gnr.config import RunConfig
from tools import chart_schema


def test_values_schema_is_generated_from_run_config():
    committed = chart_schema.SCHEMA.read_text()
    assert committed == chart_schema.render(json.loads(committed)), \
        "charts/gnr/values.schema.json is out of date: run python tools/chart_schema.py"


def test_drift_is_detected(tmp_path, monkeypatch):
    """A field added to RunConfig (or removed from the schema) makes the check fail."""
    schema = json.loads(chart_schema.SCHEMA.read_text())
    del schema["definitions"]["runConfig"]["$defs"]["OptimConfig"]["properties"]["batch_size"]
    stale = tmp_path / "values.schema.json"
    stale.write_text(json.dumps(schema, indent=2) + "\n")
    monkeypatch.setattr(chart_schema, "SCHEMA", stale)
    assert chart_schema.main(["--check"]) == 1
    assert chart_schema.main([]) == 0 and chart_schema.main(["--check"]) == 0
    optim = json.loads(stale.read_text())["definitions"]["runConfig"]["$defs"]["OptimConfig"]["properties"]
    assert set(optim) == set(RunConfig.model_fields["optim"].annotation.model_fields)
