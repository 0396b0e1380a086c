"""`gnr data imagefolder|demo`: write WebDataset shards (original image bytes + class index) and a manifest."""

from typing import Optional

import typer

from gnr.cli.common import console

app = typer.Typer(help="Write WebDataset shards: an ImageNet folder tree, or the bundled digits demo.",
                  no_args_is_help=True)


@app.command("imagefolder")
def imagefolder(
    root: str = typer.Argument(..., metavar="ROOT", help="ImageNet-style tree: ROOT/<wnid>/*.JPEG."),
    out: str = typer.Option(..., "--out", help="Shard directory: <split>-000000.tar ... and <split>.json."),
    split: str = typer.Option(..., "--split", help="train (shuffled) | val (sorted)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Keep only the <wnid>/<file> lines of FILE, or "
                                      "'robustbench' for the standard 5000-image robustness test set."),
    class_map: Optional[str] = typer.Option(None, "--class-map", help="JSON wnid -> class index "
                                            "(default: the standard ImageNet-1k order)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard."),
    seed: int = typer.Option(0, "--seed", help="Shuffle seed of the train split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the split if OUT already holds it."),
    strict: bool = typer.Option(False, "--strict", help="Stop at a file that is not a decodable image "
                                "(default: skip it with a warning; the manifest lists it)."),
) -> None:
    """Shard an ImageNet folder tree, keeping the original JPEG bytes (no re-encoding)."""
    from gnr.data.shards import write_imagefolder

    manifest = write_imagefolder(root, out, split, ids=ids, class_map=class_map, shard_size=shard_size, seed=seed,
                                 overwrite=overwrite, progress=True, strict=strict)
    _report(manifest, out)


@app.command("demo")
def demo(
    out: str = typer.Option(..., "--out", help="Shard directory for train and val."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stratified 80/20 split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the splits if OUT already holds them."),
) -> None:
    """Shard scikit-learn's bundled handwritten digits (32x32 PNG, 10 classes): real data, no download."""
    from gnr.data.shards import write_demo

    for manifest in write_demo(out, seed=seed, overwrite=overwrite, progress=True).values():
        _report(manifest, out)


def _report(manifest, out: str) -> None:
    shards = len(manifest.shards)
    console.print(f"[green]wrote[/] {manifest.split}: {manifest.total} samples, {len(manifest.classes)} classes, "
                  f"{shards} shard{'s' * (shards != 1)} -> {out}/{manifest.split}.json", highlight=False)
    if manifest.skipped:
        console.print(f"[yellow]note:[/] skipped {len(manifest.skipped)} file(s) that are not decodable images "
                      f"(listed in {out}/{manifest.split}.json)", highlight=False)
    if manifest.ids and manifest.ids["found"] < manifest.ids["listed"]:
        console.print(f"[yellow]note:[/] {manifest.ids['listed'] - manifest.ids['found']} of the "
                      f"{manifest.ids['listed']} ids in {manifest.ids['source']} were not found under the root",
                      highlight=False)
