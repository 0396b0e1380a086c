"""`gnr analyze curve|gradients|figures` on a demo-preset run logged to a real MLflow server.

The run's raw weights: after the fixture's 12 steps they classify most digits, while the EMA weights
(decay 0.99) are still close to the initialisation.
"""

import csv
import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import run_gnr

pytestmark = pytest.mark.integration


def _artifacts(uri: str, run_id: str, folder: str) -> set[str]:
    return {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id, folder)}


def _first_images(run_id: str, uri: str, n: int):
    from gnr.data.loader import with_resolved_source
    from gnr.eval import image_batches, load_run_model

    loaded = load_run_model(run_id, "raw", uri)
    x, y, keys = next(iter(image_batches(with_resolved_source(loaded.cfg), n=n, batch_size=n)))
    return loaded.model, x, y, keys


def test_curve_is_monotone_reaches_zero_and_starts_at_clean_accuracy(demo_run, gnr_home):
    from gnr.analysis.curve import CURVE_EPS_255, analyze_curve

    run_id, uri = demo_run["run_id"], demo_run["uri"]
    result = analyze_curve([run_id], n=12, batch_size=12, steps=20, weights="raw", uri=uri, device="cpu")
    acc = result["runs"][run_id]["accuracy"]
    assert len(acc) == len(CURVE_EPS_255) == 33
    assert all(a >= b for a, b in zip(acc, acc[1:]))
    assert acc[-1] == 0.0
    model, x, y, _ = _first_images(run_id, uri, 12)
    with torch.no_grad():
        assert acc[0] == pytest.approx((model(x).argmax(1) == y).float().mean().item())
    with Image.open(result["png"]) as img:
        assert img.format == "PNG" and img.size == (600, 400)
    rows = list(csv.DictReader(open(result["csv"])))
    assert [float(r["eps_255"]) for r in rows] == list(CURVE_EPS_255)
    assert {"analysis/curve/robust_accuracy.png", "analysis/curve/robust_accuracy.csv",
            f"analysis/curve/min_eps-{run_id}.csv"} <= _artifacts(uri, run_id, "analysis/curve")
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "curve/accuracy")
    assert sorted((m.step, m.value) for m in history)[-1] == (32, 0.0)


def test_gradient_statistics_match_a_direct_computation(demo_run, gnr_home):
    import torch.nn.functional as F

    run_id, uri = demo_run["run_id"], demo_run["uri"]
    n = 6
    proc = run_gnr("analyze", "gradients", "--run-id", run_id, "--n", n, "--weights", "raw", "--tracking-uri", uri,
                   "--json", check=True)
    stats = json.loads(proc.stdout)[run_id]
    model, x, y, keys = _first_images(run_id, uri, n)
    l1 = []
    for i in range(n):  # one image at a time, the textbook way
        xi = x[i:i + 1].clone().requires_grad_(True)
        F.cross_entropy(model(xi), y[i:i + 1]).backward()
        l1.append(xi.grad.abs().sum().item())
    assert stats["n"] == n
    assert stats["l1_mean"] == pytest.approx(sum(l1) / n, rel=1e-4)
    per_sample = {r["id"]: r for r in csv.DictReader(open(next(f for f in stats["files"] if f.endswith(".csv"))))}
    for key, value in zip(keys, l1):
        assert float(per_sample[key]["l1"]) == pytest.approx(value, rel=1e-4)
        assert sum(float(per_sample[key][f"l1_{c}"]) for c in "RGB") == pytest.approx(value, rel=1e-4)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.metrics["grad/l1_mean"] == pytest.approx(stats["l1_mean"])
    assert {"analysis/gradients/stats.json", "analysis/gradients/per_sample.csv",
            "analysis/gradients/histograms.png"} <= _artifacts(uri, run_id, "analysis/gradients")


def test_figures_on_real_photos_are_pngs_of_the_expected_size(demo_run, gnr_home, imagenet_sample):
    from gnr.analysis.figures import analyze_figures, figure_pixels

    run_id, uri = demo_run["run_id"], demo_run["uri"]
    result = analyze_figures([run_id], images=str(imagenet_sample), k=3, weights="raw", uri=uri, device="cpu")
    assert result["images"][0].startswith("n01440764")
    for path in result["files"]:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == figure_pixels(3, 2)
    assert {"analysis/figures/fig1_gradients.png",
            "analysis/figures/fig3_perturbations.png"} <= _artifacts(uri, run_id, "analysis/figures")
