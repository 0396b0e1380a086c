import pytest
import torch
import torch.nn.functional as F

from gnr.eval import fgsm, pgd
from gnr.config import ModelConfig
from gnr.models import build_model

EPS = 4 / 255


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A random ConvNeXt (LayerNorm, GELU) is input-sensitive enough for ε = 4/255 to matter.
    net, _ = build_model(ModelConfig(name="test_convnext"), num_classes=10, img_size=32)
    return net.eval()


@pytest.fixture()
def batch():
    torch.manual_seed(1)
    x = torch.rand(16, 3, 32, 32)
    x[:, :, :4] = 0.0  # pixels on the box edges: the attack must clip to [0, 1]
    x[:, :, -4:] = 1.0
    return x, torch.randint(0, 10, (16,))


def _check(model, x, x_adv, y):
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, adv = (F.cross_entropy(model(z), y, reduction="none") for z in (x, x_adv))
        noise = F.cross_entropy(model(pgd(model, x, y, eps=EPS, step_size=0, steps=0)), y)
    assert (adv > clean).all()
    assert adv.mean() - clean.mean() > 0.1 > (noise - clean.mean()).abs()  # far beyond random noise
    assert all(p.grad is None for p in model.parameters())


def test_pgd_stays_in_ball_and_box_and_raises_the_loss(model, batch):
    x, y = batch
    with torch.no_grad():  # eval callers often run under no_grad; the attack still needs gradients
        x_adv = pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=10)
    _check(model, x, x_adv, y)
    assert not model.training


def test_pgd_takes_soft_targets_and_respects_train_mode(model, batch):
    x, y = batch
    model.train()
    try:
        x_adv = pgd(model, x, F.one_hot(y, 10).float(), eps=EPS, step_size=EPS / 3, steps=3)
        assert model.training
    finally:
        model.eval()
    _check(model, x, x_adv, y)


def test_pgd_zero_steps_is_the_random_start(model, batch):
    x, y = batch
    noisy = pgd(model, x, y, eps=EPS, step_size=EPS, steps=0)
    assert 0 < (noisy - x).abs().max() <= EPS + 1e-6
    assert torch.equal(pgd(model, x, y, eps=EPS, step_size=EPS, steps=0, random_start=False), x)


def test_fgsm_stays_in_ball_and_box_and_raises_the_loss(model, batch):
    x, y = batch
    _check(model, x, fgsm(model, x, y, eps=EPS), y)


def test_pgd_per_image_budgets_match_one_call_per_image(model, batch):
    x, y = batch
    eps = torch.linspace(1, 16, len(x)) / 255
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5, random_start=False)
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) <= eps + 1e-6).all()
    assert (x_adv - x).abs().amax() > 8 / 255  # the large budgets are used
    for i in (0, 7, 15):  # eval mode and a summed loss: each image's attack is independent of the batch
        alone = pgd(model, x[i:i + 1], y[i:i + 1], eps=float(eps[i]), step_size=float(eps[i]) / 4, steps=5,
                    random_start=False)
        torch.testing.assert_close(x_adv[i:i + 1], alone, rtol=0, atol=1e-6)
