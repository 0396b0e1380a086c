"""`gnr eval` end to end on a demo-preset run logged to a real MLflow server: logging into the same
run, AutoAttack against a direct pyautoattack call, 2-process torchrun, resume, bad input."""

import csv
import io
import json
import os
import re
import subprocess
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, assert_one_line_error, run_gnr
from tests.helm import helm  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

N = 8


@pytest.fixture(scope="module")
def evaluated(demo_run, tmp_path_factory) -> dict:
    """One `gnr eval` through the CLI, all images in one batch (so a direct AutoAttack call sees the same batch).

    The raw weights: after the fixture's 12 steps they classify most digits, while the EMA weights
    (decay 0.99) are still close to the initialisation.
    """
    home = tmp_path_factory.mktemp("eval-home")
    proc = run_gnr("eval", "--run-id", demo_run["run_id"], "--tracking-uri", demo_run["uri"], "--n", N,
                   "--batch-size", N, "--attacks", "clean,pgd10,autoattack", "--eps", "4", "--weights", "raw", "--json",
                   env={"GNR_HOME": str(home)}, check=True)
    return {**demo_run, "eval": json.loads(proc.stdout), "home": home}


def _per_image(client: MlflowClient, run_id: str) -> list[dict]:
    path = client.download_artifacts(run_id, "eval-raw/per_image.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_eval_logs_into_the_same_run(evaluated):
    client = MlflowClient(tracking_uri=evaluated["uri"])
    run = client.get_run(evaluated["run_id"])
    metrics = run.data.metrics
    summary = evaluated["eval"]
    assert summary["run_id"] == evaluated["run_id"] and summary["n"] == N
    for name in ("clean", "pgd10/eps4", "autoattack/eps4", "pgd10/eps64"):
        assert metrics[f"eval-raw/{name}"] == pytest.approx(summary["accuracy"][name]), name
    assert metrics["eval-raw/n"] == N
    assert metrics["eval-raw/autoattack/eps4"] <= metrics["eval-raw/clean"]
    assert run.data.tags["eval-raw.sanity"] == ("failed" if summary["warnings"] else "passed")
    rows = _per_image(client, evaluated["run_id"])
    assert list(rows[0]) == ["id", "label", "clean", "pgd10/eps4", "autoattack/eps4", "pgd10/eps64"]
    assert len({r["id"] for r in rows}) == N
    assert sum(int(r["autoattack/eps4"]) for r in rows) / N == pytest.approx(metrics["eval-raw/autoattack/eps4"])
    summary_json = json.loads(open(client.download_artifacts(evaluated["run_id"], "eval-raw/summary.json")).read())
    assert summary_json["accuracy"] == summary["accuracy"]


def test_summary_profiles_each_autoattack_attack(evaluated):
    """Per attack: the images it attacked are those the previous one left robust (APGD-CE: the correctly
    classified ones), and the last robust count is AutoAttack's accuracy."""
    rows = [r for r in evaluated["eval"]["attacks"] if r["measure"] == "autoattack/eps4"]
    assert [r["attack"] for r in rows] == ["apgd-ce", "apgd-t", "fab-t", "square"][:len(rows)]
    assert rows[0]["images"] == round(evaluated["eval"]["accuracy"]["clean"] * N)
    assert all(r["precision"] == "fp32" for r in rows)
    assert [r["images"] for r in rows[1:]] == [r["robust"] for r in rows[:-1]]
    assert rows[-1]["robust"] / N == pytest.approx(evaluated["eval"]["accuracy"]["autoattack/eps4"])
    from gnr.eval import upper_bound_passes

    bound = upper_bound_passes(10)
    for r in rows[1:]:  # every image these attacked was correct; one that no attack breaks costs the bound
        if r["robust"] == r["images"]:
            assert (r["forward"], r["backward"]) == tuple(r["images"] * p for p in bound[r["attack"]]), r
        assert r["forward"] > 0 and r["seconds"] > 0
    assert evaluated["eval"]["rechecks"] == {}


def test_autoattack_equals_a_direct_pyautoattack_call(evaluated, tmp_path, monkeypatch):
    """Same weights (downloaded independently), same images, same seed: same per-image verdicts."""
    from pyautoattack import AutoAttack
    from safetensors.torch import load_file

    from gnr.data.loader import eval_loader, resolve_source
    from gnr.models import build_model
    from gnr.tracking import load_run_config

    monkeypatch.setenv("GNR_HOME", str(evaluated["home"]))
    client = MlflowClient(tracking_uri=evaluated["uri"])
    cfg = load_run_config(evaluated["run_id"], evaluated["uri"])
    model, _ = build_model(cfg.model, cfg.data.num_classes, cfg.data.img_size)
    model.load_state_dict(load_file(client.download_artifacts(evaluated["run_id"], "weights/raw.safetensors", str(tmp_path))))
    model.eval()
    cfg.data.source = resolve_source(cfg.data.source)
    x, y, keys = next(iter(eval_loader(cfg, limit=N, batch_size=N)))
    aa = AutoAttack(model, norm="Linf", eps=4 / 255, version="standard", seed=0, device="cpu")
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=N)
    direct = dict(zip(keys, (y_adv == y).tolist()))
    rows = _per_image(client, evaluated["run_id"])
    assert {r["id"]: bool(int(r["autoattack/eps4"])) for r in rows} == direct
    with torch.no_grad():
        assert {r["id"]: bool(int(r["clean"])) for r in rows} == dict(zip(keys, (model(x).argmax(1) == y).tolist()))
    assert evaluated["eval"]["accuracy"]["autoattack/eps4"] == pytest.approx(sum(direct.values()) / N)


