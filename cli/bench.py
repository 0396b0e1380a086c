"""`gnr bench loader|step`: data loader throughput; the cost of one optimizer step per method. A table,
or JSON with --json."""

from typing import Optional

import typer

from gnr.cli.common import JSON, err_console, parse_csv, show
from gnr.cli.render import bench_table, eval_bench_table, loader_table

app = typer.Typer(help="Benchmarks: data loader throughput, seconds per optimizer step, AutoAttack cost.",
                  no_args_is_help=True)


@app.command("loader")
def loader(
    data: str = typer.Option(..., "--data", help="ImageNet-style folder (ROOT/<wnid>/*.JPEG) or shard directory."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(1, "--workers"),
    img_size: int = typer.Option(224, "--img-size"),
    batches: int = typer.Option(8, "--batches", help="Batches timed per pipeline."),
    as_json: bool = JSON,
) -> None:
    """Images/s of gnr's WebDataset train pipeline beside torchvision ImageFolder, same files and transforms."""
    from gnr.bench.loader import bench_loader

    result = bench_loader(data, batch_size=batch_size, workers=workers, img_size=img_size, batches=batches)
    show(result, loader_table, as_json)


@app.command("step")
def step(
    model: str = typer.Option("resnet18", "--model"),
    img_size: int = typer.Option(224, "--img-size"),
    batch_size: int = typer.Option(32, "--batch-size", help="Even: mixup pairs the images, as in training."),
    methods: str = typer.Option("natural,gradnorm,gradnorm-fd,adversarial", "--methods", help="Add edge to time it too."),
    act: str = typer.Option("keep", "--act"),
    device: str = typer.Option("auto", "--device"),
    amp: str = typer.Option("auto", "--amp", help="auto | bf16 | fp16 | none"),
    steps: int = typer.Option(5, "--steps", help="Timed steps per method."),
    warmup: int = typer.Option(2, "--warmup"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the first-order methods, as runtime.compile."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak TFLOP/s for MFU; default: the "
                                                "GPU's datasheet value for the dtype (none on CPU)."),
    fast: bool = typer.Option(True, "--fast-double-backward/--no-fast-double-backward",
                              help="model.fast_double_backward (off: autograd's own double backward, the 'before')."),
    fast_attention: bool = typer.Option(True, "--fast-attention/--no-fast-attention",
                                        help="model.fast_attention (with the fast double backward)."),
    kernels: int = typer.Option(0, "--kernels", help="Profile one more step of --kernels-method and list its N "
                                "kernels with the most self time (CUDA kernels; aten ops on CPU)."),
    kernels_method: str = typer.Option("gradnorm", "--kernels-method"),
    as_json: bool = JSON,
) -> None:
    """Cost of one optimizer step per method: time, counted FLOPs, MFU, memory, non-matmul traffic."""
    from gnr.bench.step import bench_step

    result = bench_step(model=model, img_size=img_size, batch_size=batch_size, methods=parse_csv(methods),
                        act=act, device=device, amp=amp, steps=steps, warmup=warmup, compile=compile,
                        peak=peak_tflops, fast_double_backward=fast, fast_attention=fast_attention,
                        kernels=kernels, kernels_method=kernels_method)
    show(result, bench_table, as_json)


@app.command("eval")
def eval_(
    run_id: str = typer.Option(..., "--run-id", help="Trained run whose model is attacked (its pass counts are measured)."),
    weights: str = typer.Option("ema", "--weights", help="ema | raw"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    n: int = typer.Option(16, "--n", help="Images attacked, in one batch, sampled from --pool by clean margin."),
    pool: Optional[int] = typer.Option(None, "--pool", help="Images the sample is drawn from. Default: 4 × --n."),
    eps: str = typer.Option("4", "--eps", help="L∞ budgets in 1/255."),
    model: str = typer.Option("swin_base_patch4_window7_224", "--model", help="Model whose full evaluation is projected."),
    img_size: int = typer.Option(224, "--img-size"),
    batch_size: int = typer.Option(32, "--batch-size", help="Largest batch at which --model's passes are timed "
                                   "(and powers of two below it); the fastest is used."),
    images: int = typer.Option(5000, "--images", help="Images in the projected evaluation."),
    world: int = typer.Option(1, "--world", help="Processes (GPUs) sharing the projected evaluation."),
    device: str = typer.Option("auto", "--device"),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="Default: on CUDA."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (re-checked in fp32)."),
    project: bool = typer.Option(True, "--project/--no-project", help="Time --model and project its evaluation."),
    as_json: bool = JSON,
) -> None:
    """AutoAttack (standard, L∞) per attack and ε: seconds, efficiency, forward / backward passes, images still
    robust; and the projected cost of a full evaluation of --model, with a 95% interval. Each phase is
    reported on stderr as it starts and ends."""
    from gnr.cli.evaluate import AttackDisplay, starting

    starting("bench eval")
    from gnr.bench.eval import bench_eval
    from gnr.cli.render import ProgressReport
    from gnr.eval import parse_eps

    with ProgressReport("bench eval", err_console, transient=True) as report:
        result = bench_eval(run_id, uri=tracking_uri, weights=weights, n=n, pool=pool, eps=parse_eps(parse_csv(eps)),
                            model=model, img_size=img_size, batch_size=batch_size, images=images, world=world,
                            device=device, compile=compile, precision=precision, project=project,
                            on_event=AttackDisplay(report.bar, "bench eval"))
    show(result, eval_bench_table, as_json)
