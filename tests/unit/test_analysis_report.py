"""Table 2 + 3 from run records: columns, ordering, relative cost, formats."""

import csv
import io

from gnr.analysis.report import build_report, to_csv, to_markdown
from gnr.tracking import RunRecord


def _run(run_id, method, act="gelu", status="FINISHED", start=0, **metrics):
    return RunRecord(run_id=run_id, name=f"{method}-{act}", status=status, start_time=start,
                     tags={"method": method, "activation": act, "model": "test_resnet", "eval.sanity": "passed"},
                     params={}, metrics=metrics)


RUNS = [
    _run("a" * 32, "adversarial", start=3, **{"eval/clean": 0.8, "eval/autoattack/eps4": 0.5, "eval/pgd10/eps4": 0.55,
                                               "eval/pgd10/eps64": 0.0, "eval/n": 300, "perf/sec_per_step": 0.4}),
    _run("b" * 32, "natural", start=1, **{"eval/clean": 0.9, "eval/autoattack/eps4": 0.0, "eval/autoattack/eps1": 0.1,
                                           "eval/n": 300, "perf/sec_per_step": 0.1}),
    _run("c" * 32, "gradnorm", "relu", start=2, **{"perf/sec_per_step": 0.25}),
    _run("d" * 32, "gradnorm", status="FAILED"),
]


def test_rows_are_ordered_by_method_with_cost_relative_to_adversarial():
    table = build_report(RUNS)
    assert table.columns == ["run", "method", "model", "act", "n", "clean", "AA 1/255", "AA 4/255", "PGD10 4/255",
                             "s/step", "× adversarial", "sanity"]
    rows = table.records()
    assert [r["method"] for r in rows] == ["natural", "gradnorm", "adversarial"]
    natural, gradnorm, adversarial = rows
    assert (natural["clean"], natural["AA 1/255"], natural["AA 4/255"], natural["PGD10 4/255"]) == ("90.00", "10.00", "0.00", "–")
    assert natural["× adversarial"] == "0.250" and adversarial["× adversarial"] == "1.000"
    assert gradnorm["clean"] == "–" and gradnorm["× adversarial"] == "0.625" and gradnorm["act"] == "relu"
    assert any("1 unfinished" in n for n in table.notes)


def test_markdown_and_csv():
    table = build_report(RUNS[:2])
    md = to_markdown(table).splitlines()
    assert md[0].startswith("| run | method |") and md[1].startswith("|---|")
    assert len(md) == 4
    parsed = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert parsed[1]["clean"] == "80.00" and parsed[0]["s/step"] == "0.1"


def test_without_an_adversarial_run_there_is_no_relative_cost():
    (row,) = build_report(RUNS[1:2]).records()
    assert row["× adversarial"] == "–"
