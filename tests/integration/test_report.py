"""`gnr report` reads runs back from a real MLflow server."""

import csv
import io
import json

import pytest

from tests.conftest import assert_one_line_error, run_gnr

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def experiment(mlflow_server) -> dict:
    """Three finished runs (as `gnr train` + `gnr eval` log them) and one that failed."""
    from gnr.config import build_config
    from gnr.tracking import RunWriter, create_run

    ids = {}
    for method, act, metrics in (
        ("natural", "gelu", {"eval/clean": 0.95, "eval/autoattack/eps4": 0.0, "eval/pgd10/eps4": 0.01}),
        ("gradnorm", "gelu", {"eval/clean": 0.9, "eval/autoattack/eps4": 0.4, "eval/pgd10/eps4": 0.45}),
        ("adversarial", "gelu", {"eval/clean": 0.88, "eval/autoattack/eps4": 0.5, "eval/pgd10/eps4": 0.52}),
        ("gradnorm", "relu", {}),
    ):
        cfg = build_config("demo", fields={"objective.method": method, "model.act": act,
                                           "tracking.uri": mlflow_server, "tracking.experiment": "report-test"})
        run_id = create_run(cfg, status="RUNNING")
        writer = RunWriter(run_id, mlflow_server)
        writer.log_metrics({**metrics, "perf/sec_per_step": {"natural": 0.1, "gradnorm": 0.2}.get(method, 0.4)}, step=0)
        writer.finish("FAILED" if act == "relu" else "FINISHED")
        ids[(method, act)] = run_id
    return {"uri": mlflow_server, "ids": ids}


def test_report_csv_and_markdown(experiment):
    proc = run_gnr("report", "--experiment", "report-test", "--format", "csv", "--tracking-uri", experiment["uri"],
                   check=True)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [(r["method"], r["act"]) for r in rows] == [("natural", "gelu"), ("gradnorm", "gelu"), ("adversarial", "gelu")]
    assert [r["AA 4/255"] for r in rows] == ["0.00", "40.00", "50.00"]
    assert [r["× adversarial"] for r in rows] == ["0.250", "0.500", "1.000"]
    as_json = run_gnr("report", "--experiment", "report-test", "--json", "--tracking-uri", experiment["uri"], check=True)
    assert json.loads(as_json.stdout)["rows"] == rows
    first, *rest = experiment["ids"].values()
    md = run_gnr("report", "--format", "markdown", "--tracking-uri", experiment["uri"], "--run-id", first, *rest,
                 check=True).stdout  # `--run-id A B C`, as the analyze commands take it
    assert md.splitlines()[0].startswith("| run | method | model | act |")
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 5  # header + 4 named runs


def test_report_of_an_unknown_experiment_is_one_line(experiment):
    proc = run_gnr("report", "--experiment", "no-such-experiment", "--tracking-uri", experiment["uri"])
    assert_one_line_error(proc, "no-such-experiment")
