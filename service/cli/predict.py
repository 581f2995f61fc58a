"""``cbam-nas predict``: a downloaded model bundle's top classes for image files, so that a
user can check a model without writing code."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

commands = typer.Typer()


@commands.command("predict")
def predict(
    bundle: Path = typer.Argument(
        ..., help="A bundle: the folder `cbam-nas download` wrote, its .zip, or the weights file."
    ),
    images: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, ...)."),
    top: int = typer.Option(3, "--top", min=1, help="How many classes to show per image."),
    device: str = typer.Option("cpu", "--device", help="Where to run the model (cpu, cuda)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image."),
) -> None:
    """Print each image's most probable classes under the bundle's model (its preprocessing:
    channels, size and normalisation come from the bundle's model.json)."""
    import torch

    from search.bundle import BundleError, load_bundle, top_classes

    try:
        loaded, card = load_bundle(bundle, device=torch.device(device))
    except (BundleError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="BUNDLE") from None
    except RuntimeError as exc:  # e.g. a device this machine does not have
        raise typer.BadParameter(str(exc), param_hint="--device") from None
    for image in images:
        if not image.is_file():
            raise typer.BadParameter(f"no image file {image}", param_hint="IMAGES")
    try:
        found = top_classes(loaded, images, card.get("class_names"), top)
    except ValueError as exc:  # an image torchvision cannot decode
        raise typer.BadParameter(str(exc), param_hint="IMAGES") from None
    if as_json:
        for image, classes in zip(images, found, strict=True):
            best = [{"class": index, "name": name, "probability": p} for index, name, p in classes]
            typer.echo(json.dumps({"image": str(image), "top": best}))
        return
    table = Table(title=f"{card['label']} ({card['backbone']}, {card['num_classes']} classes)")
    table.add_column("image")
    for rank in range(1, min(top, card["num_classes"]) + 1):
        table.add_column(f"#{rank}")
    for image, classes in zip(images, found, strict=True):
        table.add_row(image.name, *(f"{name} {100 * p:.1f}%" for _, name, p in classes))
    Console(width=200).print(table)