def test_torchrun_two_processes_count_each_image_once(demo_run, tmp_path):
    n = 11  # odd, and not a multiple of the batch size: uneven shares
    env = {"GNR_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(BIN / "gnr"), "eval",
                           "--run-id", demo_run["run_id"], "--tracking-uri", demo_run["uri"], "--limit", str(n),
                           "--batch-size", "3", "--attacks", "clean,pgd10", "--eps", "4", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one JSON document: only rank 0 prints
    assert summary["n"] == n and summary["settings"]["world"] == 2
    assert summary["batches"] == 4  # 6 + 5 images in batches of 3 per rank
    client = MlflowClient(tracking_uri=demo_run["uri"])
    run = client.get_run(demo_run["run_id"])
    assert run.data.metrics["eval/n"] == n
    rows = list(csv.DictReader(open(client.download_artifacts(demo_run["run_id"], "eval/per_image.csv", str(tmp_path)))))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n
    expected = _first_val_keys(demo_run, tmp_path, n)
    assert sorted(ids) == sorted(expected)


def _first_val_keys(demo_run: dict, tmp_path, n: int) -> list[str]:
    """The first n validation images in manifest order, read by one process."""
    from gnr.data.loader import eval_loader
    from gnr.data.shards import write_demo
    from gnr.tracking import load_run_config

    cfg = load_run_config(demo_run["run_id"], demo_run["uri"])
    write_demo(tmp_path / "shards")
    cfg.data.source = str(tmp_path / "shards")
    return [k for _, _, keys in eval_loader(cfg, limit=n, batch_size=n) for k in keys]


def test_interrupted_eval_resumes_without_recomputing_finished_batches(demo_run, gnr_home, tmp_path, monkeypatch):
    from gnr.eval import EvalSpec, evaluate

    cache = tmp_path / "volume" / "eval-cache"  # where the chart's eval pods keep finished batches
    monkeypatch.setenv("GNR_EVAL_CACHE", str(cache))

    spec = EvalSpec(attacks=("clean", "pgd10"), eps=(4.0,), n=12, batch_size=4)
    done = []

    def interrupt_after_two(progress):
        done.append(progress.done)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(demo_run["run_id"], spec, uri=demo_run["uri"], on_batch=interrupt_after_two)
    files = sorted((cache / demo_run["run_id"]).rglob("batch-*.json"))
    assert len(files) == 2
    stamps = {f: f.stat().st_mtime_ns for f in files}

    resumed = evaluate(demo_run["run_id"], spec, uri=demo_run["uri"])
    assert (resumed.resumed_batches, resumed.batches) == (2, 3)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert len(list((cache / demo_run["run_id"]).rglob("batch-*.json"))) == 3

    monkeypatch.setenv("GNR_EVAL_CACHE", str(tmp_path / "fresh"))
    fresh = evaluate(demo_run["run_id"], spec, uri=demo_run["uri"])
    assert fresh.resumed_batches == 0 and fresh.accuracy == resumed.accuracy


def test_ids_file_selects_the_first_n_listed_images(demo_run, gnr_home, tmp_path):
    from gnr.eval import EvalSpec, evaluate

    keys = _first_val_keys(demo_run, tmp_path, 40)
    listed = [keys[5], "digit-9999", keys[2], keys[39], keys[7]]  # one id that is not in the split
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{k}.png\n" for k in listed))
    result = evaluate(demo_run["run_id"], EvalSpec(attacks=("clean",), ids=str(ids), n=4, batch_size=2, seed=5),
                      uri=demo_run["uri"])  # seed 5: a table of its own, which other tests' images do not join
    rows = list(csv.DictReader(open(result.csv_path)))
    assert sorted(r["id"] for r in rows) == sorted([keys[5], keys[2], keys[39]])


def _columns(text: str, ids: list[str], columns: list[str]) -> str:
    """``text`` (a per-image CSV) cut down to rows ``ids`` and ``columns``, written as gnr writes it."""
    import io

    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(text, newline=""))}
    out = io.StringIO(newline="")
    w = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows[i] for i in ids)
    return out.getvalue()


