"""`gnr analyze curve|gradients|figures`: the paper's robustness curves, gradient statistics and figures."""

from typing import Optional

import typer

from gnr.cli.common import console, print_json

app = typer.Typer(help="Robust-accuracy curves, input-gradient statistics and figures for trained runs.",
                  no_args_is_help=True)

RUN_IDS = typer.Option([], "--run-id", help="MLflow run id; repeat or list several after one --run-id.")
MODELS = typer.Option([], "--model", help="MLflow model URI (runs:/ID/model, models:/NAME/VERSION, models:/NAME@ALIAS): "
                      "analyses the run it came from (repeatable).")
WEIGHTS = typer.Option("ema", "--weights", help="ema | raw (a run logged without EMA holds raw weights only)")
URI = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI")
DEVICE = typer.Option("auto", "--device")
OUT = typer.Option(None, "--out", help="Local output folder. Default: $GNR_HOME/analysis/<kind>/<run ids>.")
JSON = typer.Option(False, "--json", help="Print a JSON summary on stdout.")


def run_ids_of(values: list[str], extra: list[str] = (), models: list[str] = (), uri: str | None = None) -> list[str]:
    """Run ids from repeated or comma-separated ``--run-id`` values, plus the extra arguments that
    ``--run-id A B C`` leaves behind (commands that allow them), plus the source runs of ``--model`` URIs."""
    from gnr.analysis.runs import source_runs

    ids = [i for v in [*values, *extra] for i in v.replace(",", " ").split()]
    return list(dict.fromkeys(ids + (source_runs(models, uri) if models else [])))


@app.command("curve", context_settings={"allow_extra_args": True})
def curve(
    ctx: typer.Context,
    run_id: list[str] = RUN_IDS,
    model: list[str] = MODELS,
    n: int = typer.Option(1000, "--n", min=1, help="Validation images per run."),
    steps: int = typer.Option(100, "--steps", min=1, help="PGD steps per budget tried."),
    data: Optional[str] = typer.Option(None, "--data"),
    batch_size: int = typer.Option(100, "--batch-size", min=1),
    weights: str = WEIGHTS, tracking_uri: Optional[str] = URI, device: str = DEVICE,
    out: Optional[str] = OUT, as_json: bool = JSON,
) -> None:
    """Per-image minimal ε (PGD-100, step ε/4) and accuracy(ε) for ε = 0..32/255: one PNG, one CSV (Fig. 2)."""
    from gnr.analysis.curve import analyze_curve

    result = analyze_curve(run_ids_of(run_id, ctx.args, model, tracking_uri), n=n, data=data, batch_size=batch_size, steps=steps,
                           weights=weights, uri=tracking_uri, device=device, out=out)
    if as_json:
        return print_json(result)
    from gnr.cli.render import key_values

    for info in result["runs"].values():
        acc = dict(zip(result["eps_255"], info["accuracy"]))
        console.print(key_values(f"{info['label']} ({info['n']} images)", {
            "median minimal ε (/255)": info["median_min_eps_255"],
            "accuracy % at ε/255": {e: 100 * acc[e] for e in (0, 1, 2, 4, 8, 16, 32)}}))
    console.print(f"figure: {result['png']}\ncsv: {result['csv']}")


@app.command("gradients", context_settings={"allow_extra_args": True})
def gradients(
    ctx: typer.Context,
    run_id: list[str] = RUN_IDS,
    model: list[str] = MODELS,
    n: int = typer.Option(10000, "--n", min=1, help="Validation images per run."),
    eps: float = typer.Option(4.0, "--eps", help="PGD-10 budget in 1/255 for the ✓/✗ split."),
    data: Optional[str] = typer.Option(None, "--data"),
    batch_size: int = typer.Option(100, "--batch-size", min=1),
    weights: str = WEIGHTS, tracking_uri: Optional[str] = URI, device: str = DEVICE,
    out: Optional[str] = OUT, as_json: bool = JSON,
) -> None:
    """Table 1: mean per-sample ‖∇ₓℓ‖₁, conditioned on PGD-10 failing / succeeding, per channel, edge alignment."""
    from gnr.analysis.gradients import analyze_gradients

    result = analyze_gradients(run_ids_of(run_id, ctx.args, model, tracking_uri), n=n, eps=eps, data=data, batch_size=batch_size,
                               weights=weights, uri=tracking_uri, device=device, out=out)
    if as_json:
        return print_json(result)
    from gnr.cli.render import gradient_table

    console.print(gradient_table(result))
    console.print("\n".join(f for stats in result.values() for f in stats["files"]))


@app.command("figures", context_settings={"allow_extra_args": True})
def figures(
    ctx: typer.Context,
    run_id: list[str] = RUN_IDS,
    model: list[str] = MODELS,
    images: Optional[str] = typer.Option(None, "--images", help="Any folder of images. Default: the validation split."),
    k: int = typer.Option(6, "--k", min=1, help="Images shown."),
    eps: float = typer.Option(4.0, "--eps", help="PGD-10 budget in 1/255 for Fig. 3."),
    weights: str = WEIGHTS, tracking_uri: Optional[str] = URI, device: str = DEVICE,
    out: Optional[str] = OUT, as_json: bool = JSON,
) -> None:
    """Fig. 1 (images beside their loss-input gradients) and Fig. 3 (PGD-10 perturbations), one column per run."""
    from gnr.analysis.figures import analyze_figures

    result = analyze_figures(run_ids_of(run_id, ctx.args, model, tracking_uri), images=images, k=k, eps=eps, weights=weights,
                             uri=tracking_uri, device=device, out=out)
    if as_json:
        return print_json(result)
    console.print("\n".join(result["files"]))
