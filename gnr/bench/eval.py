"""`gnr bench eval`: where AutoAttack's time goes, and what the full evaluation would cost.

Runs the standard suite on ``n`` images of a trained run (one batch, as ``gnr eval`` would) at each
ε and reports, per attack: seconds, forward and backward image-passes, images attacked and still
robust. The attack mix depends on how robust the model is (robust images go through all four
attacks), so passes per evaluated image are measured on a real model. The projection multiplies
them by another model's seconds per forward / backward image at a batch size on this device:
``images × Σ_attack (forward passes × forward s + backward passes × backward s)``. It leaves out the
attacks' own work between passes, which dominates only for tiny models; the run's own model is
projected the same way beside its measured seconds, so the gap is visible.
"""

from __future__ import annotations

import torch

from gnr import distributed
from gnr.bench.step import device_name
from gnr.config import ModelConfig
from gnr.errors import GnrError
from gnr.eval import image_batches, load_run_model, pass_seconds, prepare_model, project_seconds, run_autoattack


def bench_eval(run_id: str, *, uri: str | None = None, weights: str = "ema", n: int = 16,
               eps: tuple[float, ...] = (4.0,), model: str = "swin_base_patch4_window7_224", img_size: int = 224,
               batch_size: int = 32, images: int = 5000, world: int = 1, device: str = "auto",
               compile: bool | None = None, precision: str = "fp32", seed: int = 0, project: bool = True) -> dict:
    """Profile AutoAttack on ``n`` images of ``run_id`` at each ``eps`` (1/255); project ``images`` images of ``model``."""
    from gnr.data.loader import with_resolved_source

    if n < 1 or batch_size < 1 or images < 1 or world < 1:
        raise GnrError("--n, --batch-size, --images and --world must be >= 1")
    dev = distributed.pick_device(device, 0)
    loaded = load_run_model(run_id, weights, uri, dev)
    cfg = with_resolved_source(loaded.cfg, None, True)
    x, y, _ = next(iter(image_batches(cfg, split=cfg.data.val_split, n=n, batch_size=n)))
    x, y = x.to(dev), y.to(dev)
    attacked, prepared = prepare_model(loaded.model, dev, compile=compile)
    with torch.no_grad():
        clean = int((attacked(x).argmax(1) == y).sum())
    own_cost = pass_seconds(attacked, cfg.data.img_size, len(y), dev)
    target_cost = _target_cost(model, img_size, batch_size, dev, compile) if project else None
    per_eps = []
    for e in eps:
        result = run_autoattack(attacked, x, y, eps=e / 255, seed=seed, precision=precision)
        attacks = [{"attack": s.attack, "precision": s.precision, "images": s.images, "robust_after": s.robust,
                    "seconds": round(s.seconds, 3), "forward": s.forward, "backward": s.backward,
                    "forward_per_image": s.forward / len(y), "backward_per_image": s.backward / len(y)}
                   for s in result.stats]
        passes = {a["attack"]: (a["forward_per_image"], a["backward_per_image"]) for a in attacks}
        entry = {"eps_255": e, "robust": int(result.flags.sum()), "attacks": attacks,
                 "seconds": round(sum(a["seconds"] for a in attacks), 3),
                 "forward": sum(a["forward"] for a in attacks), "backward": sum(a["backward"] for a in attacks),
                 "own_model_projected_s": round(sum(project_seconds(passes, len(y), own_cost).values()), 3)}
        if result.recheck is not None:
            entry["recheck"] = vars(result.recheck)
        if target_cost is not None:
            seconds = project_seconds(passes, images, target_cost, world)
            entry["projection"] = {"per_attack_s": {k: round(v, 1) for k, v in seconds.items()},
                                   "total_s": round(sum(seconds.values()), 1),
                                   "s_per_image_one_process": round(sum(seconds.values()) * world / images, 4)}
        per_eps.append(entry)
    return {"run_id": run_id, "weights": weights, "n": len(y), "clean": clean, "device": device_name(dev),
            "torch": torch.__version__, **prepared, "precision": precision,
            "run_model": {"name": cfg.model.name, "img_size": cfg.data.img_size, "batch_size": len(y), **own_cost},
            "projected_model": (None if target_cost is None else
                                {"name": model, "img_size": img_size, "batch_size": batch_size, "images": images,
                                 "world": world, **target_cost}),
            "eps": per_eps}


def _target_cost(name: str, img_size: int, batch_size: int, dev: torch.device, compile: bool | None) -> dict:
    """Seconds per forward / backward image of ``name`` (random weights, ImageNet head) at ``batch_size``."""
    from gnr.models import build_model

    net, _ = build_model(ModelConfig(name=name, act="keep"), 1000, img_size)
    net = net.to(dev).eval().requires_grad_(False)
    net, _ = prepare_model(net, dev, compile=compile)
    return pass_seconds(net, img_size, batch_size, dev, reps=1)
