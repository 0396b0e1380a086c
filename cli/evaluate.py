"""`gnr eval`: clean / PGD / AutoAttack accuracy of a run, logged back into the same MLflow run."""

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from gnr.cli.common import JSON, MODEL_URI_SCHEMES, SET_HELP, console, err_console, parse_csv, print_json


def evaluate(
    run_id: Optional[str] = typer.Option(None, "--run-id", help="MLflow run whose weights to evaluate.",
                                         envvar="GNR_RUN_ID"),
    weights: str = typer.Option("ema", "--weights", help="ema | raw (the run's) or a local .safetensors/.pt file "
                                "(evaluated as a new run; pair with --model / --preset / --set)."),
    data: Optional[str] = typer.Option(None, "--data", help="Shard directory or URL prefix. Default: the run's."),
    split: Optional[str] = typer.Option(None, "--split", help="Default: the run's data.val_split."),
    ids: Optional[str] = typer.Option(None, "--ids", help="robustbench (the 5000 RobustBench ImageNet ids) or a file."),
    n: Optional[int] = typer.Option(None, "--n", "--limit", min=1,
                                    help="Evaluate the first N images (spell it --limit under torchrun, which claims --n)."),
    attacks: str = typer.Option("clean,pgd10,autoattack", "--attacks", help="Any of clean, pgd<steps>, autoattack."),
    eps: Optional[str] = typer.Option(None, "--eps", help="L∞ budgets in 1/255, e.g. 1,2,4. Default: the run's "
                                      "eval.eps (8 for the demo preset, 4 for swin-b)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Default: from free GPU memory on CUDA, else 100."),
    device: str = typer.Option("auto", "--device"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the model under attack. Default: on CUDA."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (exact) | bf16: AutoAttack's iterations in bf16, "
                                  "every verdict re-checked in fp32, disagreements re-attacked in fp32."),
    profile: bool = typer.Option(False, "--profile", help="Also print seconds, passes and efficiency per attack and "
                                 "ε (what its passes alone cost, timed after the run, over its wall time)."),
    seed: int = typer.Option(0, "--seed", help="PGD random starts and AutoAttack's seed."),
    model: Optional[str] = typer.Option(None, "--model", help="An MLflow model to evaluate instead of --run-id "
                                        "(runs:/ID/model, models:/NAME/VERSION, models:/NAME@ALIAS; results go to "
                                        "the run it came from); with --weights PATH: the timm model name."),
    preset: str = typer.Option("demo", "--preset", "-p", help="With --weights PATH: preset for data / model."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="With --weights PATH: experiment of the new run."),
    submit: bool = typer.Option(False, "--submit", help="Run this evaluation as a cluster job instead."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="With --submit: GPUs (torchrun processes)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="With --submit: Kubernetes namespace."),
    image: Optional[str] = typer.Option(None, "--image", help="With --submit: container image."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --submit: print what would be submitted."),
    as_json: bool = JSON,
) -> None:
    """Evaluate a run's weights and log [bold]eval/*[/] metrics, sanity checks and a per-image CSV into it."""
    quiet = as_json or os.environ.get("RANK", "0") != "0"
    if not (quiet or submit):
        starting("eval")
    from gnr.errors import GnrError
    from gnr.eval import EvalSpec, model_source, parse_attacks, parse_eps

    external = weights not in ("ema", "raw")
    if model and model.startswith(MODEL_URI_SCHEMES):
        if run_id or external:
            raise GnrError("--model URI names the run and its weights: leave out --run-id and --weights PATH")
        run_id, weights = model_source(model, tracking_uri)
    if not external and not run_id:
        raise GnrError("name the run to evaluate with --run-id ID or --model URI (or pass --weights PATH)")
    # eps (): the run's own budget, resolved once the run's config is at hand (in the pod for --submit)
    spec = EvalSpec(attacks=parse_attacks(parse_csv(attacks)), eps=parse_eps(parse_csv(eps)) if eps is not None else (),
                    weights="file" if external else weights, data=data, split=split, ids=ids, n=n,
                    batch_size=batch_size, device=device, seed=seed, compile=compile, precision=precision)
    if submit:
        return _submit(run_id, spec, gpus=gpus, namespace=namespace, image=image, dry_run=dry_run)

    on_batch, progress = _progress_bar(quiet)
    on_event = None if quiet else AttackDisplay(progress.bar)  # the live bar, or None: plain lines
    with progress:
        if external:
            from gnr.config import build_config
            from gnr.eval import evaluate_external

            cfg = build_config(preset=preset, overrides=overrides, fields={
                "model.name": model, "tracking.uri": tracking_uri, "tracking.experiment": experiment})
            result = evaluate_external(Path(weights), cfg, _with_run_eps(spec, lambda: cfg), on_batch=on_batch,
                                       on_event=on_event, profile=profile)
        else:
            from gnr.eval import evaluate as run_eval
            from gnr.tracking import load_run_config

            spec = _with_run_eps(spec, lambda: load_run_config(run_id, tracking_uri))
            result = run_eval(run_id, spec, uri=tracking_uri, on_batch=on_batch, on_event=on_event, profile=profile)
    if not result.is_main:
        return
    if as_json:
        print_json(result.summary())
    else:
        from gnr.cli.render import eval_summary

        console.print(eval_summary(result))
        if profile or result.rechecks:
            console.print(attack_profile(result))


def starting(name: str) -> None:
    """The first line, before torch and the model code load (seconds, more on a busy machine)."""
    err_console.print(f"{name}: starting: loading torch and gnr", highlight=False, markup=False, soft_wrap=True)


def _with_run_eps(spec, run_config):
    """Without --eps: the budget the run was trained and scored at (its eval.eps), in 1/255."""
    return spec if spec.eps else replace(spec, eps=(round(run_config().eval.eps * 255, 4),))


def _progress_bar(quiet: bool):
    """Images done / total, running accuracies, img/s and ETA on stderr (a bar on a terminal, else plain
    lines at a steady interval); nothing for --json or torchrun ranks > 0."""
    from contextlib import nullcontext

    if quiet:
        return None, nullcontext()
    from gnr.cli.render import ProgressReport, percent

    report = ProgressReport("eval", err_console, unit="images", transient=True)

    def on_batch(p) -> None:
        acc = "  ".join(f"{k} {percent(v)}" for k, v in p.accuracy.items())
        report.update(p.done, p.total, acc, images_per_s=None if p.resumed else p.images_per_s)

    return on_batch, report


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class AttackDisplay:
    """Renders the core's events: each phase (start, still running, end with its wall time), the plan and
    per-attack progress. On a terminal the current phase and attack are live lines on the progress bar
    and each finished phase is printed above it; elsewhere each event is a plain line on stderr."""

    def __init__(self, progress=None, name: str = "eval"):
        self.progress, self.name = progress, name
        self.task = self.phase_task = None

    def __call__(self, event) -> None:
        from gnr.eval import EvalPlan, Phase

        if isinstance(event, Phase):
            return self._phase(event)
        if isinstance(event, EvalPlan):
            least, most = event.projected_s
            s = event.settings
            self._line(
                f"{self.name}: {event.images} images on {event.device} (x{event.world}), batch {event.batch_size}, "
                f"compile {'on' if s.get('compile') else 'off'}, channels-last {'on' if s.get('channels_last') else 'off'}, "
                f"{s.get('precision', 'fp32')}; projected {_duration(least)} .. {_duration(most)} "
                "(every image broken by APGD-CE .. every image robust)")
            return
        robust = f"robust {event.robust}/{event.done} ({100 * event.robust / max(event.done, 1):.1f}%)"
        eta = f"ETA {_duration(event.eta_s)}"
        if self.progress is None:
            self._line(f"{event.measure} {event.attack}: {event.done}/{event.total} images, {robust}, "
                       f"{_duration(event.elapsed_s)} elapsed, {eta}")
            return
        if self.task is None:
            self.task = self.progress.add_task("attack", total=event.total, speed="", info="")
        self.progress.update(self.task, description=f"{event.measure} {event.attack}", completed=event.done,
                             total=event.total, speed=eta, info=robust)

    def _phase(self, event) -> None:
        detail = f" ({event.detail})" if event.detail else ""
        if event.state == "end":
            self._line(f"{self.name}: {event.name}: done in {event.elapsed_s:.1f} s")
        elif self.progress is None:
            self._line(f"{self.name}: {event.name}: " + ("started" if event.state == "start" else
                                                          f"running for {_duration(event.elapsed_s)}{detail}"))
        if self.progress is not None and event.state != "end":
            if self.phase_task is None:
                self.phase_task = self.progress.add_task(event.name, total=None, speed="", info="")
            info = "" if event.state == "start" else f"{_duration(event.elapsed_s)}{detail}"
            self.progress.update(self.phase_task, description=event.name, info=info)

    def _line(self, text: str) -> None:
        console = self.progress.console if self.progress is not None else err_console
        console.print(text, highlight=False, markup=False, soft_wrap=True)


def efficiency_cells(row: dict) -> tuple[str, str]:
    """A profiled attack's passes-alone seconds and efficiency, or dashes where not measured."""
    if row.get("efficiency") is None:
        return "-", "-"
    return f"{row['model_s']:.1f}", f"{row['efficiency']:.2f}"


def attack_profile(result):
    """Per measure: each attack's images, still robust, seconds, passes per attacked image and, with --profile,
    its passes-alone seconds and efficiency; bf16 re-checks."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    lines = []
    for measure in dict.fromkeys(r["measure"] for r in result.attacks):
        table = Table(title=f"{measure} ({result.settings.get('precision', 'fp32')})", title_justify="left")
        for col in ("attack", "img", "robust", "s", "fwd/img", "bwd/img", "passes s", "eff."):
            table.add_column(col, justify="left" if col == "attack" else "right")
        for r in (r for r in result.attacks if r["measure"] == measure):
            n = max(r["images"], 1)
            name = r["attack"] + ("" if r["precision"] == result.settings.get("precision", "fp32") else
                                  f" ({r['precision']})")
            table.add_row(name, str(r["images"]), str(r["robust"]), f"{r['seconds']:.1f}", f"{r['forward'] / n:.0f}",
                          f"{r['backward'] / n:.0f}", *efficiency_cells(r))
        lines.append(table)
    if any(r.get("efficiency") is not None for r in result.attacks):
        lines.append(Text("eff.: the attack's passes alone (each call × the model's time at that batch size, "
                          "passes s) over its wall time (s)"))
    for measure, c in result.rechecks.items():
        lines.append(Text(f"{measure}: fp32 re-check of {c['checked']} bf16 verdicts: {c['agreed']} agreed, "
                          f"{c['disagreed']} re-attacked in fp32, {c['flipped']} changed"))
    return Group(*lines)


def _submit(run_id: Optional[str], spec, *, gpus: int, namespace: Optional[str], image: Optional[str],
            dry_run: bool) -> None:
    """Install the chart's eval job: the same evaluation under torchrun, one process per GPU."""
    from gnr.cli.submit import show, submit_eval
    from gnr.errors import GnrError

    if not run_id or spec.weights == "file":
        raise GnrError("--submit evaluates a run's weights: pass --run-id (and --weights ema or raw)")
    show(submit_eval(run_id, gpus=gpus, namespace=namespace, image=image, extra_args=pod_args(spec),
                     dry_run=dry_run), dry_run=dry_run)


def pod_args(spec) -> list[str]:
    """`gnr eval` options reproducing ``spec`` in the pod (``--limit``: torchrun claims ``--n``)."""
    args = ["--weights", spec.weights, "--attacks", ",".join(spec.attacks),
            *(["--eps", ",".join(f"{e:g}" for e in spec.eps)] if spec.eps else []),  # none: the pod takes the run's
            "--seed", str(spec.seed), "--precision", spec.precision]
    if spec.compile is not None:
        args.append("--compile" if spec.compile else "--no-compile")
    for flag, value in (("--data", spec.data), ("--split", spec.split), ("--ids", spec.ids), ("--limit", spec.n),
                        ("--batch-size", spec.batch_size)):
        if value is not None:
            args += [flag, str(value)]
    return args
