"""gnr.eval's pure parts: option parsing, measures, sanity checks, the per-batch cache."""

import json

import pytest
import torch
from torch import nn

from gnr.errors import GnrError
from gnr.eval import (EvalSpec, Measure, normalise_id, parse_attacks, parse_eps, pgd_step, robust_correct, run_autoattack,
                      sanity_warnings, write_rows)
from gnr.eval.results import BatchCache


def test_parse_attacks_and_eps():
    assert parse_attacks(["clean", "PGD100", "autoattack", "clean"]) == ("clean", "pgd100", "autoattack")
    assert parse_eps(["1", "2/255", "4", "4"]) == (1.0, 2.0, 4.0)
    with pytest.raises(GnrError, match="unknown attack 'cw'"):
        parse_attacks(["clean", "cw"])
    with pytest.raises(GnrError, match="pgd0"):
        parse_attacks(["pgd0"])
    with pytest.raises(GnrError, match="numbers"):
        parse_eps(["four"])
    with pytest.raises(GnrError):
        parse_eps(["-1"])


def test_measures_add_the_large_eps_sanity_check_only_with_attacks():
    spec = EvalSpec(attacks=("clean", "pgd10", "autoattack"), eps=(1.0, 4.0))
    assert [m.name for m in spec.measures()] == [
        "clean", "pgd10/eps1", "pgd10/eps4", "autoattack/eps1", "autoattack/eps4", "pgd10/eps64"]
    assert [m.name for m in EvalSpec(attacks=("clean",)).measures()] == ["clean"]
    assert pgd_step(4 / 255) == pytest.approx(1 / 255) and pgd_step(64 / 255) == pytest.approx(16 / 255)


def test_sanity_warnings_name_each_failed_check():
    measures = EvalSpec(attacks=("clean", "pgd10", "pgd100", "autoattack"), eps=(4.0,)).measures()
    good = {"clean": 0.9, "pgd10/eps4": 0.5, "pgd100/eps4": 0.45, "autoattack/eps4": 0.4, "pgd10/eps64": 0.0}
    assert sanity_warnings(good, measures) == []
    bad = {**good, "pgd100/eps4": 0.6, "autoattack/eps4": 0.55, "pgd10/eps64": 0.3}
    warnings = sanity_warnings(bad, measures)
    assert len(warnings) == 3
    assert any("pgd10/eps64" in w and "~0" in w for w in warnings)
    assert any(w.startswith("pgd100/eps4") and "pgd10/eps4" in w for w in warnings)
    assert any(w.startswith("autoattack/eps4") and "pgd10/eps4" in w for w in warnings)


def test_batch_cache_merges_rows_by_image_and_writes_atomically(tmp_path):
    cache = BatchCache(tmp_path / "c")
    cache.write([{"id": "a", "label": 1, "clean": True}, {"id": "b", "label": 2, "clean": False}])
    cache.write([{"id": "a", "label": 1, "pgd10/eps4": False}])
    rows = cache.load()
    assert rows["a"] == {"id": "a", "label": 1, "clean": True, "pgd10/eps4": False}
    assert rows["b"]["clean"] is False
    assert not list((tmp_path / "c").glob("*.tmp*"))
    assert all(isinstance(json.loads(p.read_text()), list) for p in (tmp_path / "c").glob("batch-*.json"))


def test_ids_compare_without_extension():
    assert normalise_id("n01440764/ILSVRC2012_val_00000293.JPEG") == "n01440764/ILSVRC2012_val_00000293"
    assert normalise_id("digit-0001") == "digit-0001"


def test_write_rows(tmp_path):
    path = write_rows([{"id": "x", "label": 3, "clean": True}], tmp_path / "r.csv")
    assert path.read_text().splitlines() == ["id,label,clean", "x,3,1"]


def _linear() -> nn.Module:
    """Ten classes: AutoAttack's standard version targets nine of them."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).eval().requires_grad_(False)


def test_robust_correct_is_never_above_clean_and_autoattack_matches_pyautoattack():
    from pyautoattack import AutoAttack

    model = _linear()
    torch.manual_seed(1)
    x = torch.rand(16, 3, 4, 4)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # three misclassified images
    clean = robust_correct(model, x, y, Measure("clean"), 0, [])
    assert clean.sum() == 13
    for m in (Measure("pgd10", 4.0), Measure("autoattack", 4.0)):
        assert not (robust_correct(model, x, y, m, 0, []) & ~clean).any()
    ours = run_autoattack(model, x, y, eps=8 / 255, seed=0).flags
    _, y_adv = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=0, device="cpu") \
        .run_standard_evaluation(x, y, batch_size=16)
    assert torch.equal(ours, y_adv == y)


def test_robustbench_ids_are_shipped():
    from gnr.eval import load_ids

    ids = load_ids("robustbench")
    assert len(ids) == len(set(ids)) == 5000
    assert all("/" in i and not i.endswith(".JPEG") for i in ids)