def test_a_later_evaluation_adds_to_what_the_run_holds(demo_run, gnr_home, tmp_path):
    """Issue 19: AutoAttack, then clean on more images, on one run (seed 7: a table of its own). Both sets of
    flags are in the table locally and in MLflow, the first byte for byte; metrics are added, none reset."""
    from gnr.eval import EvalSpec, evaluate

    client = MlflowClient(tracking_uri=demo_run["uri"])
    first = evaluate(demo_run["run_id"], EvalSpec(attacks=("autoattack",), eps=(64.0,), n=4, batch_size=4, seed=7),
                     uri=demo_run["uri"])
    assert first.metric_prefix == "eval-seed7"
    first_text = open(first.csv_path, newline="").read()
    first_ids = [r["id"] for r in csv.DictReader(open(first.csv_path, newline=""))]
    first_columns = ["id", "label", "autoattack/eps64", "pgd10/eps64"]
    assert first_text.splitlines()[0] == ",".join(first_columns) and len(first_ids) == 4
    assert open(client.download_artifacts(demo_run["run_id"], "eval-seed7/per_image.csv", str(tmp_path / "first")),
                newline="").read() == first_text
    first_metrics = client.get_run(demo_run["run_id"]).data.metrics

    second = evaluate(demo_run["run_id"], EvalSpec(attacks=("clean",), n=6, batch_size=6, seed=7), uri=demo_run["uri"])
    assert second.csv_path == first.csv_path and second.accuracy.keys() == {"clean"}
    local = open(second.csv_path, newline="").read()
    logged = open(client.download_artifacts(demo_run["run_id"], "eval-seed7/per_image.csv", str(tmp_path)),
                  newline="").read()
    assert logged == local
    rows = list(csv.DictReader(io.StringIO(local, newline="")))
    assert local.splitlines()[0] == ",".join(first_columns + ["clean"])
    assert len(rows) == 6 and all(r["clean"] in ("0", "1") for r in rows)
    assert _columns(local, first_ids, first_columns) == first_text  # the first set, byte for byte

    metrics = client.get_run(demo_run["run_id"]).data.metrics
    for name in ("autoattack/eps64", "pgd10/eps64"):
        assert metrics[f"eval-seed7/{name}"] == first_metrics[f"eval-seed7/{name}"] == first.accuracy[name]
    assert metrics["eval-seed7/clean"] == second.accuracy["clean"] and metrics["eval-seed7/n"] == 6
    summary = json.load(open(client.download_artifacts(demo_run["run_id"], "eval-seed7/summary.json", str(tmp_path))))
    assert [e["settings"]["attacks"] for e in summary["evaluations"]] == [["autoattack"], ["clean"]]
    assert summary["images"] == {"autoattack/eps64": 4, "pgd10/eps64": 4, "clean": 6}


