"""Rich renderings of core results (the core returns data; only the CLI draws)."""

import math
import os
import time

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from gnr.errors import GnrError


def percent(accuracy: float) -> str:
    """Accuracy (a fraction) as gnr shows it everywhere: a percentage with two decimals."""
    return f"{100 * accuracy:.2f}%"


def _g3(value: float) -> str:
    return f"{value:.3g}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_summary(result) -> Table:
    status_style = {"FINISHED": "green", "KILLED": "yellow"}.get(result.status, "red")
    table = Table(title=f"gnr train {result.method}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("run id", result.run_id),
        ("status", f"[{status_style}]{result.status}[/]"),
        ("model", f"{result.model} (act: {result.act})"),
        ("steps / epochs", f"{result.steps} / {result.epochs:.2f}"),
        ("seconds per step", _fmt(result.sec_per_step)),
        ("wall time", f"{result.elapsed_s:.1f} s"),
    ]
    rows += [(name.replace("holdout/", "held-out "), percent(v) if name.endswith("_acc") else _fmt(v))
             for name, v in result.metrics.items() if name.startswith("holdout/")]
    rows += [(label, value) for label, value in (("MLflow model", result.model_uri), ("registered", result.registered))
             if value]
    rows += [("tracking", result.tracking_uri), ("open the UI", f"[cyan]{result.ui_command}[/]")]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def bench_table(result: dict) -> Table | Group:
    """One row per method; ratios are to natural; ``*`` marks a compiled step. Then the profiled
    method's top kernels, if ``--kernels`` asked for them."""
    peak = f"peak {result['peak_tflops']:g} TFLOP/s" if result.get("peak_tflops") else "MFU n/a: no known peak"
    table = Table(title=f"gnr bench step: {result['model']} {result['img_size']} px, batch {result['batch_size']}, "
                        f"{result['dtype']}, {result['device']}, {peak}", title_justify="left",
                  caption=f"* compiled. ¹ written by non-matmul ops: MB per image, ops per step. ² gradnorm-fd against "
                          f"exact gradnorm, relative error of the penalty's value / its parameter gradient per step / "
                          f"the mean gradient of a +h, -h pair. "
                          f"Memory: {result['memory']}. Explicit double backward: {result.get('fast_layers') or 'off'}.",
                  caption_justify="left")
    for col in ("method", "s/step", "×nat", "GFLOP/img", "FLOP×nat", "TFLOP/s", "MFU", "MiB", "MB/img¹",
                "ops¹", "FD err²"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col == "method")
    def ratio(value) -> str:
        return f"{value:.2f}" if value else "-"

    for method, row in result["methods"].items():
        mfu = row.get("mfu")
        fd = (f"{row['fd_rel_error']:+.2%} / {row['fd_grad_error']:.1%} / {row['fd_pair_error']:.1%}"
              if "fd_rel_error" in row else "")
        table.add_row(method + ("*" if row.get("compiled") else ""), f"{row['sec_per_step']:.3g}",
                      ratio(row.get("ratio_to_natural")), f"{row['gflop_per_image']:.3g}",
                      ratio(row.get("flop_ratio_to_natural")), f"{row['tflops']:.3g}",
                      "n/a" if mfu is None else f"{100 * mfu:.1f}%", f"{row['peak_memory_mib']:.0f}",
                      f"{row['nonmatmul_mb_per_image']:.3g}", str(row["nonmatmul_ops"]),
                      fd)
    profiled = [(method, row["kernels"]) for method, row in result["methods"].items() if "kernels" in row]
    return Group(table, *(kernels_table(method, k) for method, k in profiled)) if profiled else table


def kernels_table(method: str, kernels: dict) -> Table:
    table = Table(title=f"top kernels of one {method} step ({kernels['unit']}, {kernels['total_ms']:.1f} ms in all)",
                  title_justify="left")
    for col in ("kernel", "self ms", "%", "calls"):
        table.add_column(col, justify="left" if col == "kernel" else "right", overflow="fold")
    for k in kernels["top"]:
        table.add_row(k["name"], f"{k['self_ms']:.3f}", f"{100 * k['share']:.1f}", str(k["calls"]))
    return table


