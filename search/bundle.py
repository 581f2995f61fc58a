"""A trained model handed over: its card (``model.json``), the bundle's files, and loading it.

A bundle is a folder or a ``.zip`` with ``weights.safetensors`` and ``model.json``, the card:
the backbone and the architecture, ``num_classes``, ``in_channels``, the input size, the
preprocessing (channels, resize, the training images' mean and std), class names where the
dataset has them, the dataset and spec it came from, the seed(s) and the metrics with their
uncertainty. The safetensors header carries the same card (under :data:`CARD_KEY`), so the
weights file alone is enough too. Loading needs no database and no spec::

    from search import load_model
    model, preprocess = load_model("best/")          # nn.Module in eval mode, its inputs
    probabilities = model(preprocess("cat.png")).softmax(-1)
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from search.build import INPUT_NAME, OUTPUT_NAME, build_model
from search.preprocessing import ImageLike, Preprocess
from search.space import Architecture

FORMAT = "cbam-nas-model"
FORMAT_VERSION = 1
CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
README_FILE = "README.md"
CARD_KEY = "cbam_nas.model"
"""The safetensors metadata key holding the card (metadata values are strings: its JSON)."""


class BundleError(ValueError):
    """The path is not a bundle this version can load, or its weights do not fit its card."""


class LoadedModel(NamedTuple):
    model: nn.Module
    preprocess: Preprocess


def model_card(
    architecture: Architecture,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    dataset: Mapping[str, Any] | None = None,
    trial: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of a trained model; the search (its id, spec, seeds and evidence) is added by
    :func:`with_search` when the bundle is made."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    preprocess = Preprocess(input_size, in_channels, tuple(mean), tuple(std))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": architecture.backbone,
        "architecture": architecture.to_dict(),
        "label": architecture.describe(),
        "arch_id": architecture.id,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": [input_size, input_size],
        "preprocessing": preprocess.to_dict(),
        "class_names": None if class_names is None else list(class_names),
        "inputs": {"name": INPUT_NAME, "shape": ["batch", in_channels, input_size, input_size]},
        "outputs": {"name": OUTPUT_NAME, "shape": ["batch", num_classes]},
        "dataset": dict(dataset or {}),
        "trial": dict(trial or {}),
        "metrics": dict(metrics or {}),
    }


def with_search(
    card: Mapping[str, Any],
    *,
    search_id: str,
    spec: Mapping[str, Any],
    seeds: Sequence[int] = (),
    evidence: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``card`` with the search it came from: its id and spec, the seeds the architecture ran
    on, and the evidence behind its figures (means over seeds, intervals, verdicts)."""
    out = dict(card)
    out.update(search_id=search_id, spec=dict(spec), seeds=sorted(set(seeds)))
    out["metrics"] = {**card.get("metrics", {}), **(evidence or {})}
    return out


def bundle_files(card: Mapping[str, Any], weights: Mapping[str, Tensor]) -> dict[str, bytes]:
    """The bundle's own files: the weights with the card in their header, the card, a README."""
    from safetensors.torch import save

    text = json.dumps(card, indent=1, sort_keys=False)
    return {
        WEIGHTS_FILE: save(dict(weights), metadata={CARD_KEY: json.dumps(card)}),
        CARD_FILE: (text + "\n").encode(),
        README_FILE: bundle_readme(card).encode(),
    }


def bundle_readme(card: Mapping[str, Any]) -> str:
    """How to use the bundle, with the card's main facts."""
    metrics = card.get("metrics", {})
    accuracy = metrics.get("val_accuracy_mean", metrics.get("val_accuracy"))
    interval = metrics.get("val_accuracy_ci95")
    figure = "unknown" if accuracy is None else f"{100 * accuracy:.2f} %"
    if interval:
        figure += f" (95 % interval {100 * interval[0]:.2f} to {100 * interval[1]:.2f} %)"
    seeds = card.get("seeds") or [card.get("trial", {}).get("seed")]
    names = card.get("class_names")
    size = card["input_size"]
    lines = [
        f"# {card['label']} on {card['backbone']}",
        "",
        f"A model found by cbam-nas (search {card.get('search_id', 'unknown')}).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{json.dumps(card['architecture'])}` |",
        f"| classes | {card['num_classes']}{_named(names)} |",
        f"| input | {card['in_channels']} x {size[0]} x {size[1]}, "
        f"{card['preprocessing']['normalisation']} |",
        f"| validation accuracy | {figure}, seeds {', '.join(map(str, seeds))} |",
        f"| dataset | `{json.dumps(card.get('dataset', {}))}` |",
        "",
        "## Load it",
        "",
        "```python",
        "from search import load_model  # pip install cbam-nas",
        'model, preprocess = load_model("this-folder-or.zip")',
        'probabilities = model(preprocess(["a.png", "b.jpg"])).softmax(-1)',
        "```",
        "",
        "`preprocess` converts to the model's channels, resizes to its input size (bilinear,",
        "antialiased) and normalises with the training images' mean and std (model.json,",
        "`preprocessing`). From the command line: `cbam-nas predict this-folder a.png b.jpg`.",
        "",
        f"`{WEIGHTS_FILE}` holds the weights, its header the same card as `{CARD_FILE}` (key",
        f"`{CARD_KEY}`). Where the bundle has `model.onnx`: input `{INPUT_NAME}` (float32,",
        f"batch x {card['in_channels']} x {size[0]} x {size[1]}, preprocessed as above), output",
        f"`{OUTPUT_NAME}`, any batch size.",
        "",
    ]
    return "\n".join(lines)