def test_external_weights_are_evaluated_as_a_new_run(evaluated, gnr_home, tmp_path):
    from gnr.config import build_config
    from gnr.eval import EvalSpec, evaluate_external

    client = MlflowClient(tracking_uri=evaluated["uri"])
    weights = client.download_artifacts(evaluated["run_id"], "weights/ema.safetensors", str(tmp_path))
    cfg = build_config("demo", fields={"tracking.uri": evaluated["uri"], "tracking.experiment": "tests-external"})
    result = evaluate_external(weights, cfg, EvalSpec(attacks=("clean",), n=4))
    assert result.run_id != evaluated["run_id"]
    run = client.get_run(result.run_id)
    assert run.data.tags["source"] == "external" and run.info.status == "FINISHED"
    assert run.data.metrics["eval/n"] == 4 and "eval/clean" in run.data.metrics
    assert run.data.params["model.weights"].endswith("ema.safetensors")


@pytest.mark.parametrize("args, needle", [
    (["--run-id", "0123456789abcdef0123456789abcdef"], "no mlflow run"),
    (["--attacks", "clean,deepfool"], "unknown attack 'deepfool'"),
    (["--run-id", "abc", "--tracking-uri", "http://127.0.0.1:9"], "not reachable"),
])
def test_bad_input_is_one_line(demo_run, gnr_home, args, needle):
    defaults = {"--run-id": demo_run["run_id"], "--tracking-uri": demo_run["uri"]}
    given = dict(zip(args[::2], args[1::2]))
    options = [part for key, value in {**defaults, **given}.items() for part in (key, value)]
    assert_one_line_error(run_gnr("eval", *options, "--n", 2, timeout=120), needle)


def test_a_broken_store_is_not_reported_as_a_missing_run(gnr_home, tmp_path):
    """A store that cannot be opened is named as such, by eval and train alike, and left untouched."""
    store = tmp_path / "mlflow.db"
    store.write_text("not a database")
    uri = f"sqlite:///{store}"
    for args in (["eval", "--run-id", "0123456789abcdef0123456789abcdef"], ["train", "gradnorm", "--max-steps", "1"]):
        proc = run_gnr(*args, "--tracking-uri", uri, timeout=300)
        assert_one_line_error(proc, f"cannot open the MLflow store {uri}: DatabaseError")
    assert store.read_text() == "not a database"


def test_submit_dry_run_hands_the_same_evaluation_to_the_pod(helm):  # noqa: F811
    from tests.manifests import objects

    proc = run_gnr("eval", "--run-id", "abc123", "--submit", "--gpus", 2, "--dry-run", "--n", 50, "--ids", "robustbench",
                   "--attacks", "clean,autoattack", "--eps", "1,4", env={"GNR_HELM": str(helm)}, check=True)
    (job,) = objects(proc.stdout)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["torchrun", "--standalone", "--nproc-per-node=2"]
    args = command[command.index("eval") + 1:]
    assert args[:2] == ["--run-id", "abc123"]
    options = dict(zip(args[2::2], args[3::2]))
    assert options["--attacks"] == "clean,autoattack" and options["--eps"] == "1,4"
    assert options["--ids"] == "robustbench" and options["--limit"] == "50"  # torchrun would claim --n