def loader_table(result: dict) -> Table:
    table = Table(title=f"gnr bench loader: {result['images']} images of {result['data']}, "
                        f"batch {result['batch_size']}, {result['workers']} worker(s), {result['img_size']} px",
                  title_justify="left")
    for col in ("pipeline", "img/s", "img/s per worker", "img per CPU-s"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for name in ("gnr_webdataset", "torchvision_imagefolder"):
        row = result[name]
        table.add_row(name, *(_fmt(row[k]) for k in ("images_per_s", "images_per_s_per_worker", "images_per_cpu_s")))
    ratio = result["ratio_gnr_to_imagefolder"]
    table.add_row("gnr / imagefolder", f"{ratio['images_per_s']:.2f}x", "", f"{ratio['images_per_cpu_s']:.2f}x")
    return table


def eval_bench_table(result: dict):
    """`gnr bench eval`: one row per ε and attack (seconds, efficiency, passes), the sample's strata, then the
    projection of the full evaluation with its 95% interval."""
    from rich.console import Group
    from rich.text import Text

    proj = result["projected_model"]
    n = result["n"]
    lines = [Text(f"AutoAttack on {n} images of run {result['run_id']} ({result['run_model']['name']}, "
                  f"{result['clean']} clean-correct; sampled from {result['pool']} by clean margin) on "
                  f"{result['device']}, {result['precision']}, compile {'on' if result['compile'] else 'off'}",
                  style="bold")]
    for e in result["eps"]:
        table = Table(title=f"ε = {e['eps_255']:g}/255: {e['robust']}/{n} robust", title_justify="left")
        for col in ("attack", "img", "robust", "s", "eff.", "fwd/img", "bwd/img", *(["proj. s"] if proj else [])):
            table.add_column(col, justify="left" if col == "attack" else "right")
        for a in e["attacks"]:
            table.add_row(a["attack"] + ("" if a["precision"] == result["precision"] else f" ({a['precision']})"),
                          str(a["images"]), str(a["robust_after"]), f"{a['seconds']:.1f}", _eff(a["efficiency"]),
                          f"{a['forward_per_image']:.0f}", f"{a['backward_per_image']:.0f}",
                          *([f"{e['projection']['per_attack_s'].get(a['attack'], 0):.0f}"] if proj else []))
        table.add_row("total", str(n), str(e["robust"]), f"{e['seconds']:.1f}", _eff(e["efficiency"]),
                      f"{e['forward'] / n:.0f}", f"{e['backward'] / n:.0f}",
                      *([f"{e['projection']['total_s']:.0f}"] if proj else []), style="bold")
        lines.append(table)
    lines.append(Text("eff.: the attack's passes alone (each call × the model's time at that batch size) over its "
                      "wall time s; fwd/bwd per sampled image"))
    for e in result["eps"]:
        strata = "; ".join(f"{s['name']} {s['robust']}/{s['sample']} robust, {s['forward_per_image']:.0f} / "
                           f"{s['backward_per_image']:.0f}" for s in e.get("strata", []))
        lines.append(Text(f"ε={e['eps_255']:g} per stratum (robust of sampled, fwd / bwd passes per image): {strata}"))
        if "recheck" in e:
            r = e["recheck"]
            lines.append(Text(f"ε={e['eps_255']:g}: fp32 re-check of {r['checked']}: {r['agreed']} agreed, "
                              f"{r['disagreed']} re-attacked in fp32, {r['flipped']} changed"))
    if proj:
        lines.append(Text(f"projected: {proj['images']} images of {proj['name']} at {proj['img_size']} px on "
                          f"{proj['world']} x {result['device']}, batch {proj['batch_size']} "
                          f"({1e3 * proj['forward_s']:.2f} / {1e3 * proj['backward_s']:.2f} ms per image forward / "
                          "backward), the passes alone, 95% interval from the stratified sample:", style="bold"))
        for e in result["eps"]:
            p = e["projection"]
            lines.append(Text(f"  ε={e['eps_255']:g}/255: {p['total_s'] / 60:.1f} min ({_interval(p['ci95_s'])}), "
                              f"{p['s_per_image_one_process']:.3f} s per image per process", style="bold"))
        if len(result["eps"]) > 1:
            cis = [e["projection"]["ci95_s"] for e in result["eps"]]
            summed = None if None in cis else [sum(c[0] for c in cis), sum(c[1] for c in cis)]
            lines.append(Text(f"  all {len(cis)} budgets: {sum(e['projection']['total_s'] for e in result['eps']) / 60:.1f}"
                              f" min ({_interval(summed)}{', the ends summed' if summed else ''})", style="bold"))
    return Group(*lines)


def _eff(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _interval(seconds: list[float] | None) -> str:
    if seconds is None:
        return "no interval: sample at least two images per stratum (--n ≥ 8)"
    return f"95% interval {seconds[0] / 60:.1f} .. {seconds[1] / 60:.1f} min"


def eval_summary(result):
    """Accuracy per measure, then the sanity verdict: failed checks are shown in red, one per line."""
    from rich.console import Group
    from rich.text import Text

    table = Table()
    table.add_column("measure")
    table.add_column("accuracy", justify="right")
    for name, acc in result.accuracy.items():
        table.add_row(name, percent(acc))
    head = Text(f"gnr eval of run {result.run_id}: {result.n} images, {result.weights} weights", style="bold")
    logged = result.logged
    lines = [head, table, Text(f"resumed {result.resumed_batches} of {result.batches} batches; "
                               f"{result.elapsed_s:.1f} s; logged as {result.metric_prefix}/* with "
                               f"{result.metric_prefix}/per_image.csv, which now holds {logged.get('n', result.n)} "
                               f"images × {len(logged.get('accuracy', result.accuracy))} measures "
                               "(every evaluation of this run under that name)")]
    if result.warnings:
        lines += [Text(f"warning: {w}", style="bold red") for w in result.warnings]
    else:
        lines.append(Text("sanity checks passed (large-ε accuracy ~0, more steps and AutoAttack not above PGD)",
                          style="green"))
    return Group(*lines)


def report_table(table) -> Table:
    out = Table(title=table.title, title_justify="left", caption="\n".join(table.notes) or None)
    for col in table.columns:
        text = col in ("run", "method", "model", "act", "sanity")
        out.add_column(col, justify="left" if text else "right", overflow="fold")
    for row in table.rows:
        out.add_row(*row)
    return out


def key_values(title: str, values: dict) -> Table:
    """A two-column table of an analysis' numbers (nested dicts flattened one level)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in values.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                table.add_row(f"{name} {sub}", _fmt(v))
        else:
            table.add_row(name, _fmt(value))
    return table


def gradient_table(results: dict) -> Table:
    """The paper's Table 1 columns per run, plus the R/G/B shares of the L1 norm and edge alignment."""
    table = Table(title="Input-gradient statistics (Table 1)", title_justify="left")
    columns = [("clean", "clean_acc", percent), ("PGD10", "pgd10_acc", percent), ("E[L1]", "l1_mean", _g3),
               ("E[L1|✓]", "l1_mean_robust", _g3), ("E[L1|✗]", "l1_mean_broken", _g3),
               ("edge r", "edge_corr_mean", _g3)]
    table.add_column("run", no_wrap=True)
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    table.add_column("RGB %", justify="right")
    for s in results.values():
        shares = "/".join(f"{100 * s[f'l1_share_{c}']:.0f}" for c in "RGB")
        table.add_row(s["label"], *(show(s[key]) for _, key, show in columns), shares)
    return table


PROGRESS_INTERVAL_ENV = "GNR_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL_S = 15.0


def plain_output(console: Console) -> bool:
    """Plain lines instead of live bars: not a terminal (a log file, a pod, CI), TERM=dumb, or NO_COLOR."""
    return not console.is_terminal or console.is_dumb_terminal or bool(os.environ.get("NO_COLOR"))


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$GNR_PROGRESS_INTERVAL``, default 15."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_PROGRESS_INTERVAL_S
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise GnrError(f"{PROGRESS_INTERVAL_ENV} must be a number of seconds, e.g. 15 (got '{raw}')")
    return seconds


def duration(seconds: float | None) -> str:
    """h:mm:ss (or ? when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressReport:
    """The one progress display of `gnr train` and `gnr eval`, on the console it is given (stderr).

    On a terminal: a live rich bar. Elsewhere, or with NO_COLOR / TERM=dumb: a plain line at a steady
    interval (``$GNR_PROGRESS_INTERVAL`` seconds, default 15) with done/total, the caller's info,
    img/s and ETA, so that `gnr train > log 2>&1` is never silent. ``images_per_unit`` turns units
    of progress (optimizer steps) into images; rate and ETA restart when ``phase`` changes.
    """

    def __init__(self, name: str, console: Console, *, unit: str = "", images_per_unit: float = 1.0,
                 interval: float | None = None, transient: bool = False):
        self.name, self.unit, self.console, self.images_per_unit = name, unit, console, images_per_unit
        self.interval = progress_interval() if interval is None else interval
        self.plain = plain_output(console)
        self.bar = None if self.plain else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=transient)
        self.task = None
        self.phase: str | None = None
        self.started = self.last_line = time.monotonic()
        self.baseline: tuple[float, int] | None = None  # (time, done) of the first update of this phase
        self.pending: str | None = None  # the latest plain line not printed yet

    def __enter__(self) -> "ProgressReport":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.pending:
            self._print(self.pending)
            self.pending = None

    def update(self, done: int, total: int | None, info: str = "", *, phase: str | None = None,
               images_per_s: float | None = None) -> None:
        """``done`` of ``total`` units; ``images_per_s`` when the caller measures it better (e.g. resumed batches)."""
        now = time.monotonic()
        if self.baseline is None or phase != self.phase:
            self.phase, self.baseline = phase, (now, done)
        t0, done0 = self.baseline
        units_per_s = (done - done0) / (now - t0) if now > t0 and done > done0 else None
        if images_per_s and self.images_per_unit:
            units_per_s = images_per_s / self.images_per_unit
        elif units_per_s:
            images_per_s = units_per_s * self.images_per_unit
        eta = (total - done) / units_per_s if total and units_per_s else None
        speed = f"{images_per_s:.1f} img/s" if images_per_s else ""
        label = f"{self.name} {phase}" if phase else self.name
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(label, total=total, completed=done, info=info, speed=speed)
            self.bar.update(self.task, description=label, completed=done, total=total, info=info, speed=speed)
            return
        pct = f" ({100 * done / total:.1f}%)" if total else ""
        parts = [f"{label} {self.unit} {done}/{total if total else '?'}{pct}".replace("  ", " "), info, speed,
                 f"ETA {duration(eta)}", f"elapsed {duration(now - self.started)}"]
        self.pending = " | ".join(p for p in parts if p)
        if now - self.last_line >= self.interval:
            self._print(self.pending)
            self.pending = None

    def note(self, text: str) -> None:
        """A line that is printed at once (e.g. a held-out result), above the bar on a terminal."""
        self._print(f"{self.name}: {text}")

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.last_line = time.monotonic()


class TrainProgress:
    """The trainer's events (step losses, held-out accuracy) on a :class:`ProgressReport`."""

    def __init__(self, console: Console):
        self.report = ProgressReport("train", console, unit="step")

    def __enter__(self) -> "TrainProgress":
        self.report.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.report.__exit__(*exc)

    def update(self, event: dict) -> None:
        if "holdout" in event:
            h = event["holdout"]
            self.report.note(f"epoch {event['epoch']:.2f} held-out clean {percent(h['clean_acc'])} "
                             f"pgd {percent(h['pgd_acc'])}")
            return
        self.report.images_per_unit = event.get("images", 0)
        self.report.update(event["update"], event["total"], f"epoch {event['epoch']:.2f} loss {event['loss']:.4f}")
