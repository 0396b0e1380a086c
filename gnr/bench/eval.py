"""`gnr bench eval`: where AutoAttack's time goes, and what a full evaluation would cost.

Runs the standard suite on a sample of ``n`` images of a trained run (one batch, as ``gnr eval``
would) at each ε and reports, per attack: seconds, forward and backward image-passes, images
attacked and still robust, and its efficiency: what its passes alone cost (each call × the model's
time at that batch size) over its wall time.

An image that survives every attack costs some 70 times the passes of one that APGD-CE breaks, so
the cost of an evaluation is set by how many images are robust. The sample is therefore drawn from
a larger pool of the run's images, stratified by clean logit margin (a cheap proxy for robustness),
and the passes per image are estimated with a 95% interval. The projection multiplies them by the
target model's seconds per forward / backward image, timed at the batch size (of those tried) where
the sample's pass mix costs least, in the precision asked for:
``images / world × E[Σ_attack forward passes × forward s + backward passes × backward s]``.
That is the passes alone; the measured efficiencies say how close an attack comes to it.
"""

from __future__ import annotations

import torch

from gnr import distributed
from gnr.bench.step import device_name
from gnr.config import ModelConfig
from gnr.errors import GnrError
from gnr.eval import (Autocast, Phases, add_efficiency, allocate, attack_table, compile_graphs, fastest_batch,
                      image_batches, image_passes, load_run_model, margin_strata, prepare_model, run_autoattack,
                      stratified_mean)

POOL_PER_SAMPLE = 4  # images in the pool the sample is drawn from, per sampled image (by default)


def bench_eval(run_id: str, *, uri: str | None = None, weights: str = "ema", n: int = 16, pool: int | None = None,
               eps: tuple[float, ...] = (4.0,), model: str = "swin_base_patch4_window7_224", img_size: int = 224,
               batch_size: int = 32, images: int = 5000, world: int = 1, device: str = "auto",
               compile: bool | None = None, precision: str = "fp32", seed: int = 0, project: bool = True,
               on_event=None) -> dict:
    """Profile AutoAttack on ``n`` images of ``run_id`` at each ``eps`` (1/255), sampled from the first ``pool``
    images; project ``images`` images of ``model``. Each phase is reported to ``on_event``."""
    from gnr.data.loader import with_resolved_source

    if n < 1 or batch_size < 1 or images < 1 or world < 1 or (pool is not None and pool < n):
        raise GnrError("--n, --batch-size, --images and --world must be >= 1, and --pool >= --n")
    with Phases(on_event) as phases:
        dev = distributed.pick_device(device, 0)
        with phases.phase(f"load run {run_id} ({weights} weights)"):
            loaded = load_run_model(run_id, weights, uri, dev)
            cfg = with_resolved_source(loaded.cfg, None, True)
        pool = pool or POOL_PER_SAMPLE * n
        with phases.phase(f"read a pool of up to {pool} images"):
            x_pool, y_pool, _ = next(iter(image_batches(cfg, split=cfg.data.val_split, n=pool, batch_size=pool)))
        attacked, prepared = prepare_model(loaded.model, dev, compile=compile, phases=phases)
        compile_graphs(attacked, cfg.data.img_size, n, dev, phases)
        with phases.phase(f"clean margins of {len(y_pool)} images"), torch.no_grad():
            logits = torch.cat([attacked(x.to(dev)).float().cpu() for x in x_pool.split(n)])
        strata = margin_strata(logits, y_pool)
        allocate(strata, n, seed)
        sample = [i for s in strata for i in s.sample]
        x, y = x_pool[sample].to(dev), y_pool[sample].to(dev)
        per_eps, results = [], []
        for e in eps:
            result = run_autoattack(attacked, x, y, eps=e / 255, seed=seed, precision=precision, phases=phases)
            results.append(result)
            per_eps.append({"eps_255": e, "robust": int(result.flags.sum()), "attacks": attack_table(
                (f"autoattack/eps{e:g}", s) for s in result.stats)})
        add_efficiency([a for entry in per_eps for a in entry["attacks"]], attacked, cfg.data.img_size, dev, phases)
        target = _target_cost(model, img_size, batch_size, dev, compile, precision, per_eps, phases) if project else None
        for entry, result in zip(per_eps, results):
            _summarise(entry, result, strata, cfg.data.num_classes, target, images, world)
    own = {k: v for k, v in (target or {}).items() if k != "per_image"}
    return {"run_id": run_id, "weights": weights, "n": len(y), "pool": len(y_pool),
            "clean": int((logits[sample].argmax(1) == y.cpu()).sum()), "device": device_name(dev),
            "torch": torch.__version__, **prepared, "precision": precision,
            "run_model": {"name": cfg.model.name, "img_size": cfg.data.img_size, "batch_size": len(y)},
            "strata": [{"name": s.name, "population": len(s.population), "sample": len(s.sample)} for s in strata],
            "projected_model": (None if target is None else {"name": model, "img_size": img_size, "images": images,
                                                             "world": world, **own}),
            "eps": per_eps}