def test_plain_progress_says_what_it_does_from_the_start(demo_run, gnr_home):
    """Not on a terminal: plain lines on stderr, each phase as it starts and ends with its wall time (loading,
    the model-pass probe, each attack at each ε, logging), the projection before the first attack.
    At 64/255 APGD-CE breaks every image. It adds its measures to the shared run's eval-raw table."""
    proc = run_gnr("eval", "--run-id", demo_run["run_id"], "--tracking-uri", demo_run["uri"], "--n", 3,
                   "--attacks", "clean,autoattack", "--eps", "64", "--weights", "raw", "--profile", check=True)
    lines = proc.stderr.splitlines()

    def at(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.match(pattern, line))

    load = at(rf"eval: load run {demo_run['run_id']} \(raw weights\): started$")
    assert re.match(r"eval: load run \w+ \(raw weights\): done in \d+\.\d s$", lines[load + 1]), lines[load + 1]
    probe, plan = at(r"eval: model-pass probe: done in"), at(r"eval: 3 images on cpu .*projected")
    attack = at(r"eval: apgd-ce at 64/255 on [1-3] images: started$")  # the correctly classified ones
    done = at(r"eval: apgd-ce at 64/255 on [1-3] images: done in \d+\.\d s$")
    progress = at(r"autoattack/eps64 apgd-ce: 3/3 images, robust 0/3 .*ETA")
    assert load < probe < plan < attack < done < progress
    assert at(r"eval: pgd10/eps64 on 3 images: done in") > progress
    assert at(r"eval: model-pass probe \(fp32\) at") < at(rf"eval: log results into run {demo_run['run_id']}: done in")
    assert "autoattack/eps64 (fp32)" in proc.stdout and "apgd-ce" in proc.stdout and "eff." in proc.stdout  # --profile


def test_bench_eval_samples_by_margin_counts_passes_and_projects(demo_run, gnr_home):
    proc = run_gnr("bench", "eval", "--run-id", demo_run["run_id"], "--tracking-uri", demo_run["uri"], "--weights", "raw",
                   "--n", 8, "--pool", 24, "--eps", "64", "--model", "test_convnext", "--img-size", 32, "--batch-size", 4,
                   "--json", check=True)
    result = json.loads(proc.stdout)
    assert (result["n"], result["pool"]) == (8, 24)
    assert sum(s["population"] for s in result["strata"]) == 24 and sum(s["sample"] for s in result["strata"]) == 8
    (entry,) = result["eps"]
    attacks = entry["attacks"]
    assert attacks[0]["attack"] == "apgd-ce" and attacks[0]["images"] == result["clean"]
    assert entry["forward"] == sum(a["forward"] for a in attacks) > 0
    assert entry["backward"] == sum(a["backward"] for a in attacks) > 0
    assert entry["robust"] == attacks[-1]["robust_after"]
    for a in attacks:
        assert a["forward_per_image"] == pytest.approx(a["forward"] / 8)
        assert a["model_s"] > 0 and a["efficiency"] == pytest.approx(a["model_s"] / a["seconds"])
    assert sum(s["sample"] * s["forward_per_image"] for s in entry["strata"]) == pytest.approx(entry["forward"])
    projection = entry["projection"]
    assert projection["total_s"] == pytest.approx(sum(projection["per_attack_s"].values()), abs=0.5)
    low, high = projection["ci95_s"]
    assert low <= projection["total_s"] <= high
    assert result["projected_model"]["batch_size"] == 4  # the only size tried
    for phase in ("load run", "read a pool of up to 24 images", "clean margins of 24 images", "apgd-ce at 64/255",
                  "model-pass probe (fp32)", "build test_convnext at 32 px", "time test_convnext passes (fp32)"):
        assert re.search(rf"^bench eval: {re.escape(phase)}.*: done in \d+\.\d s$", proc.stderr, re.M), phase
    proc = run_gnr("bench", "eval", "--run-id", demo_run["run_id"], "--tracking-uri", demo_run["uri"], "--weights", "raw",
                   "--n", 3, "--eps", "64", "--no-project", check=True)
    assert "apgd-ce" in proc.stdout and "total" in proc.stdout  # the table, by default
