"""AutoAttack's fast paths against the exact one, on a small model trained here on scikit-learn's digits.

Verdict tests run the standard suite (what `gnr eval` runs); the model is tiny so that the suite's
fixed iteration counts, not the model, set the time.
"""

import copy

import pytest
import torch
from torch import nn

from gnr.eval import STANDARD, PassCounter, Phases, compile_graphs, prepare_model, run_autoattack, upper_bound_passes

EPS = (2 / 255, 16 / 255)


@pytest.fixture(scope="module")
def digits_model():
    """A small GELU conv net trained for a few hundred steps on 8x8 digits (about 95% held-out accuracy),
    and 12 held-out images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.GELU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        idx = torch.randint(0, 1500, (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        assert (model(x[1500:]).argmax(1) == y[1500:]).float().mean() > 0.85
    return model, x[1500:1512], y[1500:1512]


@pytest.fixture(scope="module")
def exact(digits_model):
    """The exact (fp32, eager) runs, each through an outer counter that sees every pass the attacks make."""
    model, x, y = digits_model
    out = {}
    for eps in EPS:
        counted = PassCounter(model)
        out[eps] = (run_autoattack(counted, x, y, eps=eps, seed=0), counted.counts())
    return out


def test_compiled_model_gives_the_exact_verdicts_from_graphs_built_before_the_attacks(digits_model, exact):
    """Whole AutoAttack runs at two ε, then one of a single image, through the compiled channels-last model:
    the eager verdicts, and no graph beyond those built before the attacks. They are built from 32 images
    down, so both sides of oneDNN's 16-image threshold (a guard on the dynamic batch) are among them; the
    attacks' shrinking batches, and a batch of one, then find a graph for every size."""
    model, x, y = digits_model
    events = []
    phases = Phases(events.append)
    fast, settings = prepare_model(copy.deepcopy(model), torch.device("cpu"), compile=True, channels_last=True,
                                   phases=phases)
    assert settings == {"compile": True, "channels_last": True}
    compile_graphs(fast, 8, 32, torch.device("cpu"), phases)
    phases.close()
    built = fast.graphs
    assert 2 <= built <= 4  # forward, forward and backward; on each side of a size-dependent kernel choice
    assert [e.state for e in events if e.name.startswith("compile graph")] == ["start", "end"] * built
    robust, batches = [], set()
    for eps in EPS:
        result = run_autoattack(fast, x, y, eps=eps, seed=0)
        assert torch.equal(result.flags, exact[eps][0].flags), eps
        robust.append(int(result.flags.sum()))
        batches |= {b for s in result.stats for b in s.forward_calls}
    assert robust[0] > robust[1]  # the two budgets make different verdicts: the check can fail
    assert len(batches) > 1  # and the batch shrank as images got broken
    one = int(exact[EPS[0]][0].flags.nonzero()[0])  # an image that goes through all four attacks
    alone = run_autoattack(fast, x[one:one + 1], y[one:one + 1], eps=EPS[0], seed=0)
    assert torch.equal(alone.flags, run_autoattack(model, x[one:one + 1], y[one:one + 1], eps=EPS[0], seed=0).flags)
    assert [s.attack for s in alone.stats] == list(STANDARD) and fast.graphs == built


def test_pass_counts_add_up_and_robust_images_cost_the_upper_bound(digits_model, exact):
    _, _, y = digits_model
    result, (forward, backward) = exact[EPS[0]]
    assert [s.attack for s in result.stats] == list(STANDARD)
    assert sum(s.forward for s in result.stats) + len(y) == forward  # plus one uncounted clean forward
    assert sum(s.backward for s in result.stats) == backward
    assert [s.images for s in result.stats[1:]] == [s.robust for s in result.stats[:-1]]  # survivors go on
    square = result.stats[-1]
    assert (square.forward, square.backward) == (square.images * upper_bound_passes(10)["square"][0], 0)


def _near_tie() -> nn.Module:
    """Logits 100 + terms below 0.5: bf16 (8 mantissa bits, spacing 0.5 at 100) cannot tell the classes
    apart, so its clean predictions differ from fp32's on many images."""
    torch.manual_seed(0)
    linear = nn.Linear(3 * 4 * 4, 10)
    with torch.no_grad():
        linear.weight.mul_(0.1)
        linear.bias.fill_(100.0)
    return nn.Sequential(nn.Flatten(), linear).eval().requires_grad_(False)


def test_bf16_verdicts_are_rechecked_in_fp32_and_disagreements_reattacked():
    model = _near_tie()
    torch.manual_seed(1)
    x = torch.rand(8, 3, 4, 4)
    y = model(x).argmax(1)  # every image correct in fp32
    result = run_autoattack(model, x, y, eps=64 / 255, seed=0, precision="bf16")
    r = result.recheck
    assert r is not None and r.checked == len(y) == r.agreed + r.disagreed
    assert r.disagreed > 0  # bf16 misreads clean images that fp32 classifies correctly
    reattacked = [s for s in result.stats if s.precision == "fp32"]
    assert reattacked and reattacked[0].images == r.disagreed
    assert 0 <= r.flipped <= r.disagreed


def test_passes_per_image_add_up_to_the_counted_passes(digits_model, exact):
    """The projection's per-image passes: their sum is what was counted, and an image that survives every
    attack costs each attack's fixed number of passes, plus pyautoattack's checks."""
    from gnr.eval import image_passes
    from gnr.eval.autoattack import CHECK_FORWARDS

    for eps in EPS:
        result = exact[eps][0]
        passes = image_passes(result, 10)
        assert sum(f for p in passes for f, _ in p.values()) == pytest.approx(sum(s.forward for s in result.stats))
        assert sum(b for p in passes for _, b in p.values()) == pytest.approx(sum(s.backward for s in result.stats))
        bound = upper_bound_passes(10)
        for i in (i for i, o in enumerate(result.outcome) if o == "robust"):
            assert {a: p for (a, _), p in passes[i].items()} == bound
        assert [o != "robust" for o in result.outcome] == (~result.flags).tolist()
    assert CHECK_FORWARDS == 7
