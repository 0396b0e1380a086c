"""Markdown tables from the JSON files scripts/gpu-cost.sh writes, with the cost targets (training
steps, AutoAttack); last, each model's top kernels of one gradnorm step.

Usage: python3 scripts/gpu_cost_summary.py OUT_DIR
"""

import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def step_rows(out: Path) -> list[str]:
    lines = ["| model (batch) | variant | natural s/step (MFU) | gradnorm ×nat | FLOP ratio | target ≤1.1×FLOP "
             "| gradnorm-fd ×nat (err: value, grad, pair) | PGD-3 ×nat | gradnorm / PGD-3 (≤0.62) | gradnorm peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    runs = [(load(path), path.stem) for path in out.glob("step-*.json")]
    order = ("before", "after", "after-no-attention")
    runs = [(r, stem.removeprefix(f"step-{r['model']}-")) for r, stem in runs]
    for r, variant in sorted(runs, key=lambda rv: (rv[0]["model"], order.index(rv[1]) if rv[1] in order else 9)):
        m = r["methods"]
        nat, gn, fd, adv = (m.get(k) for k in ("natural", "gradnorm", "gradnorm-fd", "adversarial"))
        mfu = f" ({nat['mfu']:.1%})" if nat.get("mfu") else ""
        ok = "yes" if gn["ratio_to_natural"] <= 1.1 * gn["flop_ratio_to_natural"] else "no"
        lines.append(
            f"| {r['model']} ({r['batch_size']}) | {variant} | {nat['sec_per_step']:.4f}{mfu} "
            f"| {gn['ratio_to_natural']:.2f} | {gn['flop_ratio_to_natural']:.2f} | {ok} "
            f"| {fd['ratio_to_natural']:.2f} ({fd['fd_rel_error']:+.1%}, {fd['fd_grad_error']:.1%}, "
            f"{fd['fd_pair_error']:.1%}) "
            f"| {adv['ratio_to_natural']:.2f} | {gn['sec_per_step'] / adv['sec_per_step']:.2f} "
            f"| {gn.get('peak_memory_mib', float('nan')):.0f} |")
    return lines


def eval_rows(out: Path) -> list[str]:
    lines = ["| precision | ε | robust | attack: seconds, efficiency (≥0.7), fwd/bwd per image, robust after "
             "| wall s | projected 5000 on 1 GPU, min (95% interval; ≤120) | on 8 (≤15) |", "|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("eval-*.json")):
        r = load(path)
        for e in r["eps"]:
            attacks = "; ".join(f"{a['attack']} {a['seconds']:.1f}s {_efficiency(a)} {a['forward_per_image']:.0f}/"
                                f"{a['backward_per_image']:.0f} →{a['robust_after']}" for a in e["attacks"])
            proj = e.get("projection")
            projected, eight = "-", "-"
            if proj:
                ci = proj["ci95_s"]
                projected = f"{proj['total_s'] / 60:.0f}" + (f" ({ci[0] / 60:.0f}..{ci[1] / 60:.0f})" if ci else "")
                eight = f"{proj['total_s'] / 60 / 8:.1f}"
            recheck = f" (re-check: {e['recheck']})" if e.get("recheck") else ""
            lines.append(f"| {r['precision']}{recheck} | {e['eps_255']}/255 | {e['robust']}/{r['n']} "
                         f"| {attacks} | {e['seconds']:.1f} | {projected} | {eight} |")
    return lines


def _efficiency(attack: dict) -> str:
    return "-" if attack.get("efficiency") is None else f"{attack['efficiency']:.2f}"


# Log lines that mean a fused level 2 ran unfused for some shapes: the "after" timing is then not
# the fast path's (gnr/doublegrad/fused.py warns on a compiler failure, dynamo on its recompile limit).
UNFUSED = ("running it unfused", "recompile_limit")


def unfused_warnings(out: Path) -> list[str]:
    return [f"WARNING {log.name}: {line.strip()}" for log in sorted(out.glob("*.log"))
            for line in log.read_text(errors="replace").splitlines() if any(u in line for u in UNFUSED)]


def kernel_tables(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("step-*-after.json")):
        r = load(path)
        for method, row in r["methods"].items():
            if "kernels" not in row:
                continue
            k = row["kernels"]
            lines += ["", f"{r['model']} ({r['batch_size']}): top kernels of one {method} step, {k['unit']}, "
                          f"{k['total_ms']:.1f} ms in all", "| kernel | self ms | % | calls |", "|---|---|---|---|"]
            lines += [f"| {e['name'][:100]} | {e['self_ms']:.3f} | {100 * e['share']:.1f} | {e['calls']} |"
                      for e in k["top"]]
    return lines


def main(out: Path) -> None:
    header = next((load(p) for p in sorted(out.glob("step-*.json"))), None)
    if header:
        print(f"device: {header['device']}, torch {header['torch']}, timm {header['timm']}, {header['dtype']}")
    print("\n".join(step_rows(out)))
    print()
    print("\n".join(eval_rows(out)))
    print("\n".join(kernel_tables(out)))
    print()
    print("\n".join(unfused_warnings(out)) or "no level-2 kernel ran unfused")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