def _named(names: Sequence[str] | None, shown: int = 10) -> str:
    if not names:
        return ""
    return f": {', '.join(map(str, names[:shown]))}{' ...' if len(names) > shown else ''}"


def read_card(path: str | Path) -> dict[str, Any]:
    """The card of the bundle at ``path`` (a folder, a .zip or a weights file)."""
    return _open(Path(path))[0]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of the bundle at ``path`` (a folder, a .zip, or its ``weights.safetensors``
    alone) in eval mode on ``device``, and the :class:`Preprocess` its inputs need."""
    return load_bundle(path, device)[0]


def load_bundle(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[LoadedModel, dict[str, Any]]:
    """:func:`load_model` and the bundle's card, from one read of the bundle."""
    card, weights = _open(Path(path))
    architecture = Architecture.from_dict(card["architecture"])
    model = build_model(architecture, int(card["num_classes"]), int(card["in_channels"]))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"the weights of {path} do not fit its card ({card['label']}): missing "
            f"{missing[:5] or 'none'}, unexpected {unexpected[:5] or 'none'}"
        )
    model.load_state_dict(weights, strict=True)
    return LoadedModel(model.eval().to(device), preprocess_of(card)), card


def preprocess_of(card: Mapping[str, Any]) -> Preprocess:
    pre = card["preprocessing"]
    return Preprocess(
        int(card["input_size"][0]), int(card["in_channels"]), tuple(pre["mean"]), tuple(pre["std"])
    )


@torch.inference_mode()
def top_classes(
    loaded: LoadedModel,
    images: Sequence[ImageLike],
    class_names: Sequence[str] | None = None,
    top: int = 5,
) -> list[list[tuple[int, str, float]]]:
    """Per image, its ``top`` classes as (index, name, probability), most probable first."""
    model, preprocess = loaded
    device = next(model.parameters()).device
    probabilities = model(preprocess(list(images)).to(device)).float().softmax(-1).cpu()
    values, indices = probabilities.topk(min(top, probabilities.shape[-1]), dim=-1)
    return [
        [
            (int(i), class_names[int(i)] if class_names else str(int(i)), float(p))
            for p, i in zip(row_values, row_indices, strict=True)
        ]
        for row_values, row_indices in zip(values, indices, strict=True)
    ]


def weight_dims(architecture: Architecture, weights: Mapping[str, Tensor]) -> tuple[int, int]:
    """``(num_classes, in_channels)`` read from the classifier's and the stem's weights."""
    info = architecture.info
    return int(weights[info.classifier_weight].shape[0]), int(weights[info.stem_weight].shape[1])


def _open(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(card, weights) of a folder, a .zip or a weights file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if path.is_dir():
        files = {p.name: p for p in path.iterdir() if p.name in (CARD_FILE, WEIGHTS_FILE)}
        if WEIGHTS_FILE not in files:
            raise BundleError(f"{path} has no {WEIGHTS_FILE}: not a cbam-nas bundle")
        raw = files[WEIGHTS_FILE].read_bytes()
        card_text = files[CARD_FILE].read_text() if CARD_FILE in files else None
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = {Path(n).name: n for n in archive.namelist()}
            if WEIGHTS_FILE not in names:
                raise BundleError(f"{path} has no {WEIGHTS_FILE}: not a cbam-nas bundle")
            raw = archive.read(names[WEIGHTS_FILE])
            card_text = archive.read(names[CARD_FILE]).decode() if CARD_FILE in names else None
    elif path.is_file():
        raw, card_text = path.read_bytes(), None
    else:
        raise BundleError(f"no bundle at {path}")
    try:
        weights = load(raw)
        header = _header(raw)
    except (SafetensorError, ValueError) as exc:
        raise BundleError(f"{path}: the weights are not a safetensors file ({exc})") from None
    if card_text is None:
        card_text = header.get(CARD_KEY)
    if card_text is None:
        raise BundleError(f"{path} has neither {CARD_FILE} nor a card in its weights' header")
    card = json.loads(card_text)
    if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: a {card.get('format')!r} card of version {card.get('format_version')!r}; "
            f"this version reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return card, weights


def _header(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes. By hand: the library reads metadata only
    through ``safe_open`` on a file, and a zipped bundle's weights are bytes. The format is
    public and fixed: a little-endian u64 N, then N bytes of JSON."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    return dict(header.get("__metadata__") or {})


def archive(files: Mapping[str, bytes], folder: str = "") -> bytes:
    """``files`` as a zip (weights stored, text deflated), under ``folder`` when given."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for name, data in files.items():
            method = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
            out.writestr(f"{folder}/{name}" if folder else name, data, compress_type=method)
    return buffer.getvalue()
