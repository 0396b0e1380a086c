"""The parts of an evaluation's cost accounting that are arithmetic: the stratified sample and its
interval, what passes alone cost at the batch sizes they ran at, and phases reported while they run."""

import math
import statistics
import threading

import pytest
import torch

from gnr.eval import Phase, Phases, allocate, margin_strata, model_seconds, stratified_mean


def test_strata_split_the_pool_by_clean_margin_and_the_sample_keeps_two_of_each():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 0.5], [5.0, 0.0], [0.0, 2.0], [2.0, 0.0], [4.0, 1.0]])
    y = torch.tensor([0, 0, 0, 0, 1, 0, 0])  # image 1 is misclassified; margins 3, 0.5, 5, 2, 2, 3
    strata = margin_strata(logits, y, bands=2)
    assert [s.name for s in strata] == ["misclassified", "margin band 1/2", "margin band 2/2"]
    assert strata[0].population == [1] and sorted(strata[1].population) == [2, 4, 5]
    assert sorted(strata[2].population) == [0, 3, 6]
    allocate(strata, 5, seed=0)
    assert [len(s.sample) for s in strata] == [1, 2, 2]
    assert all(set(s.sample) <= set(s.population) for s in strata)
    allocate(strata, 2, seed=0)  # fewer than one per stratum: proportional, largest first
    assert sum(len(s.sample) for s in strata) == 2


def test_stratified_mean_and_its_interval():
    values, population = [[0.0, 0.0], [10.0, 20.0, 30.0]], [4, 6]
    mean, half = stratified_mean(values, population)
    assert mean == pytest.approx(0.4 * 0 + 0.6 * 20)
    expected = 0.6 ** 2 * (1 - 3 / 6) * statistics.variance([10, 20, 30]) / 3
    assert half == pytest.approx(1.96 * math.sqrt(expected))
    assert stratified_mean([[1.0, 3.0], [5.0]], [2, 9]) == (pytest.approx((2 * 2 + 9 * 5) / 11), None)
    assert stratified_mean([[7.0, 7.0]], [2])[1] == 0.0  # the whole pool sampled: no uncertainty left


def test_model_seconds_weights_each_call_by_its_batch_size():
    times = {2: (0.10, 0.25), 6: (0.30, 0.70)}  # (forward, forward and backward) per call
    assert model_seconds({2: 3}, {2: 1}, times) == pytest.approx(3 * 0.10 + 1 * 0.15)
    assert model_seconds({4: 1}, {4: 2}, times) == pytest.approx(0.20 + 2 * 0.275)  # halfway
    assert model_seconds({12: 1}, {}, times) == pytest.approx(0.60)  # beyond the largest: in proportion


def test_a_long_phase_is_reported_as_running_until_it_ends():
    events, ticked = [], threading.Event()

    def on_event(event):
        events.append(event)
        if event.state == "running" and sum(e.state == "running" for e in events) >= 2:
            ticked.set()

    with Phases(on_event, tick_s=0.05) as phases, phases.phase("compile graph 1", lambda: "3 nodes"):
        assert ticked.wait(30)
    assert (events[0].name, events[0].state) == ("compile graph 1", "start")
    assert all(e == Phase("compile graph 1", "running", e.elapsed_s, "3 nodes") for e in events[1:-1])
    assert (events[-1].state, events[-1].elapsed_s >= events[-2].elapsed_s) == ("end", True)
