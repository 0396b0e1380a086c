"""The trainer and `gnr bench step` run one and the same optimizer step; compile runs gradnorm-fd."""

import numpy as np
import pytest
import torch
from torch import nn

from gnr.bench.step import bench_config
from gnr.config import RunConfig
from gnr.distributed import Dist
from gnr.errors import GnrError
from gnr.models import build_model
from gnr.objectives import build_objective
from gnr.step import build_train_step
from gnr.train import Trainer

CPU = torch.device("cpu")


def test_a_bench_step_and_a_trainer_step_give_the_same_weights(demo_shards):
    cfg = bench_config(model="test_resnet", img_size=32, batch_size=8, method="gradnorm", act="gelu",
                       device="cpu", amp="none", compile=False)
    cfg.data.source = str(demo_shards)
    cfg.schedule.warmup_epochs = 0  # the LR schedule is the trainer's: start both at the peak LR
    trainer = Trainer(cfg, Dist(rank=0, world=1, local_rank=0, device=CPU))
    net, _ = build_model(cfg.model, cfg.data.num_classes, cfg.data.img_size)
    net.load_state_dict(trainer.model.state_dict())
    bench = build_train_step(cfg, net, CPU)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, cfg.data.num_classes, (8,))

    torch.manual_seed(3), np.random.seed(3)  # mixup draws from numpy
    trained, _ = trainer.step(iter([(x.clone(), y)]))
    torch.manual_seed(3), np.random.seed(3)
    benched, _ = bench(iter([(x.clone(), y)]), progress=0.0, update=1)

    assert trained == benched and trained["penalty"] > 0
    for a, b, old in zip(trainer.model.parameters(), net.parameters(), before):
        assert torch.equal(a, b)
    assert any(not torch.equal(p, old) for p, old in zip(net.parameters(), before))
    for a, b in zip(trainer.ema.state_dict().values(), bench.ema.state_dict().values()):
        assert torch.equal(a, b)


def mlp_config(method: str) -> RunConfig:
    return RunConfig.model_validate({"data": {"num_classes": 10, "img_size": 8, "eval_resize": 8},
                                     "objective": {"method": method}, "optim": {"batch_size": 8},
                                     "runtime": {"device": "cpu", "compile": True}})


def smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.GELU(), nn.Linear(32, 10))


def test_compile_runs_gradnorm_fd_and_is_refused_for_double_backward():
    cfg = mlp_config("gradnorm-fd")
    model = smooth_mlp().train()
    step = build_train_step(cfg, model, CPU)
    assert step.train_model is not model  # compiled
    x, y_soft = torch.rand(8, 3, 8, 8), torch.softmax(3 * torch.randn(8, 10), 1)
    _, exact = build_objective(mlp_config("gradnorm").objective)(model, x, y_soft, 9.0)
    _, compiled = step.objective(step.train_model, x, y_soft, 9.0)
    assert compiled["grad_l1"].item() == pytest.approx(exact["grad_l1"].item(), rel=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    parts, nonfinite = step(iter([(x, torch.randint(0, 10, (8,)))]), progress=9.0, update=1)
    assert not nonfinite and parts["grad_l1"] > 0
    assert all(not torch.equal(p, old) for p, old in zip(model.parameters(), before))
    with pytest.raises(GnrError, match="no double backward"):
        build_train_step(mlp_config("gradnorm"), smooth_mlp(), CPU)


def test_an_epoch_without_held_out_check_still_saves(demo_shards, tmp_path):
    cfg = bench_config(model="test_resnet", img_size=32, batch_size=8, method="natural", act="keep",
                       device="cpu", amp="none", compile=False)
    cfg.data.source, cfg.eval.holdout, cfg.checkpoint.dir = str(demo_shards), 0, str(tmp_path)
    trainer = Trainer(cfg, Dist(rank=0, world=1, local_rank=0, device=CPU))
    trainer.attach("run", None)
    assert trainer.end_epoch() == {} and trainer.best_pgd == -1.0
    assert list((tmp_path / "run").glob("*.pt"))
