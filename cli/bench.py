"""`gnr bench loader|step`: data loader throughput; the cost of one optimizer step per method."""

from typing import Optional

import typer

from gnr.cli.common import parse_csv, print_json

app = typer.Typer(help="Benchmarks: data loader throughput, seconds per optimizer step.", no_args_is_help=True)


@app.command("loader")
def loader(
    data: str = typer.Option(..., "--data", help="ImageNet-style folder (ROOT/<wnid>/*.JPEG) or shard directory."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(1, "--workers"),
    img_size: int = typer.Option(224, "--img-size"),
    batches: int = typer.Option(8, "--batches", help="Batches timed per pipeline."),
) -> None:
    """Images/s of gnr's WebDataset train pipeline beside torchvision ImageFolder, same files and transforms."""
    from gnr.bench.loader import bench_loader

    print_json(bench_loader(data, batch_size=batch_size, workers=workers, img_size=img_size, batches=batches))


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
    fast_attention: bool = typer.Option(False, "--fast-attention", help="model.fast_attention (opt-in)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Cost of one optimizer step per method: time, counted FLOPs, MFU, memory, non-matmul traffic."""
    from gnr.bench.step import bench_step

    result = bench_step(model=model, img_size=img_size, batch_size=batch_size, methods=parse_csv(methods),
                        act=act, device=device, amp=amp, steps=steps, warmup=warmup, compile=compile,
                        peak=peak_tflops, fast_double_backward=fast, fast_attention=fast_attention)
    if as_json:
        print_json(result)
    else:
        from gnr.cli.common import console
        from gnr.cli.render import bench_table

        console.print(bench_table(result))