def _summarise(entry: dict, result, strata, num_classes: int, target: dict | None, images: int, world: int) -> None:
    """Totals, efficiency and robustness per stratum of one ε; its projection when a target was timed."""
    n = len(result.outcome)
    for a in entry["attacks"]:
        a.update(robust_after=a.pop("robust"), forward_per_image=a["forward"] / n, backward_per_image=a["backward"] / n)
        a.pop("measure")
    attacks = entry["attacks"]
    seconds, model_s = sum(a["seconds"] for a in attacks), sum(a["model_s"] for a in attacks)
    entry.update(seconds=round(seconds, 3), forward=sum(a["forward"] for a in attacks),
                 backward=sum(a["backward"] for a in attacks), model_s=round(model_s, 3),
                 efficiency=model_s / seconds if seconds else None)
    if result.recheck is not None:
        entry["recheck"] = vars(result.recheck)
    passes = image_passes(result, num_classes)
    offset, by_stratum = 0, []
    for s in strata:
        mine = list(range(offset, offset + len(s.sample)))
        offset += len(s.sample)
        by_stratum.append(mine)
        if mine:
            total = [sum(f for f, _ in passes[i].values()) for i in mine], [sum(b for _, b in passes[i].values()) for i in mine]
            entry.setdefault("strata", []).append({
                "name": s.name, "robust": sum(result.outcome[i] == "robust" for i in mine), "sample": len(mine),
                "forward_per_image": sum(total[0]) / len(mine), "backward_per_image": sum(total[1]) / len(mine)})
    if target is None:
        return
    cost = target["per_image"]

    def seconds_of(i: int, keys=None) -> float:
        return sum(f * cost[p]["forward_s"] + b * cost[p]["backward_s"]
                   for (attack, p), (f, b) in passes[i].items() if keys is None or attack in keys)

    population = [len(s.population) for s, idx in zip(strata, by_stratum) if idx]
    groups = [idx for idx in by_stratum if idx]
    mean, half = stratified_mean([[seconds_of(i) for i in idx] for idx in groups], population)
    names = sorted({attack for p in passes for attack, _ in p})
    per_attack = {a: stratified_mean([[seconds_of(i, {a}) for i in idx] for idx in groups], population)[0]
                  for a in names}
    scale = images / world
    entry["projection"] = {"per_attack_s": {a: round(v * scale, 1) for a, v in per_attack.items()},
                           "total_s": round(mean * scale, 1),
                           "ci95_s": None if half is None else [round(max(mean - half, 0) * scale, 1),
                                                                round((mean + half) * scale, 1)],
                           "s_per_image_one_process": round(mean, 4)}


def _target_cost(name: str, img_size: int, batch_size: int, dev: torch.device, compile: bool | None, precision: str,
                 per_eps: list[dict], phases: Phases) -> dict:
    """Seconds per forward / backward image of ``name`` (random weights, ImageNet head) in each precision the
    sample's passes ran in, at the batch size (powers of two up to ``batch_size``) where the sample's mix
    of passes costs least."""
    from gnr.models import build_model

    with phases.phase(f"build {name} at {img_size} px"):
        net, _ = build_model(ModelConfig(name=name, act="keep"), 1000, img_size)
        net = net.to(dev).eval().requires_grad_(False)
    net, _ = prepare_model(net, dev, compile=compile, phases=phases)
    compile_graphs(net, img_size, batch_size, dev, phases)
    candidates = sorted({batch_size} | {2 ** k for k in range(3, 16) if 2 ** k < batch_size})
    rows = [a for entry in per_eps for a in entry["attacks"]]
    mix = (sum(a["forward"] for a in rows), sum(a["backward"] for a in rows))
    per_image, best = {}, {}
    for p in ("fp32", "bf16") if precision == "bf16" else ("fp32",):
        timed = Autocast(net) if p == "bf16" else net
        with phases.phase(f"time {name} passes ({p}) at batch sizes {', '.join(map(str, candidates))}"):
            best[p], per_image[p] = fastest_batch(timed, img_size, dev, candidates, mix)
    return {"batch_size": best[precision], **per_image[precision], "per_image": per_image}
